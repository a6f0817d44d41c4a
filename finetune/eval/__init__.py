"""Evaluation: BLEU/ROUGE/exact match (`scores`, shipped as `evaluate` modules in `metrics/`),
batched generation (`generation`), capability suites and the regression gate (`suite`, `gate`),
reports (`report`), and the after-training hook any stage can call."""

from __future__ import annotations

from finetune.resources import find_suite  # noqa: F401  (re-exported: eval's public API)


def after_training(recipe, output_dir, heldout=None) -> str:
    """Run the recipe's `eval:` section on a finished output dir: `eval/` report, and the
    evaluation section appended to its model card (returned; '' without an `eval:` section).
    `heldout`: the eval split the stage trained with (its held-out records are scored, not re-read).
    Call it after the output is finished, so an eval failure never costs the training."""
    if getattr(recipe, "eval", None) is None:
        return ""
    from finetune.eval.hook import run

    return run(recipe, output_dir, heldout)
