"""Contrastive preference optimisation (TRL's experimental CPOTrainer), reference-free.
`train.loss_type`: sigmoid (CPO), hinge, ipo, simpo, alphapo; `cpo_alpha` weights the NLL
term on chosen. `stage: simpo` is this stage with loss_type simpo, cpo_alpha 0 and beta 2.0
(SimPO: length-normalised log-probability margin with target margin `simpo_gamma`).
Experimental in TRL 1.12, as TRL marks it.
"""

from __future__ import annotations

from pathlib import Path

from finetune.config import Recipe
from finetune.stages import preference
from finetune.stages.preference import plan  # noqa: F401  (the stage interface: run, plan)


def run(recipe: Recipe, callbacks=()) -> Path:
    from trl.experimental.cpo import CPOTrainer

    return preference.run(recipe, preference.trainer(CPOTrainer, recipe), callbacks)
