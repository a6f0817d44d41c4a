"""The run shared by GRPO and RLOO: the preference stages' run (finetune.stages.preference) with
reward functions (finetune.rewards: rule rewards and/or an `rm` dir) weighted as the recipe says."""

from __future__ import annotations

from pathlib import Path

from finetune import chain, models, rewards
from finetune.config import Recipe
from finetune.errors import RecipeError
from finetune.stages import preference
from finetune.stages.preference import plan  # noqa: F401  (the stage interface: run, plan)


def run(trainer_cls, recipe: Recipe, callbacks=()) -> Path:
    if "reward_weights" in recipe.train:
        raise RecipeError(f"{recipe.source or 'recipe'}: train.reward_weights: give each reward its weight in the rewards section")
    # Reward models load before any output dir exists: a bad rewards.model fails first.
    dtype = models.resolve_dtype(recipe.model.dtype)
    funcs, tokenizers, weights = rewards.reward_functions(
        recipe.rewards, load_model=lambda path: chain.load_reward_model(path, dtype=dtype))
    make = preference.trainer(trainer_cls, recipe, reward_funcs=funcs, reward_processing_classes=tokenizers)

    def make_weighted(model, args, tok, prepared, callbacks):
        args.reward_weights = weights
        return make(model, args, tok, prepared, callbacks)

    return preference.run(recipe, make_weighted, callbacks)
