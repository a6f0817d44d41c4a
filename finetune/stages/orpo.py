"""Odds-ratio preference optimisation (TRL's experimental ORPOTrainer): SFT loss on chosen plus
`train.beta` x an odds-ratio penalty against rejected, with no reference model, so it can start
from a base model without an SFT stage. Experimental in TRL 1.12, as TRL marks it.
"""

from __future__ import annotations

from pathlib import Path

from finetune.config import Recipe
from finetune.stages import preference
from finetune.stages.preference import plan  # noqa: F401  (the stage interface: run, plan)


def run(recipe: Recipe, callbacks=()) -> Path:
    from trl.experimental.orpo import ORPOTrainer

    return preference.run(recipe, preference.trainer(ORPOTrainer, recipe), callbacks)
