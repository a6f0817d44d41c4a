"""LLaMA-Factory's BLEU-4 / ROUGE (ComputeSimilarity), reproduced for comparing against its numbers.

BLEU-4: nltk sentence_bleu over characters with smoothing method3; ROUGE-1/2/L: rouge_chinese
F-scores over jieba words. 0-100, rounded per example, averaged. Not comparable with sacrebleu.
"""

import datasets
import evaluate

from finetune.eval import scores


class LlamaFactory(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="LLaMA-Factory-style character BLEU-4 and jieba ROUGE (0-100).",
            citation="",
            inputs_description="predictions: list of str; references: list of str. "
            "Returns {bleu-4, rouge-1, rouge-2, rouge-l}.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return scores.llamafactory(predictions, references)
