"""Reward modelling: the base with a sequence-classification head (num_labels=1), LoRA/QLoRA on
the body and the head trained in full (PEFT's SEQ_CLS task saves `score` with the adapter),
TRL's RewardTrainer (Bradley-Terry loss on chosen/rejected pairs). Pairwise accuracy on the
eval split is logged (`eval_accuracy`) and written to the model card. The output loads with
plain transformers + peft (`AutoModelForSequenceClassification` + `PeftModel`) or with
`finetune.loading.load_reward_model`. RewardTrainer drops pairs longer than train.max_length
(it does not truncate them): the count is logged and kept as `train_dropped_examples`.
"""

from __future__ import annotations

from pathlib import Path

from finetune import adapters
from finetune.config import Recipe
from finetune.stages import preference
from finetune.stages.preference import plan  # noqa: F401  (the stage interface: run, plan)


def run(recipe: Recipe, callbacks=()) -> Path:
    from trl import RewardTrainer

    peft_config = adapters.peft_config(recipe.adapter)
    peft_config.task_type = "SEQ_CLS"  # PEFT then trains and saves the `score` head too
    make = preference.trainer(RewardTrainer, recipe, peft_config=peft_config)
    return preference.run(recipe, make, callbacks, num_labels=1)
