"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline: each of a prompt's
`num_generations` completions is scored against the mean reward of the others. Rewards: built-in
rules and/or an `rm` dir (finetune.rewards), weighted. LoRA policy; the KL reference (`beta` > 0)
is the policy with its adapter disabled. TRL's RLOOTrainer; see finetune.stages.rl."""

from __future__ import annotations

from pathlib import Path

from finetune.config import Recipe
from finetune.stages import rl
from finetune.stages.rl import plan  # noqa: F401  (the stage interface: run, plan)


def run(recipe: Recipe, callbacks=()) -> Path:
    from trl import RLOOTrainer

    return rl.run(RLOOTrainer, recipe, callbacks)
