"""finetune ROUGE: rouge-score ROUGE-1/2/L/Lsum F1 with a tokenizer that keeps Chinese.

Load it by path (offline): `evaluate.load(<this folder>)`, or `finetune.eval.modules.load("rouge")`.
"""

import datasets
import evaluate

from finetune.eval import scores

_DESCRIPTION = "rouge-score F1 (0-1) averaged over examples; tokenizer chars (CJK characters + ASCII words) or jieba."
_INPUTS = """predictions: list of str; references: list of str (one per prediction);
tokenizer: chars | jieba (default chars). Returns {rouge1, rouge2, rougeL, rougeLsum}."""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, tokenizer="chars"):
        return scores.rouge(predictions, references, tokenizer)
