"""GRPO (Shao et al. 2024): per prompt, `num_generations` completions are sampled and each one's
advantage is its reward relative to the group's (no value model). Rewards: built-in rules and/or
an `rm` dir (finetune.rewards), weighted. LoRA policy; the KL reference (`beta` > 0) is the policy
with its adapter disabled. TRL's GRPOTrainer; see finetune.stages.rl."""

from __future__ import annotations

from pathlib import Path

from finetune.config import Recipe
from finetune.stages import rl
from finetune.stages.rl import plan  # noqa: F401  (the stage interface: run, plan)


def run(recipe: Recipe, callbacks=()) -> Path:
    from trl import GRPOTrainer

    return rl.run(GRPOTrainer, recipe, callbacks)
