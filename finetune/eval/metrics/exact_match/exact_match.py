"""finetune exact match: prediction == reference after stripping surrounding whitespace.

Load it by path (offline): `evaluate.load(<this folder>)`, or `finetune.eval.modules.load("exact_match")`.
"""

import datasets
import evaluate

from finetune.eval import scores


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to their reference (surrounding whitespace ignored), 0-1.",
            citation="",
            inputs_description="predictions: list of str; references: list of str. Returns {exact_match}.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return scores.exact_match(predictions, references)
