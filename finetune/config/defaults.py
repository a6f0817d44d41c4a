"""Defaults: one table, applied before validation, of what a recipe gets for each key it leaves
out, by stage and adapter method, and where each value comes from (the dry-run plan prints it).

Order (later wins): common train defaults < the stage's < the adapter method's (stage sft) < the
recipe < `key=value` overrides. The TRL config class of each stage (whose fields `train` takes)
is looked up here too.
"""

from __future__ import annotations

from typing import Any

from finetune.config.methods import DEFAULTS as METHOD_DEFAULTS


def trl_config_class(stage: str):
    """The TRL config dataclass whose fields the `train` section of this stage takes."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl

    if stage in ("orpo", "cpo", "simpo", "ppo"):  # TRL 1.12 keeps these in trl.experimental
        import importlib

        name = {"simpo": "cpo"}.get(stage, stage)
        return getattr(importlib.import_module(f"trl.experimental.{name}"), f"{name.upper()}Config")
    return {
        "sft": trl.SFTConfig,
        "distill": trl.SFTConfig,  # on_policy: finetune.stages.distill builds TRL's GKDConfig (an SFTConfig) from it
        "rm": trl.RewardConfig,
        "dpo": trl.DPOConfig,
        "kto": trl.KTOConfig,
        "grpo": trl.GRPOConfig,
        "rloo": trl.RLOOConfig,
    }[stage]


def train_defaults(stage: str, bf16: bool) -> dict[str, Any]:
    """Our explicit defaults, replacing TRL's where they bite (TRL 1.12: bf16 and
    activation checkpointing default to on even on a CPU; SFT lr 2e-5 is for full tuning).
    Measured in bench/README.md: length-grouped batches and no activation checkpointing are
    faster on a CPU; bf16 autocast only where the hardware has bf16 arithmetic (`bf16`: the
    hardware probe, config.default_bf16)."""
    common = {
        "learning_rate": 2e-4,
        "num_train_epochs": 1.0,
        "max_steps": -1,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "bf16": bf16,
        "fp16": False,
        "activation_checkpointing": False,
        "logging_steps": 5,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": 200,
        "save_total_limit": 2,
        "eval_strategy": "no",
        "report_to": ["tensorboard"],
        "seed": 42,
        "optim": "adamw_torch",
        "ddp_find_unused_parameters": False,
        # seconds a rank waits at a collective (transformers: 1800): on many nodes, the other ranks wait while
        # each node's main process prepares the data cache the first time; 3 h covers a large dataset on a
        # slow node (docs/distributed.md). A rank that fails still stops the others at once (torchrun).
        "ddp_timeout": 10800,
        "dataloader_num_workers": 0,
        "resume": "auto",
    }
    return {**common, **STAGE_TRAIN_DEFAULTS[stage]}


# Per stage, on top of the common defaults above. TRL's learning rates (1e-6 for DPO/KTO/ORPO/
# CPO/GRPO/RLOO, 3e-6 PPO, 1e-4 reward) are for full fine-tuning; a LoRA adapter starts at zero
# and needs ~10x more. Only keys that exist in the stage's TRL config are set.
STAGE_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"max_length": 1024, "loss_type": "nll", "train_sampling_strategy": "group_by_length"},
    "distill": {"max_length": 1024, "train_sampling_strategy": "group_by_length"},
    "rm": {"learning_rate": 1e-4, "max_length": 1024},
    "dpo": {"learning_rate": 5e-5, "max_length": 1024},
    "kto": {"learning_rate": 5e-5, "max_length": 1024},
    "orpo": {"learning_rate": 5e-5, "max_length": 1024},
    "cpo": {"learning_rate": 5e-5, "max_length": 1024},
    # SimPO (Meng et al. 2024) = CPO's simpo loss without the NLL term; beta 2.0 as in the paper.
    "simpo": {"learning_rate": 5e-5, "max_length": 1024, "loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0},
    "ppo": {"learning_rate": 1e-5},
    "grpo": {"learning_rate": 1e-5},
    "rloo": {"learning_rate": 1e-5},
}


def table(stage: str, method: str, bf16: bool) -> dict[tuple[str, str], tuple[Any, str]]:
    """(section, key) -> (default value, where it comes from: default | stage default | method
    default) for a recipe of this stage and adapter method. The method's defaults (learning rates
    that differ by orders of magnitude, float32 weights for full tuning) apply to stage sft, the
    one stage every method runs through; the other stages take LoRA and their own learning rates."""
    common = train_defaults(stage, bf16)
    out = {
        ("train", k): (v, "stage default" if k in STAGE_TRAIN_DEFAULTS[stage] else "default")
        for k, v in common.items()
    }
    if stage in ("sft", "distill"):  # the student of a distillation takes any method, as sft
        for dotted, value in METHOD_DEFAULTS[method].items():
            section, key = dotted.split(".")
            out[(section, key)] = (value, "method default")
    if method == "dora":  # DoRA is LoRA with use_dora (PEFT's flag)
        out[("adapter", "use_dora")] = (True, "method default")
    return out
