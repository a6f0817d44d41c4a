"""Will it fit: the peak accelerator memory of one training process, estimated from the recipe and the
model's config alone (no weights read), with a verdict against a GPU's memory and the first change that
would make it fit.

What is exact and what is a model (docs/memory.md has the measured accuracy):
- weights: exact bytes of the tensors `loading.load_for_training` creates — per parameter by dtype; for
  QLoRA the packed 4-bit/8-bit storage plus bitsandbytes' quantization state (absmax, double-quant
  statistics, code books), the modules bitsandbytes leaves unquantized (output embeddings, tied weights,
  `_keep_in_fp32_modules`) upcast to fp32 as `prepare_model_for_kbit_training` does;
- adapter, gradients, optimizer states: exact for torch's AdamW (two states per trainable tensor in its
  dtype, plus a 4-byte step); 8-bit and factored optimizers by their state layout;
- activations: a per-layer, per-token model of what autograd saves in a decoder layer (hidden, MLP and
  key/value widths, the adapter rank, eager attention's probabilities) plus the vocabulary logits and the
  loss's fp32 copies; checkpointing keeps each layer's input and recomputes one layer at a time. Its shape
  was fitted to torch's measured peak on CPU (tests/test_fit.py checks it);
- framework: the CUDA context and allocator slack outside torch's own count, a fixed allowance.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from finetune.config import Recipe
from finetune.errors import RecipeError

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # the CUDA context, cuBLAS workspaces: outside torch's allocator count
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a share of the estimated peak
PAIRED_STAGES = ("dpo", "simpo", "orpo", "cpo", "rm")  # chosen and rejected go through the model together
_DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_BNB_4BIT_BLOCK = 64  # bitsandbytes' 4-bit blocksize (CUDA and CPU)
_BNB_NESTED_BLOCK = 256  # double quantization: absmax quantized in blocks of 256
_BNB_4BIT_CODE = 16 * 4  # the NF4/FP4 code book of each quantized weight (16 float32)
_BNB_NESTED_CODE = 256 * 4  # the 8-bit dynamic code book of the nested statistics (256 float32)


@dataclass
class Part:
    name: str
    bytes: int
    how: str


@dataclass
class Estimate:
    parts: list[Part]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    def part(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)

    def lines(self) -> list[str]:
        width = max(len(p.name) for p in self.parts)
        rows = [f"{p.name:<{width}}  {gib(p.bytes):>10}  {p.how}" for p in self.parts]
        return [*rows, f"{'total':<{width}}  {gib(self.total):>10}  peak per device"]


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.01 * GIB else f"{n / 1024**2:.1f} MiB"


def parse_size(text: str) -> int:
    """'24GB', '80 GiB', '24g', '16000MB' -> bytes (GB and GiB both read as GiB, as GPU makers' "80 GB" cards
    hold 80 GiB-ish usable memory); one line naming the value otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m or not m.group(1):
        raise RecipeError(f"--gpu-memory: {text!r} is not a size (examples: 24GB, 80GiB, 16000MB)")
    scale = {"": GIB, "k": 1024, "m": 1024**2, "g": GIB, "t": 1024**4}[m.group(2)]
    return int(float(m.group(1)) * scale)


# ----------------------------------------------------------------------------- the model as it would train


def _config(recipe: Recipe):
    from transformers import AutoConfig

    from finetune import loading

    try:
        return AutoConfig.from_pretrained(
            loading.model_path(recipe.model),
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"model.name_or_path: cannot read the config of {recipe.model.name_or_path!r}: "
            f"{str(e).strip().splitlines()[0]}"
        ) from None


def meta_model(recipe: Recipe, config=None):
    """The recipe's model with its adapter attached (or weights frozen) on the meta device, outside any
    DeepSpeed ZeRO-3 `zero.Init` (which cannot materialise meta tensors), with each linear layer that
    bitsandbytes would quantize marked `_fit_quantized`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.modeling_utils import set_zero3_state
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    from finetune import adapters, loading

    cfg = config if config is not None else _config(recipe)
    auto, task_type = AutoModelForCausalLM, None
    if loading.is_vision_config(cfg):
        from transformers import AutoModelForImageTextToText

        auto = AutoModelForImageTextToText
    if recipe.stage == "rm":
        cfg.num_labels, auto, task_type = 1, AutoModelForSequenceClassification, "SEQ_CLS"
    # set_zero3_state: transformers' own mark that zero.Init is already entered, so from_config never builds
    # under it once accelerate has registered a ZeRO-3 config (partitioning a meta model fails)
    with init_empty_weights(), set_zero3_state():
        model = auto.from_config(cfg, trust_remote_code=recipe.model.trust_remote_code)
    model.tie_weights()  # inside init_empty_weights tied weights stay apart; a loaded model shares them
    with init_empty_weights(), set_zero3_state():
        if recipe.adapter.method == "qlora":
            keep = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and should_convert_module(name, keep):
                    module._fit_quantized = True
        return adapters.for_counting(model, recipe.adapter, task_type)


# ----------------------------------------------------------------------------- the parts


def compute_dtype(recipe: Recipe, on_gpu: bool) -> torch.dtype:
    """The dtype of the matmuls and activations: the recipe's own bf16/fp16 choice; where the recipe leaves
    it to the machine, bf16 on a GPU (the default on every bf16 GPU) and this machine's default on a CPU."""
    t = recipe.train
    chosen = any(recipe.origins.get(f"train.{k}") in ("recipe", "override") for k in ("bf16", "fp16"))
    if on_gpu and not chosen:
        return torch.bfloat16
    if t.get("bf16"):
        return torch.bfloat16
    if t.get("fp16"):
        return torch.float16
    return _weight_dtype(recipe, on_gpu)


def _weight_dtype(recipe: Recipe, on_gpu: bool) -> torch.dtype:
    name = recipe.adapter.compute_dtype if recipe.adapter.method == "qlora" else recipe.model.dtype
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _quantized_bytes(numel: int, out_features: int, recipe: Recipe) -> int:
    a = recipe.adapter
    if a.quant_bits == 8:  # int8 weights + one float32 scale per output row (SCB)
        return numel + 4 * out_features
    blocks = math.ceil(numel / _BNB_4BIT_BLOCK)
    if a.double_quant:  # absmax as uint8 in blocks of 256, their float32 absmax, code book and offset
        stats = blocks + 4 * math.ceil(blocks / _BNB_NESTED_BLOCK) + _BNB_NESTED_CODE + 4
    else:
        stats = 4 * blocks
    return math.ceil(numel / 2) + stats + _BNB_4BIT_CODE


def weight_bytes(model, recipe: Recipe, on_gpu: bool) -> tuple[int, int]:
    """(frozen base weights and buffers, trainable parameters) in bytes, as the loaded model holds them."""
    dtype = _weight_dtype(recipe, on_gpu)
    qlora = recipe.adapter.method == "qlora"
    frozen = trainable = 0
    seen: set[int] = set()
    quantized_params: set[int] = set()
    for module in model.modules():
        if getattr(module, "_fit_quantized", False):
            quantized_params.add(id(module.weight))
            frozen += _quantized_bytes(module.weight.numel(), module.out_features, recipe)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quantized_params:
            continue
        if p.requires_grad:
            # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype); full/freeze train in the weights' dtype
            size = 4 if recipe.adapter.method not in ("full", "freeze") else _DTYPE_BYTES[dtype]
            trainable += p.numel() * size
        else:
            # prepare_model_for_kbit_training upcasts what bitsandbytes left in 16 bits to fp32
            size = 4 if qlora else _DTYPE_BYTES.get(dtype, 4)
            frozen += p.numel() * size
    for b in model.buffers():
        frozen += b.numel() * b.element_size()
    return frozen, trainable


def optimizer_bytes(model, recipe: Recipe, trainable_bytes: int) -> tuple[int, str]:
    optim = str(recipe.train.get("optim", "adamw_torch"))
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    if recipe.adapter.loraplus_lr_ratio or "adam" in optim and "8bit" not in optim:
        # torch AdamW: exp_avg and exp_avg_sq like each parameter, and a float32 step per tensor
        return 2 * trainable_bytes + 4 * len(params), "AdamW: 2 states per trainable weight + step"
    if "8bit" in optim:
        return 2 * n + 8 * math.ceil(n / 256) * 2, f"{optim}: 2 one-byte states + block statistics"
    if "lion" in optim:
        return trainable_bytes, f"{optim}: 1 state"
    if "adafactor" in optim:
        rows = sum((p.shape[0] + p.shape[-1]) * 4 if p.dim() >= 2 else p.numel() * 4 for p in params)
        return rows, "Adafactor: factored second moments"
    if optim.startswith("sgd"):
        return 0, "SGD without momentum"
    return 2 * trainable_bytes, f"{optim}: assumed 2 states per weight"


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_width: int  # key/value heads x head dim
    mlp: int  # intermediate width a token goes through (MoE: experts per token x expert width + shared)
    vocab: int

    @classmethod
    def of(cls, config) -> Shape:
        text = getattr(config, "get_text_config", lambda: config)()
        hidden = text.hidden_size
        heads = getattr(text, "num_attention_heads", 1) or 1
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        mlp = getattr(text, "intermediate_size", None) or 4 * hidden
        experts_per_token = getattr(text, "num_experts_per_tok", None)
        expert = getattr(text, "moe_intermediate_size", None)
        if experts_per_token and expert:
            shared = getattr(text, "shared_expert_intermediate_size", None) or expert * (
                getattr(text, "n_shared_experts", 0) or 0
            )
            mlp = experts_per_token * expert + shared
        return cls(hidden, text.num_hidden_layers, heads, kv * head_dim, mlp, text.vocab_size)


def tokens_per_micro_batch(recipe: Recipe) -> tuple[int, int, str]:
    """(tokens, longest sequence, how) that one forward of the stage processes at its longest."""
    t = recipe.train
    batch = t["per_device_train_batch_size"]
    if recipe.stage in ("grpo", "rloo"):
        length = (t.get("max_prompt_length") or 512) + (t.get("max_completion_length") or 256)
        return batch * length, length, f"{batch} completions x {length} (prompt + completion)"
    if recipe.stage == "ppo":
        length = (t.get("max_length") or 512) + (t.get("response_length") or 53)
        return batch * length, length, f"{batch} x {length} (query + response)"
    length = t.get("max_length") or 1024
    if recipe.adapter.method in _PROMPT:
        length += recipe.adapter.num_virtual_tokens or 0
    if recipe.stage in PAIRED_STAGES or recipe.stage == "kto":
        rows = 2 * batch if recipe.stage in PAIRED_STAGES else batch
        return rows * length, length, f"{rows} sequences (chosen + rejected) x {length} max_length"
    return batch * length, length, f"{batch} x {length} max_length"


_PROMPT = ("prompt_tuning", "prefix_tuning", "p_tuning")


def activation_bytes(shape: Shape, recipe: Recipe, dtype: torch.dtype, attn: str) -> tuple[int, str]:
    tokens, length, how = tokens_per_micro_batch(recipe)
    p = _DTYPE_BYTES[dtype]
    rank = recipe.adapter.r if recipe.adapter.method in ("lora", "qlora", "dora", "pissa", "olora", "rslora") else 0
    h = shape.hidden
    # what a decoder layer keeps for backward, per token: the layer input, two norm outputs, the query and
    # attention output, the input of the output projection; key and value; the MLP's four intermediates;
    # the adapter's rank-r intermediates; RMSNorm's fp32 copies when computing in 16 bits
    per_token = p * (6 * h + 2 * shape.kv_width + 4 * shape.mlp + 7 * rank) + (8 * h if p < 4 else 0)
    if attn == "eager":
        per_token += int(1.25 * p * shape.heads * length)  # the attention probabilities
    # logits (kept in the output), the fp32 log-softmax and the gradient of the logits; in 16 bits their fp32 copy
    logits = tokens * shape.vocab * (p + 8 + (4 if p < 4 else 0))
    boundary = 2 * tokens * h * p  # the embedding output and the final norm's input, and their gradients
    if recipe.train.get("activation_checkpointing"):
        kept = tokens * p * h * shape.layers
        total = kept + max(logits, tokens * per_token + boundary)
        mode = "checkpointing: layer inputs + one layer recomputed"
    else:
        total = tokens * per_token * shape.layers + logits + boundary
        mode = "no checkpointing: every layer's saved tensors"
    return total, f"{how}; {mode}; logits {gib(logits)}"


def estimate(recipe: Recipe, *, on_gpu: bool = True, world: int = 1, sharding: str = "none", model=None) -> Estimate:
    """Peak memory of one training process. `sharding`: none (DDP), zero1, zero2, or full (ZeRO-3 / FSDP
    full shard), which divide optimizer states, then gradients, then weights by `world`."""
    config = _config(recipe) if model is None else model.config
    model = model if model is not None else meta_model(recipe, config)
    dtype = compute_dtype(recipe, on_gpu)
    frozen, trainable = weight_bytes(model, recipe, on_gpu)
    optimizer, optim_how = optimizer_bytes(model, recipe, trainable)
    grads = trainable
    attn = recipe.model.attn_implementation or "sdpa"
    activations, act_how = activation_bytes(Shape.of(config), recipe, dtype, attn)
    notes = []
    if sharding != "none" and world > 1:
        optimizer //= world
        if sharding in ("zero2", "full"):
            grads //= world
        if sharding == "full":
            frozen, trainable = frozen // world, trainable // world
        notes.append(f"sharded over {world} processes ({sharding}): per-device shares")
    quant = (
        f"{recipe.adapter.quant_bits}-bit" if recipe.adapter.method == "qlora" else str(_weight_dtype(recipe, on_gpu))
    )
    parts = [
        Part("weights", frozen, f"base model, {quant.replace('torch.', '')}"),
        Part(
            "trainable", trainable, "adapter (fp32)" if recipe.adapter.method not in ("full", "freeze") else "weights"
        ),
        Part("gradients", grads, "one per trainable weight"),
        Part("optimizer", optimizer, optim_how),
        Part("activations", activations, f"{str(dtype).replace('torch.', '')}; {act_how}"),
    ]
    if on_gpu:
        slack = int(ALLOCATOR_SLACK * sum(p.bytes for p in parts))
        parts.append(Part("framework", CUDA_CONTEXT_BYTES + slack, "CUDA context 0.5 GiB + 5% allocator slack"))
    if recipe.stage == "ppo":
        notes.append("PPO also holds a reward and a value model: add their weights")
    if recipe.stage == "distill":
        notes.append("the teacher's weights add to this (the dry-run plan names the teacher's memory)")
    if recipe.stage in ("grpo", "rloo"):
        notes.append("generation's KV cache is not included (it is freed before the backward pass)")
    return Estimate(parts, notes)


# ----------------------------------------------------------------------------- the verdict


def visible_gpu_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def _changes(recipe: Recipe) -> list[tuple[str, dict]]:
    """Single changes that lower the peak, in the order a user would try them."""
    t, a = recipe.train, recipe.adapter
    out = []
    if a.method in ("lora", "dora", "rslora"):
        out.append(("adapter.method=qlora", {"adapter.method": "qlora"}))
    if not t.get("activation_checkpointing"):
        out.append(("train.activation_checkpointing=true", {"train.activation_checkpointing": True}))
    batch, accumulation = t["per_device_train_batch_size"], t["gradient_accumulation_steps"]
    while batch > 1:
        batch //= 2
        accumulation *= 2
        out.append(
            (
                f"train.per_device_train_batch_size={batch} train.gradient_accumulation_steps={accumulation}",
                {"train.per_device_train_batch_size": batch, "train.gradient_accumulation_steps": accumulation},
            )
        )
    length = t.get("max_length") or 0
    while length > 512:
        length //= 2
        out.append((f"train.max_length={length}", {"train.max_length": length}))
    return out


def _changed(recipe: Recipe, change: dict) -> Recipe:
    train, adapter = dict(recipe.train), recipe.adapter
    for dotted, value in change.items():
        section, key = dotted.split(".", 1)
        if section == "train":
            train[key] = value
        else:
            adapter = dataclasses.replace(adapter, **{key: value})
    return dataclasses.replace(recipe, train=train, adapter=adapter)


def verdict(recipe: Recipe, capacity: int | None, *, world: int = 1, sharding: str = "none", model=None) -> str:
    """One line: fits / does not fit on `capacity` bytes, and the first change that makes it fit."""
    est = estimate(recipe, on_gpu=True, world=world, sharding=sharding, model=model)
    if capacity is None:
        return f"peak ~{gib(est.total)} per device (no GPU visible: add --gpu-memory 24GB for a verdict)"
    if est.total <= capacity:
        return f"fits: peak ~{gib(est.total)} of {gib(capacity)} per device"
    for text, change in _changes(recipe):
        changed = _changed(recipe, change)
        same_model = model if "adapter.method" not in change else None
        if estimate(changed, on_gpu=True, world=world, sharding=sharding, model=same_model).total <= capacity:
            return f"does not fit: peak ~{gib(est.total)} > {gib(capacity)} per device; first change that fits: {text}"
    return (
        f"does not fit: peak ~{gib(est.total)} > {gib(capacity)} per device, and no single change fits "
        "(try QLoRA with checkpointing, batch 1 and a shorter max_length together, or shard over more GPUs)"
    )
