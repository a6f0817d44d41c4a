"""The run shared by GRPO and RLOO: the preference stages' run (finetune.stages.preference) with
reward functions (finetune.rewards: rule rewards and/or an `rm` dir) weighted as the recipe says."""

from __future__ import annotations

from pathlib import Path

from finetune import rewards
from finetune.config import Recipe
from finetune.errors import DataError, RecipeError
from finetune.stages import preference
from finetune.stages.preference import plan  # noqa: F401  (the stage interface: run, plan)


def run(trainer_cls, recipe: Recipe, callbacks=()) -> Path:
    if "reward_weights" in recipe.train:
        raise RecipeError(
            f"{recipe.source or 'recipe'}: train.reward_weights: give each reward its weight in the rewards section"
        )
    # Reward models load before any output dir exists: a bad rewards.model fails first.
    funcs, tokenizers, weights = rewards.reward_functions(recipe)
    make = preference.trainer(trainer_cls, recipe, reward_funcs=funcs, reward_processing_classes=tokenizers)

    loaded = preference.prepare(recipe)  # the data, once
    if any(rule["type"] == "answer" for rule in recipe.rewards.rules):
        _check_answer_columns(recipe, loaded[2])  # before any output dir exists

    def make_weighted(model, args, tok, prepared, callbacks):
        args.reward_weights = weights
        return make(model, args, tok, prepared, callbacks)

    return preference.run(recipe, make_weighted, callbacks, loaded=loaded)


def _check_answer_columns(recipe: Recipe, prepared) -> None:
    """An `answer` rule reads a field of every prompt record: say so before training if it is missing."""
    for i, rule in enumerate(recipe.rewards.rules):
        if rule["type"] != "answer":
            continue
        column = rule.get("column", "answer")
        for split in (prepared.train, prepared.eval):
            missing = [n for n, e in enumerate(split.examples) if column not in e] if split else []
            if missing:
                fields = ", ".join(sorted(split.examples[missing[0]])) or "none"
                raise DataError(
                    f"{split.source}: record {missing[0] + 1}: rewards.rules[{i}] (an answer reward) "
                    f"reads the field '{column}', which it lacks (fields: {fields}; only "
                    "data.format: prompt keeps extra fields)"
                )
