"""Adapter methods in the recipe: which `adapter.*` keys each method reads, its defaults, and the
combinations that cannot work. Part of the schema (checked when a recipe loads); how each method
is built and trained is `finetune.adapters`."""

from __future__ import annotations

import dataclasses
import logging
import os

from finetune.errors import RecipeError

LORA = ("lora", "dora", "qlora", "pissa", "olora")
PROMPT = ("prompt_tuning", "prefix_tuning", "p_tuning")
FULL_WEIGHTS = ("freeze", "full")

_LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "use_rslora", "bias", "loraplus_lr_ratio")
_QUANT_KEYS = ("quant_bits", "quant_type", "double_quant", "compute_dtype")
_PROMPT_KEYS = ("num_virtual_tokens", "modules_to_save")
KEYS = {  # the adapter.* keys each method reads, besides `method`
    "lora": _LORA_KEYS + ("use_dora",),
    "dora": _LORA_KEYS + ("use_dora",),
    "qlora": _LORA_KEYS + ("use_dora",) + _QUANT_KEYS,
    "pissa": _LORA_KEYS,
    "olora": _LORA_KEYS,
    "adalora": ("r", "init_r", "alpha", "dropout", "target_modules", "modules_to_save", "bias"),
    "loha": ("r", "alpha", "target_modules", "modules_to_save"),
    "lokr": ("r", "alpha", "target_modules", "modules_to_save"),
    "vera": ("r", "dropout", "target_modules", "modules_to_save", "bias"),
    "ia3": ("target_modules", "feedforward_modules", "modules_to_save"),
    "prompt_tuning": _PROMPT_KEYS + ("init_text",),
    "prefix_tuning": _PROMPT_KEYS + ("prefix_projection", "encoder_hidden_size"),
    "p_tuning": _PROMPT_KEYS + ("encoder_type", "encoder_hidden_size"),
    "freeze": ("trainable_layers", "trainable_modules"),
    "full": (),
}

# Defaults per method, used where the recipe does not set the key. Learning rates differ by
# orders of magnitude: a few thousand prompt parameters need ~1e-2, LoRA 2e-4, every weight of
# the model 2e-5 (the values the methods' papers and PEFT's examples use for AdamW). Methods that
# train base weights load them in float32: bf16 autocast still runs the matmuls in bf16, but an
# AdamW step of 2e-5 on a bf16 weight mostly rounds away (bf16 keeps ~3 significant digits).
_LORA_LR = {"train.learning_rate": 2e-4}
DEFAULTS = {
    **{m: _LORA_LR for m in LORA + ("adalora", "loha", "lokr")},
    "vera": {"train.learning_rate": 4e-3, "adapter.r": 256},
    "ia3": {"train.learning_rate": 3e-3, "adapter.target_modules": None},
    "prompt_tuning": {"train.learning_rate": 3e-2},
    "prefix_tuning": {"train.learning_rate": 1e-2},
    "p_tuning": {"train.learning_rate": 1e-2},
    "freeze": {"train.learning_rate": 5e-5, "model.dtype": "float32"},
    "full": {"train.learning_rate": 2e-5, "model.dtype": "float32"},
}


def check(recipe, train_given: dict, where, adapter_given: dict | None = None) -> None:
    """Reject adapter keys the method does not read and combinations that cannot work (its
    defaults were filled in before validation: finetune.config.defaults)."""
    a = recipe.adapter
    if a.method == "dora" and not a.use_dora:
        raise RecipeError(
            f"{where(('adapter', 'use_dora'))}: method dora is LoRA with use_dora: true; use method lora instead"
        )
    if recipe.stage not in ("sft", "distill"):  # the other stages take LoRA only
        if a.method not in ("lora", "dora", "qlora"):
            raise RecipeError(
                f"{where(('adapter', 'method'))}: {a.method} runs through stage sft only "
                f"(stage {recipe.stage} takes lora, dora or qlora)"
            )
        _check_keys(a, where, adapter_given or {})
        return
    _check_keys(a, where, adapter_given or {})
    _check_combinations(recipe, train_given, where)


def _check_keys(a, where, given: dict) -> None:
    """A key the method does not read is an error when it differs from the default, and a warning when it
    is given at its default (a recipe.yaml that finetune dumped lists every key, so that one stays quiet)."""
    reads = KEYS[a.method]
    complete = all(f.name in given for f in dataclasses.fields(a))
    for f in dataclasses.fields(a):
        if f.name == "method" or f.name in reads:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(a, f.name) == default and f.name in given and not complete:
            logging.getLogger("finetune").warning(
                "%s: not used by adapter.method=%s; ignored", where(("adapter", f.name)), a.method
            )
        if getattr(a, f.name) != default:
            used = ", ".join(reads) or "no other adapter key"
            raise RecipeError(
                f"{where(('adapter', f.name))}: not used by adapter.method={a.method} (it reads: {used}); remove it"
            )


def _check_combinations(recipe, train_given: dict, where) -> None:
    a, t, m = recipe.adapter, recipe.train, recipe.adapter.method
    if m in PROMPT:
        for key in ("packing", "padding_free"):
            if t.get(key):
                raise RecipeError(
                    f"{where(('train', key))}: not with adapter.method={m}: virtual tokens are prepended to "
                    "every row, and a packed / padding-free row holds several examples"
                )
        if a.num_virtual_tokens < 1:
            raise RecipeError(f"{where(('adapter', 'num_virtual_tokens'))}: must be at least 1")
    if m in FULL_WEIGHTS and recipe.model.dtype == "float16":
        raise RecipeError(
            f"{where(('model', 'dtype'))}: float16 weights cannot be trained by adapter.method={m} "
            "(mixed precision needs float32 master weights); use bfloat16 or float32"
        )
    if m == "freeze":
        if a.trainable_layers < 0:
            raise RecipeError(f"{where(('adapter', 'trainable_layers'))}: must be 0 or more")
        if a.trainable_layers == 0 and not a.trainable_modules:
            raise RecipeError(
                f"{where(('adapter', 'trainable_layers'))}: 0 and no adapter.trainable_modules: nothing would train"
            )
    if m == "ia3":
        if a.target_modules == "all-linear":  # PEFT 0.21 saves the expanded names, and its reload rejects them
            raise RecipeError(
                f"{where(('adapter', 'target_modules'))}: ia3 needs module names (e.g. [k_proj, v_proj, down_proj]) "
                "or null for PEFT's default, not all-linear"
            )
        if a.feedforward_modules and not set(a.feedforward_modules) <= set(a.target_modules or []):
            raise RecipeError(
                f"{where(('adapter', 'feedforward_modules'))}: must be a subset of adapter.target_modules"
            )
    if a.init_r is not None and a.init_r < a.r:
        raise RecipeError(
            f"{where(('adapter', 'init_r'))}: must be at least adapter.r ({a.r}): AdaLoRA prunes ranks down to r"
        )
    if a.loraplus_lr_ratio is not None:
        if a.loraplus_lr_ratio <= 0:
            raise RecipeError(f"{where(('adapter', 'loraplus_lr_ratio'))}: must be positive")
        if "optim" in train_given:
            raise RecipeError(
                f"{where(('train', 'optim'))}: adapter.loraplus_lr_ratio builds its own AdamW; remove one of the two"
            )
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise RecipeError(
                f"{where(('adapter', 'loraplus_lr_ratio'))}: not under FSDP (transformers refuses an optimizer "
                "built outside the Trainer); use DDP or DeepSpeed"
            )
