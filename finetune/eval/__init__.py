"""Evaluation: BLEU/ROUGE/exact match (`scores`, shipped as `evaluate` modules in `metrics/`),
batched generation (`generation`), capability suites and the regression gate (`suite`, `gate`),
reports (`report`), and the after-training hook any stage can call."""

from __future__ import annotations


def after_training(recipe, output_dir) -> str:
    """Run the recipe's `eval:` section on a just-trained output dir; returns the model card's
    evaluation section ('' when the recipe has no `eval:`). See `finetune.eval.hook`."""
    if getattr(recipe, "eval", None) is None:
        return ""
    from finetune.eval.hook import run

    return run(recipe, output_dir)
