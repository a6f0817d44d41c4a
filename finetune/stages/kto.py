"""Kahneman-Tversky optimisation: TRL's KTOTrainer on unpaired examples (prompt, completion,
label: desirable or not); preference pairs are unpaired (chosen desirable, rejected not).
Reference = the adapter disabled, as in DPO. `train.beta`, `desirable_weight` and
`undesirable_weight` (balance them when the labels are unbalanced) set the objective.
KTO estimates its KL term from the other examples of a batch: use batches of 2 or more.
"""

from __future__ import annotations

from pathlib import Path

from finetune.config import Recipe
from finetune.stages import preference
from finetune.stages.preference import plan  # noqa: F401  (the stage interface: run, plan)


def run(recipe: Recipe, callbacks=()) -> Path:
    from trl import KTOTrainer

    return preference.run(recipe, preference.trainer(KTOTrainer, recipe, ref_model=None), callbacks)
