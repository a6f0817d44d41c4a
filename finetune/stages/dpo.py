"""Direct preference optimisation: TRL's DPOTrainer with a LoRA/QLoRA adapter. The reference
model is the same model with the adapter disabled (ref_model=None + peft_config: no second
copy); chained from an SFT dir, that is the SFT model (finetune.chain merges it first).
`train.loss_type` (a list: sigmoid, ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, ...,
as TRL 1.12 offers) and `train.beta` choose the objective. Logged: rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins (implicit rewards, train and eval).
"""

from __future__ import annotations

from pathlib import Path

from finetune.config import Recipe
from finetune.stages import preference
from finetune.stages.preference import plan  # noqa: F401  (the stage interface: run, plan)


def run(recipe: Recipe, callbacks=()) -> Path:
    from trl import DPOTrainer

    return preference.run(recipe, preference.trainer(DPOTrainer, recipe, ref_model=None), callbacks)
