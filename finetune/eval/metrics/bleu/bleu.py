"""finetune BLEU: sacrebleu corpus BLEU + mean sentence BLEU, tokenizer 13a (English) or zh (Chinese).

Load it by path (offline): `evaluate.load(<this folder>)`, or `finetune.eval.modules.load("bleu")`.
"""

import datasets
import evaluate

from finetune.eval import scores

_DESCRIPTION = (
    "sacrebleu corpus BLEU and mean sentence BLEU (0-100); language auto-detected (CJK -> zh tokenizer) or given."
)
_INPUTS = """predictions: list of str; references: list of str (one per prediction);
language: auto | en | zh (default auto). Returns {bleu, sentence_bleu, language}."""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, language="auto"):
        if language == "auto":
            language = scores.detect_language(references)
        return {**scores.bleu(predictions, references, language), "language": language}
