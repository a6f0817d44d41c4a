"""Load what a finetune (or any PEFT / transformers) output dir holds, for merge, export and chat.

A dir is either a plain model (`config.json` + weights) or a PEFT adapter (`adapter_config.json`).
What it holds and where an adapter's base is come from `outputs.OutputDir` (one priority order:
`--base`, a chained stage's recorded base, the recipe's `model.name_or_path`, the adapter config's
`base_model_name_or_path`). A QLoRA recipe (`adapter.method: qlora`) says how the base was quantized.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import models, security
from finetune.config import AdapterSection
from finetune.errors import FinetuneError, OutputError, RecipeError
from finetune.outputs import OutputDir

# Short chats every merge and export is checked on (English and Chinese, with and without a system turn).
PROBE_CHATS = [
    [{"role": "user", "content": "What colour is the sky?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name three fruits."}],
    [{"role": "user", "content": "中国的首都是哪里？"}],
]
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class SourceError(FinetuneError):
    """A model or adapter dir that cannot be used as given."""


@dataclass
class Source:
    """One model or adapter dir and what it says about itself."""

    path: Path
    kind: str  # "adapter" | "model"
    peft_config: dict | None = None
    base: str | None = None  # resolved path / hub id of an adapter's base
    base_field: str = ""  # where the base came from (for error messages)
    quant: AdapterSection | None = None  # how a QLoRA adapter's base was quantized

    @property
    def peft_type(self) -> str:
        return (self.peft_config or {}).get("peft_type", "")

    @property
    def is_prompt_learning(self) -> bool:
        return self.peft_type in PROMPT_LEARNING

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in TOKENIZER_FILES)


def inspect(path: str | Path, base: str | None = None, what: str = "MODEL_DIR") -> Source:
    """Classify `path` and resolve an adapter's base (without loading any weights): `OutputDir`
    answers what the dir holds and where its base is."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise SourceError(f"{what}: {path}: no such directory")
    out = OutputDir(p, what)
    try:
        if out.is_adapter:
            source = Source(out.path, "adapter", out.adapter_config())
            source.quant = out.quantization()
            found = out.base(base)
            source.base, source.base_field = found.where, found.field
            return source
    except RecipeError as e:  # an unreadable recipe.yaml, a chained base that cannot merge
        raise SourceError(str(e)) from None
    except OutputError as e:
        raise SourceError(str(e)) from None
    if out.is_model:
        if base:
            raise SourceError(f"--base: {path} is a full model, not an adapter; --base applies to adapter dirs")
        return Source(out.path, "model")
    raise SourceError(f"{what}: {path}: neither a model (config.json) nor a PEFT adapter (adapter_config.json)")


def load_tokenizer(source: Source):
    """The dir's own tokenizer (it carries the chat template it was trained with), else the base's."""
    from transformers import AutoTokenizer

    own = source.has_tokenizer or source.kind == "model"
    where = str(source.path) if own else source.base
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        field = str(source.path) if own else f"{source.base_field}: base model {where}"
        hint = "" if own else "; pass --base MODEL if it lives elsewhere"
        raise SourceError(f"{field}: cannot load a tokenizer: {str(e).splitlines()[0]}{hint}") from None
    if not tok.chat_template:
        tok.chat_template = models.FALLBACK_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(where: str, field: str, dtype=torch.float32, quant: AdapterSection | None = None):
    """A causal LM from a plain dir (safetensors only), optionally quantized as its QLoRA recipe says."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, use_safetensors=None if security.flags().allow_pickle else True)
    if quant is not None:  # quantized weights are placed at load time: the GPU if there is one, else the CPU
        kwargs.update(
            quantization_config=models.quantization_config(quant),
            dtype=models.resolve_dtype(quant.compute_dtype),
            device_map={"": 0 if torch.cuda.is_available() else "cpu"},
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except pickle.UnpicklingError:  # --allow-pickle: torch's weights-only loader still refuses code
        raise SourceError(
            f"{field}: {where}: its pickled weights hold objects torch's safe loader refuses "
            "(a pickle that could run code); not loaded"
        ) from None
    except (OSError, ValueError) as e:
        raise SourceError(
            f"{field}: cannot load model {where!r}: {str(e).splitlines()[0]}; pass --base MODEL if it lives elsewhere"
        ) from None
    model.eval()
    return model


def attach_adapter(base_model, source: Source, adapter_name: str = "default"):
    """PeftModel of `base_model` + the adapter in `source`; a misfit (other base) is a one-line error."""
    from peft import PeftModel
    from safetensors import SafetensorError

    security.check_adapter_weights(source.path)
    _check_readable(source)
    try:
        model = PeftModel.from_pretrained(base_model, str(source.path), adapter_name=adapter_name)
    except pickle.UnpicklingError:  # an opted-in pickle that torch's weights-only loader still refuses
        raise SourceError(
            f"{source.path}: adapter_model.bin holds objects torch's safe loader refuses "
            "(a pickle that could run code); not loaded"
        ) from None
    except (RuntimeError, ValueError, KeyError, SafetensorError) as e:
        raise SourceError(
            f"{source.path}: the adapter does not fit base {source.base} ({source.base_field}): {_first_line(e)}"
        ) from None
    _check_all_loaded(model, source, adapter_name)
    model.eval()
    return model


def add_adapter(model, source: Source, adapter_name: str) -> None:
    from safetensors import SafetensorError

    security.check_adapter_weights(source.path)
    _check_readable(source)
    try:
        model.load_adapter(str(source.path), adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError, SafetensorError) as e:
        raise SourceError(f"{source.path}: the adapter does not fit base {source.base}: {_first_line(e)}") from None
    _check_all_loaded(model, source, adapter_name)


def _check_readable(source: Source) -> None:
    """A truncated or damaged adapter_model.safetensors is one line naming the file."""
    from safetensors import SafetensorError, safe_open

    f = source.path / "adapter_model.safetensors"
    if not f.is_file():
        return
    try:
        with safe_open(str(f), framework="pt") as st:
            names = st.keys()
            for name in names:
                st.get_slice(name)
    except (SafetensorError, OSError) as e:
        raise SourceError(f"{f}: not a readable safetensors file (truncated or damaged?): {_first_line(e)}") from None


def _check_all_loaded(model, source: Source, adapter_name: str) -> None:
    """peft ignores saved adapter weights the base has no module for (e.g. layers 4-7 on a 4-layer
    base): that would merge part of the adapter without a word, so it is an error here."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    f = source.path / "adapter_model.safetensors"
    if not f.is_file():
        return
    with safe_open(str(f), framework="pt") as st:
        saved = set(st.keys())
    loaded = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    extra = sorted(saved - loaded)
    if extra:
        raise SourceError(
            f"{source.path}: the adapter does not fit base {source.base} ({source.base_field}): "
            f"{len(extra)} of its {len(saved)} weights have no module in that model (e.g. {extra[0]}); "
            "it was trained on a different model"
        )


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # torch's "Error(s) in loading state_dict" puts the useful part (size mismatch ...) on line 2
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        return lines[1]
    return lines[0] if lines else type(e).__name__


def load_for_inference(path: str | Path, base: str | None = None):
    """(model, tokenizer, source) for chat: an adapter runs on its base as trained (4-bit for QLoRA)."""
    source = inspect(path, base, what="MODEL_OR_ADAPTER_DIR")
    if source.kind == "adapter":  # prompt-style adapters too: they run as PeftModels
        base_model = load_model(source.base, source.base_field, quant=source.quant)
        model = attach_adapter(base_model, source)
    else:
        model = load_model(str(source.path), "MODEL_OR_ADAPTER_DIR")
    return model, load_tokenizer(source), source


def probe_batch(tokenizer) -> list[dict]:
    """PROBE_CHATS rendered as generation prompts (one tensor dict per chat: no padding effects)."""
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
    return out


@torch.no_grad()
def probe_logits(model, batch: list[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu() for enc in batch]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def max_abs(a: list[torch.Tensor]) -> float:
    return max(x.abs().max().item() for x in a)
