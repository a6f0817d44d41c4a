"""Adapter methods: which recipe keys each reads, its defaults, its PEFT config, and what training
needs beyond that config.

Beyond the config (PEFT 0.21): AdaLoRA reallocates ranks after every optimizer step (a
callback); LoRA+ needs its own optimizer; PiSSA/OLoRA change the base weights, so they are saved
converted to a plain LoRA on the original base; freeze/full train base weights (no PEFT) and
save a full model. The fields themselves are documented once, in `config.AdapterSection`.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

# Which keys each method reads and its defaults are part of the recipe schema (finetune.config.methods).
from finetune.config.methods import DEFAULTS, FULL_WEIGHTS, KEYS, LORA, PROMPT  # noqa: E402, F401
from finetune.errors import RecipeError

# ----------------------------------------------------------------------------- PEFT configs


ATTENTION_BLOCKS = ("self_attn", "self_attention", "attention", "attn")


def language_model(model) -> tuple[str, object] | None:
    """(full name, module) of a vision-language model's text decoder (`get_decoder()`), None for a text model.
    LoRA's default targets stay inside it: the vision tower and the projector train only when named."""
    if getattr(model.config, "vision_config", None) is None or not hasattr(model, "get_decoder"):
        return None
    decoder = model.get_decoder()
    name = {id(m): n for n, m in model.named_modules()}.get(id(decoder))
    return (name, decoder) if name else None


def vision_targets(model, targets) -> list[str] | str | None:
    """A vision-language model's LoRA targets as full module names: `all-linear` -> the text decoder's linear
    layers (as `all_linear_targets` picks them inside it); a named suffix -> its modules inside the text decoder
    when it has any there (q_proj is also a vision-tower name), else wherever it is (a module of the vision tower
    or projector, named on purpose). None for a text model or a target PEFT matches itself (a regex)."""
    import torch

    found = language_model(model)
    if found is None or isinstance(targets, str) and targets != "all-linear":
        return None
    prefix, decoder = found
    if targets == "all-linear":
        inside = all_linear_targets(decoder)
        names = [n for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)]
        if inside is not None:
            names = [n for n in names if any(n == t or n.endswith("." + t) for t in inside)]
        return sorted(f"{prefix}.{n}" for n in names)
    chosen = []
    modules = [n for n, m in model.named_modules() if n]
    for target in targets:
        hits = [n for n in modules if n == target or n.endswith("." + target)]
        in_text = [n for n in hits if n.startswith(prefix + ".")]
        chosen += in_text or hits or [target]  # no hit at all: PEFT names the target in its own error
    return sorted(set(chosen))


def trainable_by_part(model) -> list[tuple[str, int, int]]:
    """A vision-language model's (part, trainable, total) parameters, the parts being the children of the module
    that holds the text decoder (visual / language_model / multi_modal_projector ...) and the output head; empty
    for a text model. The plan's `trained` line."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = language_model(base)
    if found is None:
        return []
    parent = found[0].rpartition(".")[0]
    counts: dict[str, list[int]] = {}
    for name, p in base.named_parameters():
        rest = name[len(parent) + 1 :] if parent and name.startswith(parent + ".") else name
        count = counts.setdefault(rest.split(".", 1)[0], [0, 0])
        count[1] += p.numel()
        if p.requires_grad:
            count[0] += p.numel()
    return [(part, trainable, total) for part, (trainable, total) in counts.items()]


def adapted_modules(model) -> str | None:
    """The modules the adapter wraps, as the plan's `targets` line: each name within a block with the blocks it
    is wrapped in (`model.layers 0-1: mlp.down_proj, ...; model.layers 1: self_attn.q_proj, ...` on a hybrid
    model whose attention is in layer 1 only); numbered children below a block (experts) read `*`. None when no
    module is wrapped (prompt learning, freeze, full)."""
    import re

    from peft.tuners.tuners_utils import BaseTunerLayer

    blocks: dict[tuple[str, str], set[int]] = {}  # (block list, name within the block) -> block indices
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        name = name.removeprefix("base_model.model.")
        found = re.match(r"(.*?)\.(\d+)\.(.*)", name)
        where, index, rest = (found[1], int(found[2]), re.sub(r"\.\d+\.", ".*.", found[3])) if found else ("", 0, name)
        blocks.setdefault((where, rest), set()).add(index)
    groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for (where, rest), indices in blocks.items():
        groups.setdefault((where, tuple(sorted(indices))), []).append(rest)
    return (
        "; ".join(
            (f"{where} {_ranges(indices)}: " if where else "") + ", ".join(sorted(rests))
            for (where, indices), rests in sorted(groups.items())
        )
        or None
    )


def _ranges(indices: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> `0-2,5`."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def all_linear_targets(model) -> list[str] | None:
    """What `all-linear` wraps: the linear layers LoRA can train in every decoder layer, attention and MLP. Two
    kinds stay out, found by their structure, not by the family's name:
    - linear-attention and SSM mixers (Qwen3.5/Qwen3-Next GatedDeltaNet, Kimi's KDA, Mamba in Falcon-H1 and
      Granite 4, LFM2's short convolution): the block of a layer that holds a causal Conv1d. Their projections
      train when named, where PEFT allows it (`check_recurrent_targets`).
    - on a mixture-of-experts model (one with an `experts` module), everything but attention: PEFT 0.21 resolves
      `all-linear` there to transformers 5's fused 3-D expert tensors (a rank-r LoRA per expert, refused with
      dropout) and to the router (whose LoRA changes which experts are picked). Name the expert projections
      (gate_proj, up_proj, down_proj) to train them.
    None when that is PEFT's own `all-linear` (a dense, attention-only model); otherwise module names PEFT
    matches as suffixes: `self_attn.q_proj`, or a layer's full name where a suffix would also pick a mixer."""
    import torch

    layers = _layer_list(model)
    if layers is None:
        return None
    moe = any(name.rsplit(".", 1)[-1] == "experts" for name, _ in model.named_modules())
    prefix = {id(m): name for name, m in model.named_modules()}[id(layers)]
    chosen: dict[str, list[str]] = {}  # name within a layer -> the full names picked
    left_out: set[str] = set()
    for i, layer in enumerate(layers):
        recurrent = {name for name, child in layer.named_children() if _holds_conv(child)}
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            parts = name.split(".")
            if parts[0] in recurrent or (moe and not any(p in ATTENTION_BLOCKS for p in parts[:-1])):
                left_out.add(name)
            else:
                chosen.setdefault(name, []).append(f"{prefix}.{i}.{name}")
    if not left_out and not moe:  # on a MoE model PEFT's all-linear would also find the fused expert tensors
        return None
    return (
        sorted(
            name_or_full
            for name, full in chosen.items()
            for name_or_full in (full if name in left_out else [name])  # a suffix that also names a left-out layer
        )
        or None
    )


def _holds_conv(module) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv1d) for m in module.modules())


def _layer_list(model):
    import torch

    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    found = language_model(model) if hasattr(model, "config") else None
    for module in (found[1] if found else model).modules():  # a VLM's vision tower has layer lists too
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    return None


def check_recurrent_targets(model, targets) -> None:
    """Named targets inside a Mamba-2 mixer (one with the selective scan's `D` skip parameter): its fused CUDA kernel
    (`mamba_split_conv1d_scan_combined`) takes `out_proj.weight` as a tensor, so a LoRA on out_proj would be
    skipped on GPU; PEFT 0.21 refuses it for some model types only (falcon_h1, mamba2, nemotron_h: not Granite 4).
    One line, for every model: `in_proj` trains."""
    import torch

    if not isinstance(targets, (list, tuple, set)):
        return
    layers = _layer_list(model)
    for layer in layers if layers is not None else []:
        for child_name, child in layer.named_children():
            if not (_holds_conv(child) and isinstance(getattr(child, "D", None), torch.nn.Parameter)):
                continue
            for name, module in child.named_modules():
                full = f"{child_name}.{name}"
                conv = isinstance(module, torch.nn.Conv1d)
                if (conv or name.endswith("out_proj")) and any(full == t or full.endswith(f".{t}") for t in targets):
                    raise RecipeError(
                        f"adapter.target_modules: {full} is the {'convolution' if conv else 'output projection'} "
                        "of a Mamba-2 mixer, whose fused CUDA kernel reads its weight directly (a LoRA there "
                        f"would be skipped on GPU); name {child_name}.in_proj, attention or MLP layers instead"
                    )


def peft_config(
    adapter, model=None, *, total_steps: int | None = None, tokenizer: str | None = None, counting: bool = False
):
    """The PEFT config of `adapter` (an AdapterSection); None for freeze/full. `model` gives the
    hidden size prompt encoders default to; `counting` skips data-dependent initialisation
    (SVD, text embeddings) so the config can be applied to a model on the meta device."""
    import peft

    a, m = adapter, adapter.method
    if model is not None:
        check_trainable_config(model)
        if m in PROMPT:
            check_prompt_learning(model, m)
    common = dict(task_type=peft.TaskType.CAUSAL_LM, modules_to_save=a.modules_to_save)
    if m in LORA:
        init = {"pissa": "pissa_niter_16", "olora": "olora"}.get(m, True)
        targets = vision_targets(model, a.target_modules) if model is not None else None
        if targets is None and model is not None and a.target_modules == "all-linear":
            targets = all_linear_targets(model)
        if model is not None:
            check_recurrent_targets(model, a.target_modules)
        return peft.LoraConfig(
            **common,
            r=a.r,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            target_modules=targets or a.target_modules,
            use_rslora=a.use_rslora,
            use_dora=a.use_dora or m == "dora",
            bias=a.bias,
            init_lora_weights=True if counting else init,
        )
    if m == "adalora":
        total = max(total_steps or 1, 1)
        tinit, tfinal = adalora_schedule(total)
        return peft.AdaLoraConfig(
            **common,
            target_r=a.r,
            init_r=a.init_r or math.ceil(1.5 * a.r),
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            target_modules=a.target_modules,
            bias=a.bias,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=1,
            total_step=total,
        )
    if m == "loha":
        return peft.LoHaConfig(**common, r=a.r, alpha=a.alpha, target_modules=a.target_modules)
    if m == "lokr":
        return peft.LoKrConfig(**common, r=a.r, alpha=a.alpha, target_modules=a.target_modules)
    if m == "vera":
        return peft.VeraConfig(
            **common, r=a.r, vera_dropout=a.dropout, target_modules=a.target_modules, bias=a.bias, save_projection=True
        )
    if m == "ia3":
        return peft.IA3Config(**common, target_modules=a.target_modules, feedforward_modules=a.feedforward_modules)
    if m == "prompt_tuning":
        if a.init_text and not counting:
            return peft.PromptTuningConfig(
                **common,
                num_virtual_tokens=a.num_virtual_tokens,
                prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=a.init_text,
                tokenizer_name_or_path=tokenizer,
            )
        return peft.PromptTuningConfig(**common, num_virtual_tokens=a.num_virtual_tokens)
    hidden = a.encoder_hidden_size or _hidden_size(model)
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(
            **common,
            num_virtual_tokens=a.num_virtual_tokens,
            prefix_projection=a.prefix_projection,
            encoder_hidden_size=hidden,
        )
    if m == "p_tuning":
        return peft.PromptEncoderConfig(
            **common,
            num_virtual_tokens=a.num_virtual_tokens,
            encoder_hidden_size=hidden,
            encoder_reparameterization_type=a.encoder_type.upper(),
        )
    return None  # freeze, full: no adapter


def _hidden_size(model) -> int:
    if model is None:
        raise ValueError("the model is needed for the encoder's hidden size")
    return model.config.get_text_config().hidden_size


def adalora_schedule(total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal): the first 10% of steps at the initial rank, the last 20% at the final
    allocation, ranks pruned in between (the phases of the AdaLoRA paper)."""
    return total_steps // 10, total_steps // 5


class AdaLoraAllocation(TrainerCallback):
    """AdaLoRA's rank allocation after each optimizer step, while the gradients it scores are
    still there (`on_optimizer_step` runs before `zero_grad`)."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        cfg = model.peft_config[model.active_adapter]  # the trainer's exact step count replaces the estimate
        cfg.total_step = state.max_steps
        cfg.tinit, cfg.tfinal = adalora_schedule(state.max_steps)

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        model.base_model.update_and_allocate(state.global_step)


# ----------------------------------------------------------------------------- freeze


def select_trainable(model, adapter) -> list[str]:
    """freeze: make exactly the last `trainable_layers` decoder layers and the parameters named
    by `trainable_modules` trainable; returns the trainable parameter names."""
    layers = _decoder_layers(model)
    n = adapter.trainable_layers
    if n > len(layers):
        raise RecipeError(f"adapter.trainable_layers: {n}, but the model has {len(layers)} decoder layers")
    chosen = {id(p) for layer in list(layers)[len(layers) - n :] for p in layer.parameters()} if n else set()
    named = list(model.named_parameters(remove_duplicate=False))  # tied weights answer to both names
    for pattern in adapter.trainable_modules or []:
        hits = [p for name, p in named if f".{pattern}." in f".{name}."]
        if not hits:
            sample = ", ".join(sorted({name.rsplit(".", 1)[0] for name, _ in named})[:6])
            raise RecipeError(
                f"adapter.trainable_modules: {pattern!r} matches no module of the model (modules: {sample}, ...)"
            )
        chosen.update(id(p) for p in hits)
    for _, p in named:
        p.requires_grad_(id(p) in chosen)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _decoder_layers(model):
    import torch

    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise RecipeError(
        "adapter.trainable_layers: cannot find this model's decoder layers; use adapter.trainable_layers=0 "
        "and name the modules in adapter.trainable_modules"
    )


# ----------------------------------------------------------------------------- training


@dataclass
class Training:
    """What the trainer gets for the recipe's method."""

    model: object
    peft_config: object = None  # for SFTTrainer(peft_config=...), which then builds the adapter
    callbacks: list = field(default_factory=list)
    optimizers: tuple = (None, None)
    convert_on_save: bool = (
        False  # pissa/olora: saved as the difference to the initial adapter (a LoRA on the original base)
    )
    initial_adapter: Path | None = None  # where keep_initial saved the adapter as initialised

    def keep_initial(self, work: Path, is_main: bool) -> None:
        """PiSSA/OLoRA: save the adapter as initialised into the run's work dir, for the conversion on save."""
        if not self.convert_on_save:
            return
        cfg = self.model.peft_config[self.model.active_adapter]
        self.initial_adapter = Path(work) / "initial_adapter"
        init, cfg.init_lora_weights = (
            cfg.init_lora_weights,
            True,
        )  # reloading it must not re-run the SVD on the residual base
        self.model.save_pretrained(str(self.initial_adapter), is_main_process=is_main)
        cfg.init_lora_weights = init

    def save(self, out: Path) -> None:
        """After trainer.save_model (main process): PiSSA/OLoRA re-saved as a LoRA on the original base."""
        if self.initial_adapter is not None:
            self.model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(self.initial_adapter))
            shutil.rmtree(self.initial_adapter)


def check_trainable_config(model) -> None:
    """A config transformers accepts but cannot run right, as one line before training. Multi-head latent attention
    (DeepSeek-V3, GLM-4.7-Flash, Kimi): `kv_b_proj` makes keys and values for every attention head, yet transformers
    5.23 still repeats them num_attention_heads / num_key_value_heads times; the forward then fails ("The size of
    tensor a (4) must match the size of tensor b (8)") or attends with the wrong heads. Shipped MLA configs have
    num_key_value_heads == num_attention_heads."""
    config = model.config.get_text_config()
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if getattr(config, "kv_lora_rank", None) and heads and kv and kv != heads:
        raise RecipeError(
            f"model: the config has multi-head latent attention (kv_lora_rank) with num_key_value_heads={kv} but "
            f"num_attention_heads={heads}; latent attention makes keys and values for every head, so set "
            "num_key_value_heads to num_attention_heads in config.json"
        )


def check_prompt_learning(model, method: str) -> None:
    """Prompt-learning methods on caches and inputs they cannot reach, as one line (peft 0.21, transformers 5.23):
    - prefix tuning writes a key/value prefix into every layer of the cache; a linear-attention/SSM layer holds
      recurrent state instead, and peft's cache then fails ("Cannot get conv state for non linear attention layer");
    - prompt tuning and P-tuning put their virtual tokens in as input embeddings: a model whose layers also read
      per-layer embeddings looked up by token id (Gemma 4's `hidden_size_per_layer_input`) has no ids for them, and
      a model whose generation takes no `inputs_embeds` cannot generate after them."""
    import inspect

    from finetune.generate import cache_layer_types, cache_tracks_each_layer

    name = type(model).__name__
    if method == "prefix_tuning" and not cache_tracks_each_layer(model):
        kinds = sorted({k for k in cache_layer_types(model) if "Linear" in k} or set(cache_layer_types(model)))
        raise RecipeError(
            f"adapter.method: prefix_tuning puts a key/value prefix in every layer, but {name} keeps "
            f"linear-attention/SSM state in some ({', '.join(kinds)}); use prompt_tuning, p_tuning or LoRA"
        )
    if method in ("prompt_tuning", "p_tuning"):
        if getattr(model.config.get_text_config(), "hidden_size_per_layer_input", None):
            raise RecipeError(
                f"adapter.method: {method} feeds virtual tokens as embeddings, but {name} also looks up per-layer "
                "embeddings by token id, which virtual tokens have none of; use LoRA"
            )
        if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
            raise RecipeError(
                f"adapter.method: {method} generates from input embeddings, which {name}'s generation does not "
                "take (transformers 5.23); use LoRA"
            )


def for_training(model, recipe, args, total_steps: int, tokenizer: str | None = None) -> Training:
    """The model (adapter attached where the trainer cannot do it), callbacks and optimizer.
    Fails on a bad freeze selection before the run's output dir exists."""
    check_trainable_config(model)
    a, m = recipe.adapter, recipe.adapter.method
    if m == "full":
        model.requires_grad_(True)
        return Training(model)
    if m == "freeze":
        select_trainable(model, a)
        return Training(model)
    t = Training(model, peft_config(a, model, total_steps=total_steps, tokenizer=tokenizer))
    if m == "adalora":
        t.callbacks.append(AdaLoraAllocation())
    if m in ("pissa", "olora") or a.loraplus_lr_ratio:
        t.model, t.peft_config = attach(model, t.peft_config), None
        t.convert_on_save = m in ("pissa", "olora")
    if a.loraplus_lr_ratio:
        import torch
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(
            t.model,
            torch.optim.AdamW,
            lr=args.learning_rate,
            loraplus_lr_ratio=a.loraplus_lr_ratio,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        t.optimizers = (opt, None)
    return t


def for_counting(model, adapter, task_type: str | None = None):
    """The model as it would train (adapter attached or weights frozen), for parameter counts on the meta device;
    `task_type` replaces the adapter's (SEQ_CLS for a reward model)."""
    check_trainable_config(model)
    if adapter.method == "full":
        return model.requires_grad_(True)
    if adapter.method == "freeze":
        select_trainable(model, adapter)
        return model
    cfg = peft_config(adapter, model, counting=True)
    if task_type:
        cfg.task_type = task_type
    return attach(model, cfg)


def attach(model, cfg):
    """get_peft_model, its complaints about the recipe (e.g. target modules not in the model) as one-line errors."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise RecipeError(f"adapter: {str(e).strip().splitlines()[0]}") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size, a ZeRO-3 partitioned
    parameter (empty on every rank) as its full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        if getattr(p, "quant_state", None) is not None or p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# ----------------------------------------------------------------------------- descriptions


def is_adapter(method: str) -> bool:
    """Whether the method saves a PEFT adapter (else a full model)."""
    return method not in FULL_WEIGHTS


def base_model_path(model) -> str:
    """The base an adapter loads on (its adapter_config's), or the full model's own source."""
    cfg = getattr(model, "peft_config", None)
    return cfg[model.active_adapter].base_model_name_or_path if cfg else model.name_or_path


def describe(a) -> str:
    """One line naming the method and its settings (dry-run plan, model card)."""
    m, targets = a.method, f"targets={a.target_modules}"
    if m in LORA:
        extras = [
            ("rsLoRA", a.use_rslora),
            ("DoRA", a.use_dora or m == "dora"),
            (f"LoRA+ ratio {a.loraplus_lr_ratio:g}" if a.loraplus_lr_ratio else "", a.loraplus_lr_ratio),
            (f"{a.quant_bits}-bit {a.quant_type} base", m == "qlora"),
        ]
        more = "".join(f", {text}" for text, on in extras if on)
        return f"{m} r={a.r} alpha={a.alpha} dropout={a.dropout} {targets}{more}"
    if m == "adalora":
        return (
            f"adalora r={a.r} (from init_r={a.init_r or math.ceil(1.5 * a.r)}) "
            f"alpha={a.alpha} dropout={a.dropout} {targets}"
        )
    if m in ("loha", "lokr"):
        return f"{m} r={a.r} alpha={a.alpha} {targets}"
    if m == "vera":
        return f"vera r={a.r} dropout={a.dropout} {targets}"
    if m == "ia3":
        return f"ia3 {targets} feedforward={a.feedforward_modules or 'PEFT default'}"
    if m == "prompt_tuning":
        return f"prompt_tuning {a.num_virtual_tokens} virtual tokens, " + (
            f"init from text {a.init_text!r}" if a.init_text else "random init"
        )
    if m == "prefix_tuning":
        projection = (
            f"MLP projection (hidden {a.encoder_hidden_size or 'model'})" if a.prefix_projection else "no projection"
        )
        return f"prefix_tuning {a.num_virtual_tokens} virtual tokens per layer, {projection}"
    if m == "p_tuning":
        return (
            f"p_tuning {a.num_virtual_tokens} virtual tokens, "
            f"{a.encoder_type} encoder (hidden {a.encoder_hidden_size or 'model'})"
        )
    if m == "freeze":
        return (
            f"freeze: last {a.trainable_layers} decoder layers"
            + (f" + {a.trainable_modules}" if a.trainable_modules else "")
            + " trained in full"
        )
    return "full: every weight trained"
