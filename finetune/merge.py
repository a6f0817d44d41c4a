"""Fold adapters into their base and check the result numerically.

Every merge is verified: the written model is reloaded from disk with plain transformers and its
logits on PROBE_CHATS are compared with the adapter model's (the base + adapter it was merged
from); above the dtype's tolerance the merge fails and nothing is written.

QLoRA adapters were trained on 4-bit weights, so there are two merges (tests/test_merge.py measures both):
`dequantized` (default) folds the adapter into the dequantized 4-bit weights, i.e. into exactly
the weights it was trained against; `original` folds it into the full-precision weights the 4-bit
ones were rounded from. Both report their deviation from the 4-bit adapter model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune import __version__, image_inputs
from finetune.config import AdapterSection
from finetune.errors import FinetuneError
from finetune.loading import (
    ModelDir,
    ModelDirError,
    add_adapter,
    attach_adapter,
    inspect,
    load_base,
    load_inference_model,
    load_tokenizer,
)
from finetune.outputs import OutputDir
from finetune.staging import Staged, check_free

log = logging.getLogger("finetune")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Allowed max |Δlogit| between the written model and the adapter model, relative to max(1, max |logit|).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
COMBINATIONS = ("linear", "cat", "ties", "dare_ties", "dare_linear", "magnitude_prune")
PRUNING = ("ties", "dare_ties", "dare_linear", "magnitude_prune")
# Short chats every merge is checked on (English and Chinese, with and without a system turn).
PROBE_CHATS = [
    [{"role": "user", "content": "What colour is the sky?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name three fruits."}],
    [{"role": "user", "content": "中国的首都是哪里？"}],
]
# A vision-language model is also checked on a chat with an image (image_inputs.probe_image) before this question.
PROBE_IMAGE_QUESTION = "What colour is the square?"


class MergeError(FinetuneError):
    """The merged model does not reproduce the adapter model."""


@dataclass
class MergeReport:
    out: Path
    dtype: str
    max_delta: float  # written model vs the adapter model it was merged from
    tolerance: float
    logit_scale: float
    notes: list[str] = field(default_factory=list)
    what: str = "merged model"
    deviations: dict[str, float] = field(default_factory=dict)  # QLoRA: vs the 4-bit adapter model
    image_probe: bool = False  # a vision-language model: one more probe, with an image

    def lines(self) -> list[str]:
        out = [
            f"{self.what} written to {self.out}",
            f"verified on {len(PROBE_CHATS) + self.image_probe} probe prompts"
            f"{' (one with an image)' if self.image_probe else ''} ({self.dtype}): "
            f"max |Δlogit| = {self.max_delta:.3g} "
            f"(tolerance {self.tolerance:.3g}; max |logit| {self.logit_scale:.3g})",
        ]
        out += [
            f"deviation from the 4-bit adapter model ({k}): max |Δlogit| = {v:.3g}" for k, v in self.deviations.items()
        ]
        return out + self.notes


# ----------------------------------------------------------------------------- the probe check


def probe_batch(tokenizer, processor=None) -> list[dict]:
    """PROBE_CHATS rendered as generation prompts (one tensor dict per chat: no padding effects); with a
    vision-language model's `processor`, one more chat with an image (PROBE_IMAGE_CHAT), as the processor
    renders it (pixel values and the model's other image inputs included)."""
    out = []
    for chat in PROBE_CHATS:
        try:
            enc = tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        except Exception:  # a template that rejects system turns: probe without it
            enc = tokenizer.apply_chat_template(
                [m for m in chat if m["role"] != "system"],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    if processor is not None:
        chat = [image_inputs.user_turn(PROBE_IMAGE_QUESTION, [image_inputs.probe_image()])]
        messages, images = image_inputs.with_images(chat, "merge probe")
        out.append(image_inputs.render(processor, messages, images=images))
    return out


@torch.no_grad()
def probe_logits(model, batch: list[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    # no cache: a probe needs none, and a model whose every layer keeps linear-attention/SSM state cannot build one
    return [model(**{k: v.to(device) for k, v in enc.items()}, use_cache=False).logits.float().cpu() for enc in batch]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def max_abs(a: list[torch.Tensor]) -> float:
    return max(x.abs().max().item() for x in a)


def prompt_learning_message(source: ModelDir) -> str:
    return (
        f"{source.path}: a {source.peft_type} adapter adds virtual tokens instead of changing weights, so it cannot "
        "be folded into the base model; keep the adapter dir and load it with peft (PeftModel.from_pretrained), "
        "e.g. `finetune chat DIR` runs it as is"
    )


def _tolerance(dtype: str, scale: float, override: float | None) -> float:
    return override if override is not None else TOLERANCE[dtype] * max(1.0, scale)


def _check_adapter(source: ModelDir, what: str) -> None:
    if source.kind != "adapter":
        raise ModelDirError(f"{what}: {source.path} is a full model, not an adapter (nothing to merge)")
    if source.is_prompt_learning:
        raise ModelDirError(prompt_learning_message(source))


# --------------------------------------------------------------------------- single adapter


def merge(
    adapter_dir: str,
    out: str,
    dtype: str = "auto",
    max_shard_size: str = "2GB",
    onto: str | None = None,
    base: str | None = None,
    overwrite: bool = False,
    tolerance: float | None = None,
) -> MergeReport:
    """Merge one adapter into its base and write a plain HF model dir at `out` (verified)."""
    _check_shard_size(max_shard_size)
    source = inspect(adapter_dir, base, what="ADAPTER_DIR")
    _check_adapter(source, "ADAPTER_DIR")
    notes, deviations = [], {}
    if onto is not None and source.quant is None:
        if OutputDir(source.path).finished:  # a finetune run: its recipe says how the base was quantized
            raise ModelDirError(
                f"--onto: {source.path}/recipe.yaml: adapter.method is not qlora; --onto applies to "
                "QLoRA adapters only"
            )
        source.quant = AdapterSection(method="qlora")  # another tool's QLoRA adapter: the usual 4-bit NF4 recipe
        notes.append(
            "no finetune recipe.yaml: the base was quantized as 4-bit NF4 with double quantisation "
            "(the QLoRA paper's and finetune's defaults)"
        )
    final = check_free(out, overwrite)
    dtype = _output_dtype(dtype, source)
    tok = load_tokenizer(source)
    processor = image_inputs.vision_processor(source)
    batch = probe_batch(tok, processor)

    full = load_base(source, quantized=False)
    q_logits = None
    if source.quant is not None:
        onto = onto or "dequantized"
        q_logits, floor = _qlora_reference(source, full if onto == "dequantized" else None, batch)
        if floor is not None:
            notes.append(
                f"for scale: the 4-bit kernel vs float32 matmuls on the same (dequantized) weights, "
                f"no adapter: max |Δlogit| = {floor:.3g}"
            )
        notes.append(
            f"QLoRA adapter merged onto the {onto} base weights"
            + (" (what it was trained against)" if onto == "dequantized" else " (full precision, as published)")
        )
    model = attach_adapter(full, source)
    reference = probe_logits(model, batch)
    merged = _merge_and_unload(model, source)

    with Staged(final, overwrite) as tmp:
        _save_model(merged.to(DTYPES[dtype]), processor or tok, tmp, max_shard_size)
        del merged, model, full
        written = probe_logits(load_inference_model(str(tmp), "--out", dtype=DTYPES[dtype]), batch)
        scale = max_abs(reference)
        report = MergeReport(
            final, dtype, max_abs_diff(written, reference), _tolerance(dtype, scale, tolerance), scale, notes
        )
        report.image_probe = processor is not None
        if q_logits is not None:
            deviations[onto] = max_abs_diff(written, q_logits)
            report.deviations = deviations
        _verify(report)
        _write_card(tmp, report, [source], method=f"{source.peft_type.lower()} merged into the base")
    return report


def _merge_and_unload(model, source: ModelDir):
    try:
        return model.merge_and_unload(safe_merge=True)
    except (ValueError, AttributeError, NotImplementedError, RuntimeError) as e:
        raise ModelDirError(
            f"{source.path}: peft cannot merge this {source.peft_type} adapter: {str(e).splitlines()[0]}"
        ) from None


def _qlora_reference(source: ModelDir, dequantize_into, batch) -> tuple[list[torch.Tensor], float | None]:
    """Logits of the adapter on the 4-bit base (what was trained); if `dequantize_into` is a full-precision
    model, its weights are first replaced by the dequantized 4-bit ones (and the other parameters by the
    quantized model's, which are in the compute dtype)."""
    q_model = load_base(source)
    floor = None
    if dequantize_into is not None:
        _copy_dequantized(q_model, dequantize_into)
        floor = max_abs_diff(probe_logits(q_model, batch), probe_logits(dequantize_into, batch))
    q_peft = attach_adapter(q_model, source)
    logits = probe_logits(q_peft, batch)
    del q_peft, q_model
    return logits, floor


@torch.no_grad()
def _copy_dequantized(q_model, full) -> None:
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    done = set()
    for name, module in q_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = dequantize_bnb_weight(module.weight, state=module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = dequantize_bnb_weight(module.weight, state=module.state)
        else:
            continue
        full.get_submodule(name).weight.data.copy_(w.to(torch.float32))
        done.add(f"{name}.weight")
    params = dict(full.named_parameters())
    for name, p in q_model.named_parameters():
        if name not in done and name in params:
            params[name].data.copy_(p.data.to(torch.float32))


def _output_dtype(dtype: str, source: ModelDir) -> str:
    """`auto`: the base model's own dtype (a bf16 model stays bf16), float32 when it does not say."""
    if dtype != "auto":
        return dtype
    from transformers import AutoConfig

    try:
        declared = AutoConfig.from_pretrained(source.base).dtype
    except (OSError, ValueError):
        return "float32"
    name = str(declared).replace("torch.", "") if declared is not None else "float32"
    return name if name in DTYPES else "float32"


def _check_shard_size(max_shard_size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise ModelDirError(f"--max-shard-size: {max_shard_size!r}: not a size like 500MB or 2GB") from None


def _save_model(model, tok, tmp: Path, max_shard_size: str) -> None:
    """The weights and `tok`: a tokenizer, or a vision-language model's processor (its tokenizer, image
    processor and chat template: the merged dir then loads as the same kind of model)."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
    tok.save_pretrained(str(tmp))


def _verify(report: MergeReport) -> None:
    if not report.max_delta <= report.tolerance:  # also catches NaN
        raise MergeError(
            f"merge check failed: the merged model's logits differ from the adapter model's by "
            f"{report.max_delta:.3g} (> tolerance {report.tolerance:.3g} for {report.dtype}); nothing written"
        )


def _write_card(
    tmp: Path, report: MergeReport, sources: list[ModelDir], method: str, extra: dict | None = None
) -> None:
    base = sources[0].base
    info = {
        "finetune_version": __version__,
        "base": base,
        "adapters": [str(s.path) for s in sources],
        "method": method,
        "dtype": report.dtype,
        "max_abs_logit_delta": report.max_delta,
        "tolerance": report.tolerance,
        "deviation_from_4bit_adapter_model": report.deviations,
        **(extra or {}),
    }
    (tmp / "merge_report.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    rows = "\n".join(f"- `{s.path}` ({s.peft_type})" for s in sources)
    checks = "\n".join(f"- {line}" for line in report.lines()[1:])
    if report.what == "combined adapter":
        library, use = (
            "peft",
            (
                f"from transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n"
                f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
                f'model = PeftModel.from_pretrained(base, "path/to/this/dir")'
            ),
        )
    else:
        auto = "AutoModelForImageTextToText" if report.image_probe else "AutoModelForCausalLM"
        library, use = (
            "transformers",
            (f'from transformers import {auto}, AutoTokenizer\nmodel = {auto}.from_pretrained("path/to/this/dir")'),
        )
    loader = (
        'processor = AutoProcessor.from_pretrained("path/to/this/dir")  # from transformers: images + text'
        if report.image_probe
        else 'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")'
    )
    (tmp / "README.md").write_text(
        f"""---
base_model: {base}
library_name: {library}
pipeline_tag: text-generation
tags: [finetune, merged]
---

# {report.out.name}

{method} of `{base}`, written by finetune {__version__} (`finetune merge`).

## Adapters
{rows}

## Verification
{checks}

Details in `merge_report.json`. Loads with no finetune import:

```python
{use}
{loader}
```
""",
        encoding="utf-8",
    )
    from finetune.card import add_provenance

    add_provenance(tmp / "README.md", [s.path for s in sources])


# --------------------------------------------------------------------------- several adapters


def merge_adapters(
    adapter_dirs: list[str],
    out: str,
    method: str = "linear",
    weights: list[float] | None = None,
    density: float | None = None,
    into_base: bool = False,
    dtype: str = "auto",
    max_shard_size: str = "2GB",
    base: str | None = None,
    overwrite: bool = False,
    tolerance: float | None = None,
    seed: int = 0,
) -> MergeReport:
    """Combine LoRA adapters with PEFT's add_weighted_adapter: an adapter dir, or (into_base) a merged model."""
    if len(adapter_dirs) < 2:
        raise ModelDirError("--adapters: give at least two adapter dirs (for one, use `finetune merge ADAPTER_DIR`)")
    _check_shard_size(max_shard_size)
    weights = _weights(weights, len(adapter_dirs), method)
    if method in PRUNING:
        density = 0.5 if density is None else density
        if not 0.0 < density <= 1.0:
            raise ModelDirError(f"--density: {density}: must be in (0, 1]")
    elif density is not None:
        raise ModelDirError(f"--density: only applies to {', '.join(PRUNING)} (not {method})")
    sources = [inspect(d, base, what="--adapters") for d in adapter_dirs]
    for s in sources:
        _check_adapter(s, "--adapters")
    _check_compatible(sources, method)
    final = check_free(out, overwrite)

    first = sources[0]
    dtype = _output_dtype(dtype, first)
    tok = load_tokenizer(first)
    processor = image_inputs.vision_processor(first)
    batch = probe_batch(tok, processor)
    notes = []
    if any(s.quant is not None for s in sources):
        notes.append("QLoRA adapters are combined on the full-precision base")
    model = attach_adapter(load_base(first, quantized=False), first, adapter_name="a0")
    for i, s in enumerate(sources[1:], start=1):
        add_adapter(model, s, f"a{i}")
    names = [f"a{i}" for i in range(len(sources))]
    torch.manual_seed(seed)  # DARE drops at random
    try:
        model.add_weighted_adapter(names, weights, "default", combination_type=method, density=density)
    except (ValueError, NotImplementedError, RuntimeError, AttributeError) as e:
        raise ModelDirError(
            f"--adapters: peft cannot combine these adapters with {method}: {str(e).splitlines()[0]}"
        ) from None
    model.set_adapter("default")
    for n in names:
        model.delete_adapter(n)
    reference = probe_logits(model, batch)
    how = (
        f"{method} combination of {len(sources)} adapters (weights {weights}"
        + (f", density {density}" if density else "")
        + ")"
    )

    with Staged(final, overwrite) as tmp:
        if into_base:
            merged = model.merge_and_unload(safe_merge=True).to(DTYPES[dtype])
            _save_model(merged, processor or tok, tmp, max_shard_size)
            del model
            written = probe_logits(load_inference_model(str(tmp), "--out", dtype=DTYPES[dtype]), batch)
        else:
            dtype = "float32"
            model.peft_config["default"].base_model_name_or_path = first.base
            model.save_pretrained(str(tmp))
            (processor or tok).save_pretrained(str(tmp))
            del model
            reloaded = attach_adapter(load_base(first, quantized=False), inspect(tmp, first.base))
            written = probe_logits(reloaded, batch)
        scale = max_abs(reference)
        report = MergeReport(
            final,
            dtype,
            max_abs_diff(written, reference),
            _tolerance(dtype, scale, tolerance),
            scale,
            notes,
            what="merged model" if into_base else "combined adapter",
            image_probe=processor is not None,
        )
        _verify(report)
        _write_card(
            tmp,
            report,
            sources,
            method=how + (" merged into the base" if into_base else ", as one adapter"),
            extra={"combination": method, "weights": weights, "density": density, "seed": seed},
        )
    return report


def _weights(weights: list[float] | None, n: int, method: str) -> list[float]:
    """Default: an average (1/n each) for linear / cat; 1.0 each (task arithmetic) for the pruning methods."""
    if weights is None:
        return [1.0] * n if method in PRUNING else [1.0 / n] * n
    if len(weights) != n:
        raise ModelDirError(f"--weights: {len(weights)} weights for {n} adapters")
    return list(weights)


def _check_compatible(sources: list[ModelDir], method: str) -> None:
    first = sources[0]
    for s in sources[1:]:
        if s.base != first.base:
            raise ModelDirError(
                f"--adapters: {s.path} was trained on {s.base} but {first.path} on {first.base}; "
                "only adapters of the same base can be combined"
            )
        if s.peft_type != first.peft_type:
            raise ModelDirError(f"--adapters: {s.path} is {s.peft_type} but {first.path} is {first.peft_type}")
    if first.peft_type != "LORA":
        raise ModelDirError(f"--adapters: weighted merging supports LoRA adapters; these are {first.peft_type}")
    dora = [str(s.path) for s in sources if s.peft_config.get("use_dora")]
    if dora:
        raise ModelDirError(
            f"--adapters: {dora[0]}: DoRA adapters cannot be combined by peft's weighted merging; "
            "merge each into its own model instead"
        )
    ranks = {s.peft_config.get("r") for s in sources}
    if method == "linear" and len(ranks) > 1:
        raise ModelDirError(f"--adapters: linear needs adapters of one rank (got r={sorted(ranks)}); use --method cat")


def run_cli(args) -> int:
    """`finetune merge`: one adapter (ADAPTER_DIR) or several (--adapters)."""
    quiet_progress()
    if bool(args.adapter) == bool(args.adapters):
        raise ModelDirError("merge: give either ADAPTER_DIR or --adapters DIR DIR ...")
    if args.adapters:
        if args.onto:
            raise ModelDirError("--onto: applies to a single QLoRA adapter, not to --adapters")
        report = merge_adapters(
            args.adapters,
            args.out,
            args.method,
            args.weights,
            args.density,
            args.into_base,
            args.dtype,
            args.max_shard_size,
            args.base,
            args.overwrite,
            args.tolerance,
            args.seed,
        )
    else:
        for flag in ("weights", "density"):
            if getattr(args, flag) is not None:
                raise ModelDirError(f"--{flag}: applies to --adapters only")
        if args.into_base or args.method != "linear":
            raise ModelDirError("--method / --into-base: apply to --adapters only")
        report = merge(
            args.adapter,
            args.out,
            args.dtype,
            args.max_shard_size,
            args.onto,
            args.base,
            args.overwrite,
            args.tolerance,
        )
    for line in report.lines():
        print(line)
    return 0


def quiet_progress() -> None:
    """No per-file 'Loading weights' bars: merge / export print their own one-line summary."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
