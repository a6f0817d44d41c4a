"""Loading models and tokenizers: the one module that does it, for training and for every later use.

Three kinds of input:
- a recipe's `model` section: `load_tokenizer(recipe.model)`, `load_for_training(...)` (a tiny name is
  built, a previous stage's adapter dir merged into its base once, `merged_copy`: finetune.chain;
  QLoRA quantizes);
- an output dir (or any PEFT / transformers dir): `inspect()` -> `ModelDir` (what it holds and where an
  adapter's base is, from `outputs.OutputDir`), then `load_tokenizer(model_dir)`, `load_base()` /
  `load_inference_model()` + `attach_adapter()`, or `load_for_inference()` for all of it;
- an `rm` output dir: `load_reward_model()`, merged and frozen;
- what `finetune eval` scores (a dir, tiny name or hub id): `load_for_eval()`.

The policy lives here once: a tokenizer always has a chat template (finetune's plain one when it has
none) and a pad token; a Jinja error in a recipe's template is one line; `trust_remote_code` and
pickle loading come from the recipe the user runs or the user's flags (finetune.security), never
from a dir being read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import security, tiny
from finetune.atomic import replace_dir
from finetune.config import AdapterSection, ModelSection
from finetune.errors import FinetuneError, OutputError, RecipeError, closest
from finetune.outputs import ADAPTER_CONFIG, MERGED_STAMP, Base, OutputDir, is_merged_copy

log = logging.getLogger(__name__)

# Used only when a tokenizer has no chat template (many base models): plain role labels,
# the assistant turn closed by EOS. Saved with the output, so generation later matches.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: "
    "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelDirError(FinetuneError):
    """A model or adapter dir that cannot be used as given."""


# ----------------------------------------------------------------------------- names and dtypes


def model_path(cfg: ModelSection) -> str:
    """The path or hub id a recipe's model section loads: a built-in tiny name is built (once) and
    cached locally; a previous stage's adapter dir is merged into its base (finetune.chain: merge-first)."""
    path = resolve_reference(cfg.name_or_path, "model.name_or_path")
    out = OutputDir(path, "model.name_or_path")
    if not out.is_adapter:
        return path
    if out.task_type not in (None, "CAUSAL_LM"):
        raise RecipeError(
            f"model.name_or_path: {path} holds a {out.task_type} adapter (a reward model?), not a language model "
            "to train on"
        )
    return str(merged_copy(out))


def merged_copy(adapter: OutputDir) -> Path:
    """The adapter merged into its base (built once, cached by content: `OutputDir.merged_dir`): the
    base a stage chained on it trains on. Under a launcher one rank merges, the others find the copy."""
    from accelerate import PartialState

    target = adapter.merged_dir()
    if is_merged_copy(target):
        with contextlib.suppress(OSError):
            os.utime(target)  # last used now (`finetune cache list`, `prune --older-than`)
        return target
    with PartialState().main_process_first():
        if not is_merged_copy(target):
            _merge_into(adapter, materialize(adapter.base()), target)
    return target


def materialize(base: Base) -> str:
    """A base's path, its merged copy built first when it names one not built yet."""
    if base.unmerged is not None:
        merged_copy(base.unmerged)
    return base.where


def _merge_into(adapter: OutputDir, base: str, target: Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    log.info("chaining: merging the adapter in %s into %s (cached in %s)", adapter.path, base, target)
    security.check_adapter_weights(adapter.path, "model.allow_pickle=true")
    model = load_inference_model(base, "model.name_or_path", dtype="auto")
    model = PeftModel.from_pretrained(model, str(adapter.path))
    if not hasattr(model, "merge_and_unload"):  # prompt / prefix tuning: nothing to merge into the weights
        kind = model.peft_config["default"].peft_type
        raise RecipeError(
            f"model.name_or_path: {adapter.path} holds a {kind} adapter, which cannot be merged into "
            "its base; a stage can only start from a mergeable (LoRA-type) adapter"
        )
    model = model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer_source = adapter.path if (adapter.path / "tokenizer_config.json").is_file() else base
        # the tokenizer files as they are (no fallback template or pad token added): the merged copy is a base
        AutoTokenizer.from_pretrained(
            str(tokenizer_source), trust_remote_code=security.flags().trust_remote_code
        ).save_pretrained(tmp)
        for name in PROCESSOR_FILES:  # a vision-language model's processor: the merged copy loads as one too
            source = Path(str(tokenizer_source)) / name
            if source.is_file() and not (tmp / name).exists():
                shutil.copy2(source, tmp / name)
        stamp = {"adapter": str(adapter.path), "base": base, "fingerprint": adapter.fingerprint()}
        (tmp / MERGED_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        replace_dir(tmp, target)  # an incomplete earlier attempt is swapped out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_reference(name: str, field: str) -> str:
    """A tiny-model name, local path or hub id -> what from_pretrained loads; bad ones name the field."""
    # a path, or a name a hub id cannot be (those are `name` or `namespace/name`)
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise RecipeError(f"{field}: {name}: no such directory")
    if Path(name).expanduser().is_file():
        raise RecipeError(f"{field}: {name} is a file; give the model's directory (config.json + weights) or a hub id")
    try:
        return tiny.build_if_tiny(name)
    except ValueError as e:  # an unknown tiny-* name
        raise RecipeError(f"{field}: {e}{closest(name, tiny.TINY_MODELS)}") from None


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[name]


def quantization_config(adapter: AdapterSection):
    """bitsandbytes config for qlora; None for other methods."""
    if adapter.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    if adapter.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(adapter.compute_dtype),
        # FSDP shards parameters of one dtype: the packed 4-bit storage must match the compute dtype.
        bnb_4bit_quant_storage=resolve_dtype(adapter.compute_dtype) if _under_fsdp() else torch.uint8,
    )


def _under_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _kbit_device_map():
    """Quantized weights are placed at load time: this process's GPU, or the CPU."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


# ----------------------------------------------------------------------------- what a dir holds


@dataclass
class ModelDir:
    """A model or adapter dir, as the loader sees it: which of the two, and for an adapter the base it
    loads on (from `outputs.OutputDir`) and how that base was quantized (a QLoRA run)."""

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


def inspect(path: str | Path, base: str | None = None, what: str = "MODEL_DIR") -> ModelDir:
    """Classify `path` and resolve an adapter's base (without loading any weights): `OutputDir`
    answers what the dir holds and where its base is."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelDirError(f"{what}: {path}: no such directory")
    out = OutputDir(p, what)
    try:
        if out.is_adapter:
            model_dir = ModelDir(out.path, "adapter", out.adapter_config())
            model_dir.quant = out.quantization()
            found = out.base(base)
            model_dir.base, model_dir.base_field = materialize(found), found.field
            return model_dir
    except (RecipeError, OutputError) as e:  # an unreadable recipe.yaml, a chained base that cannot merge
        raise ModelDirError(str(e)) from None
    if out.is_model:
        if base:
            raise ModelDirError(f"--base: {path} is a full model, not an adapter; --base applies to adapter dirs")
        return ModelDir(out.path, "model")
    raise ModelDirError(f"{what}: {path}: neither a model (config.json) nor a PEFT adapter (adapter_config.json)")


# ----------------------------------------------------------------------------- the tokenizer


def load_tokenizer(model: ModelSection | ModelDir, padding_side: str | None = None):
    """The tokenizer for a recipe's model section (`model.tokenizer`, else the model; the recipe's
    `model.chat_template`, checked) or for a dir (its own: it carries the chat template it was trained
    with; else its base's). Always with a chat template and a pad token. `padding_side`: None pads a
    recipe's tokenizer on the right (training) and keeps a dir's own (export writes it back as it was)."""
    from transformers import AutoTokenizer

    if isinstance(model, ModelDir):
        own = model.has_tokenizer or model.kind == "model"
        where = str(model.path) if own else model.base
        kwargs = dict(trust_remote_code=security.flags().trust_remote_code)
        template = None
    else:
        where = resolve_reference(model.tokenizer, "model.tokenizer") if model.tokenizer else model_path(model)
        kwargs = dict(revision=model.revision, trust_remote_code=model.trust_remote_code)
        template = model.chat_template
        padding_side = padding_side or "right"
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        if isinstance(model, ModelDir):
            field = str(model.path) if own else f"{model.base_field}: base model {where}"
            hint = "" if own else "; pass --base MODEL if it lives elsewhere"
            raise ModelDirError(f"{field}: cannot load a tokenizer: {str(e).splitlines()[0]}{hint}") from None
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
        raise RecipeError(f"model.name_or_path: cannot load a tokenizer from {where!r}: {why}") from None
    if template:
        if template.endswith(".jinja") and Path(template).is_file():
            template = Path(template).read_text(encoding="utf-8")
        tok.chat_template = template
        _check_template(tok)
    elif not tok.chat_template:
        log.warning("%s has no chat template: using finetune's plain 'User:/Assistant:' template", where)
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok


def load_named_tokenizer(name: str, field: str):
    """The tokenizer of a model named by a recipe field other than model.name_or_path (a distillation
    teacher): a dir (its own tokenizer, else its base's), tiny name or hub id; errors are one line naming `field`."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return load_tokenizer(inspect(path, what=field))
        except ModelDirError as e:
            raise RecipeError(str(e)) from None
    where = resolve_reference(name, field)
    try:
        return load_tokenizer(ModelSection(name_or_path=where))
    except RecipeError as e:
        raise RecipeError(str(e).replace("model.name_or_path", field, 1)) from None


def _check_template(tok) -> None:
    """A Jinja syntax error in model.chat_template is one line, before any data is rendered with it
    (compiled by transformers itself, which knows its own tags such as {% generation %})."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except TemplateSyntaxError as e:
        raise RecipeError(f"model.chat_template: Jinja syntax error on line {e.lineno}: {e.message}") from None
    except (TemplateError, TypeError, KeyError, ValueError):
        pass  # it compiles but refuses this probe chat (tools required, no user turns...): records say so one by one


# ----------------------------------------------------------------------------- vision-language models


def is_vision_config(config) -> bool:
    """A vision-language model: its config has a vision part and transformers maps it to an image-text-to-text
    model (`AutoModelForImageTextToText`). Decided from the config, never the family's name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (
        getattr(config, "vision_config", None) is not None
        and getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def load_config(where: str, field: str = "model.name_or_path", revision: str | None = None, trust_remote_code=None):
    """A model's config (no weights): what decides text vs vision-language loading."""
    from transformers import AutoConfig

    trust = security.flags().trust_remote_code if trust_remote_code is None else trust_remote_code
    try:
        return AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{field}: cannot read the model's config from {where!r}: {_first_line(e)}") from None


def is_vision_model(cfg: ModelSection) -> bool:
    """Whether a recipe's model is a vision-language model (read from its config)."""
    return is_vision_config(
        load_config(model_path(cfg), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    )


def load_processor(model: ModelSection | ModelDir, padding_side: str | None = None):
    """The processor (image processor + tokenizer) of a vision-language model, for a recipe's model section or a
    dir, with the tokenizer policy of `load_tokenizer`: the processor's chat template is the tokenizer's too (the
    recipe's `model.chat_template` replaces both), a pad token, right padding for a recipe. Image+video families'
    processors load without torchvision (finetune.video_stub: images only)."""
    from transformers import AutoProcessor

    from finetune import video_stub

    if isinstance(model, ModelDir):
        where = (
            str(model.path)
            if model.kind == "model" or (model.path / "processor_config.json").is_file()
            else model.base
        )
        kwargs = dict(trust_remote_code=security.flags().trust_remote_code)
    else:
        where = model_path(model)
        kwargs = dict(revision=model.revision, trust_remote_code=model.trust_remote_code)
    try:
        with video_stub.images_only():
            processor = AutoProcessor.from_pretrained(where, **kwargs)
    except (OSError, ValueError, ImportError, TypeError) as e:
        field = str(model.path) if isinstance(model, ModelDir) else "model.name_or_path"
        raise RecipeError(f"{field}: cannot load the image processor of {where!r}: {_first_line(e)}") from None
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(processor, "image_processor"):
        field = str(model.path) if isinstance(model, ModelDir) else "model.name_or_path"
        raise RecipeError(
            f"{field}: {where!r} has no image processor and tokenizer pair (AutoProcessor gave "
            f"{type(processor).__name__})"
        )
    template = None if isinstance(model, ModelDir) else model.chat_template
    if template:
        if template.endswith(".jinja") and Path(template).is_file():
            template = Path(template).read_text(encoding="utf-8")
        tok.chat_template = template
        _check_template(tok)
    elif getattr(processor, "chat_template", None):
        tok.chat_template = processor.chat_template
    elif not tok.chat_template:
        raise RecipeError(
            f"model.name_or_path: {where!r} has no chat template for images; give one in model.chat_template"
        )
    processor.chat_template = tok.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    padding_side = padding_side or (None if isinstance(model, ModelDir) else "right")
    if padding_side is not None:
        tok.padding_side = padding_side
    return processor


def load_tokenizer_or_processor(model: ModelSection, data_section=None):
    """What a stage encodes its data with: the tokenizer, or for a vision-language model (by its config) the
    processor, with the recipe's image pixel limits (`data.image_max_pixels` / `image_min_pixels`) applied."""
    if not is_vision_model(model):
        if data_section is not None and (data_section.image_max_pixels or data_section.image_min_pixels):
            field = "data.image_max_pixels" if data_section.image_max_pixels else "data.image_min_pixels"
            raise RecipeError(f"{field}: {model.name_or_path} is not a vision-language model (no vision config)")
        return load_tokenizer(model)
    processor = load_processor(model)
    if data_section is not None:
        set_pixel_limits(processor, data_section.image_max_pixels, data_section.image_min_pixels)
    return processor


def set_pixel_limits(processor, max_pixels: int | None, min_pixels: int | None) -> None:
    """Resize budgets where the image processor takes them (a `max_pixels` / `min_pixels` setting, as the
    Qwen2-VL family's); elsewhere a limit is refused in one line (those processors resize to a fixed size)."""
    if max_pixels is None and min_pixels is None:
        return
    field = "data.image_max_pixels" if max_pixels is not None else "data.image_min_pixels"
    images = processor.image_processor
    accepted = getattr(getattr(type(images), "valid_kwargs", None), "__annotations__", {})
    if not {"max_pixels", "min_pixels"} <= set(accepted):
        raise RecipeError(
            f"{field}: the image processor of this model ({type(images).__name__}) takes no pixel budget (it resizes "
            "to a fixed size); remove the setting"
        )
    for name, value in (("data.image_max_pixels", max_pixels), ("data.image_min_pixels", min_pixels)):
        if value is not None and value < 1:
            raise RecipeError(f"{name}: must be a positive number of pixels, got {value}")
    if max_pixels is not None and min_pixels is not None and min_pixels > max_pixels:
        raise RecipeError(f"data.image_min_pixels: {min_pixels} is more than data.image_max_pixels={max_pixels}")
    settings = {k: v for k, v in images.to_dict().items() if k in accepted}
    settings.update({k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v is not None})
    processor.image_processor = type(images)(**settings)


def _auto_model_class(where: str, revision: str | None = None, trust_remote_code=None):
    """AutoModelForImageTextToText for a vision-language config, else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = load_config(where, revision=revision, trust_remote_code=trust_remote_code)
    except RecipeError:
        return AutoModelForCausalLM  # the model load itself reports what is wrong
    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


# ----------------------------------------------------------------------------- models


def load_for_training(
    cfg: ModelSection,
    adapter: AdapterSection,
    activation_checkpointing: bool = False,
    *,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
):
    """The base causal LM a stage trains on, quantized for qlora and prepared for k-bit training. With
    `num_labels`, a sequence classifier on the same base (a reward model: num_labels=1, a fresh `score` head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = model_path(cfg)
    quant = quantization_config(adapter)
    kwargs = dict(
        revision=cfg.revision,
        dtype=resolve_dtype(adapter.compute_dtype if quant else cfg.dtype),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=None if cfg.allow_pickle else True,
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = _kbit_device_map()
    auto_class, quiet = AutoModelForCausalLM, contextlib.nullcontext()
    if num_labels is None:
        auto_class = _auto_model_class(path, cfg.revision, cfg.trust_remote_code)
    if num_labels is not None:
        from trl.trainer.reward_trainer import suppress_seqcls_warning  # new head, unused lm_head: expected

        auto_class, quiet = AutoModelForSequenceClassification, suppress_seqcls_warning()
        kwargs.update(num_labels=num_labels, pad_token_id=pad_token_id)
    try:
        with quiet:
            model = auto_class.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError:  # model.allow_pickle: torch's weights-only loader still refuses code
        raise RecipeError(
            f"model.name_or_path: {path}: its pickled weights hold objects torch's safe loader "
            "refuses (a pickle that could run code); not loaded"
        ) from None
    except OSError as e:
        first = str(e).splitlines()[0]
        if not cfg.allow_pickle and ("safetensors" in first or "pytorch_model.bin" in first):
            first += " (only safetensors weights are loaded unless model.allow_pickle=true)"
        raise RecipeError(f"model.name_or_path: cannot load {path!r}: {first}") from None
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing)
    return model


def load_inference_model(
    where: str,
    field: str,
    dtype=torch.float32,
    quant: AdapterSection | None = None,
    revision: str | None = None,
    hint: str = "",
):
    """A causal LM (or a vision-language model, by its config) in eval mode from a dir, tiny cache or hub id
    (safetensors unless the user allows pickles), optionally quantized as its QLoRA recipe says; `hint` ends a
    load error."""
    flags = security.flags()
    kwargs = dict(
        dtype=dtype, use_safetensors=None if flags.allow_pickle else True, trust_remote_code=flags.trust_remote_code
    )
    if revision:
        kwargs["revision"] = revision
    if quant is not None:  # quantized weights are placed at load time: the GPU if there is one, else the CPU
        kwargs.update(
            quantization_config=quantization_config(quant),
            dtype=resolve_dtype(quant.compute_dtype),
            device_map={"": 0 if torch.cuda.is_available() else "cpu"},
        )
    try:
        model = _auto_model_class(where, revision, flags.trust_remote_code).from_pretrained(where, **kwargs)
    except pickle.UnpicklingError:  # --allow-pickle: torch's weights-only loader still refuses code
        raise ModelDirError(
            f"{field}: {where}: its pickled weights hold objects torch's safe loader refuses "
            "(a pickle that could run code); not loaded"
        ) from None
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{field}: cannot load model {where!r}: {str(e).splitlines()[0]}{hint}") from None
    model.eval()
    return model


def load_base(model_dir: ModelDir, dtype=torch.float32, quantized: bool = True):
    """The base an adapter dir loads on, as it was trained (4-bit for a QLoRA run unless `quantized=False`)."""
    return load_inference_model(
        model_dir.base,
        model_dir.base_field,
        dtype=dtype,
        quant=model_dir.quant if quantized else None,
        hint="; pass --base MODEL if it lives elsewhere",
    )


def attach_adapter(base_model, adapter_dir: ModelDir, adapter_name: str = "default"):
    """PeftModel of `base_model` + the adapter in `adapter_dir`; a misfit (other base) is a one-line error."""
    from peft import PeftModel
    from safetensors import SafetensorError

    security.check_adapter_weights(adapter_dir.path)
    _check_readable(adapter_dir)
    try:
        model = PeftModel.from_pretrained(base_model, str(adapter_dir.path), adapter_name=adapter_name)
    except pickle.UnpicklingError:  # an opted-in pickle that torch's weights-only loader still refuses
        raise ModelDirError(
            f"{adapter_dir.path}: adapter_model.bin holds objects torch's safe loader refuses "
            "(a pickle that could run code); not loaded"
        ) from None
    except (RuntimeError, ValueError, KeyError, SafetensorError) as e:
        raise ModelDirError(
            f"{adapter_dir.path}: the adapter does not fit base {adapter_dir.base} ({adapter_dir.base_field}): "
            f"{_first_line(e)}"
        ) from None
    _check_all_loaded(model, adapter_dir, adapter_name)
    model.eval()
    return model


def add_adapter(model, adapter_dir: ModelDir, adapter_name: str) -> None:
    from safetensors import SafetensorError

    security.check_adapter_weights(adapter_dir.path)
    _check_readable(adapter_dir)
    try:
        model.load_adapter(str(adapter_dir.path), adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError, SafetensorError) as e:
        raise ModelDirError(
            f"{adapter_dir.path}: the adapter does not fit base {adapter_dir.base}: {_first_line(e)}"
        ) from None
    _check_all_loaded(model, adapter_dir, adapter_name)


def _check_readable(adapter_dir: ModelDir) -> None:
    """A truncated or damaged adapter_model.safetensors is one line naming the file."""
    from safetensors import SafetensorError, safe_open

    f = adapter_dir.path / "adapter_model.safetensors"
    if not f.is_file():
        return
    try:
        with safe_open(str(f), framework="pt") as st:
            names = st.keys()
            for name in names:
                st.get_slice(name)
    except (SafetensorError, OSError) as e:
        raise ModelDirError(
            f"{f}: not a readable safetensors file (truncated or damaged?): {_first_line(e)}"
        ) from None


def _check_all_loaded(model, adapter_dir: ModelDir, adapter_name: str) -> None:
    """peft ignores saved adapter weights the base has no module for (e.g. layers 4-7 on a 4-layer
    base): that would merge part of the adapter without a word, so it is an error here."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    f = adapter_dir.path / "adapter_model.safetensors"
    if not f.is_file():
        return
    with safe_open(str(f), framework="pt") as st:
        saved = set(st.keys())
    loaded = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    extra = sorted(saved - loaded)
    if extra:
        raise ModelDirError(
            f"{adapter_dir.path}: the adapter does not fit base {adapter_dir.base} ({adapter_dir.base_field}): "
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
    """(model, tokenizer, model_dir) for chat: an adapter runs on its base as trained (4-bit for QLoRA)."""
    model_dir = inspect(path, base, what="MODEL_OR_ADAPTER_DIR")
    if model_dir.kind == "adapter":  # prompt-style adapters too: they run as PeftModels
        model = attach_adapter(load_base(model_dir), model_dir)
    else:
        model = load_inference_model(str(model_dir.path), "MODEL_OR_ADAPTER_DIR")
    return model, load_tokenizer(model_dir), model_dir


def load_reward_model(rm_dir: str | os.PathLike, dtype=None, merge: bool = True):
    """(model, tokenizer) of an `rm` output dir: the base as AutoModelForSequenceClassification
    (num_labels=1) with the reward adapter (LoRA + the trained score head) on it, merged into
    plain weights unless `merge=False`. Eval mode, no gradients. A QLoRA-trained reward model is
    loaded on the full-precision base (measured on the tiny model: eval margin 8.36 on the 4-bit
    base it trained on, 8.32 here; same pairwise accuracy)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    rm_dir = Path(rm_dir).expanduser().resolve()
    out = OutputDir(rm_dir, str(rm_dir))
    if not out.is_adapter:
        raise RecipeError(f"{rm_dir}: not an `rm` output dir (no {ADAPTER_CONFIG})")
    if out.task_type != "SEQ_CLS":
        raise RecipeError(f"{rm_dir}: holds a {out.task_type} adapter, not a reward model (train one with stage: rm)")
    try:
        model_dir = inspect(rm_dir, what=str(rm_dir))
    except ModelDirError as e:
        raise RecipeError(str(e)) from None
    tok = load_tokenizer(model_dir)
    from trl.trainer.reward_trainer import suppress_seqcls_warning  # the head comes from the adapter

    security.check_adapter_weights(rm_dir, "model.allow_pickle=true")
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir.base,
            num_labels=1,
            dtype=dtype or torch.float32,
            use_safetensors=True,
            pad_token_id=tok.pad_token_id,
        )
    model = PeftModel.from_pretrained(model, str(rm_dir))
    if merge:
        model = model.merge_and_unload()
    model.eval().requires_grad_(False)
    return model, tok


# ----------------------------------------------------------------------------- what `finetune eval` scores


@dataclass
class EvalModel:
    """What `finetune eval` scores: the model, its tokenizer and what the run recorded about them."""

    model: object
    tokenizer: object
    name: str  # what the user gave
    base: str  # the base model path (== name's path for a full model)
    adapter: str | None = None
    train_state: Path | None = None  # trainer_state.json of a finetune output dir, if any
    template_kwargs: dict = dataclasses.field(default_factory=dict)  # the run's model.chat_template_kwargs


def _eval_model_section(path: Path | None, name_or_path: str) -> ModelSection:
    """The recipe's model section for a finetune output dir (chat template, dtype...) pointed at
    `name_or_path`, else defaults. Its security flags are the user's (finetune.security), never the
    evaluated dir's own."""
    section = OutputDir(path).model_section() if path is not None else None
    if section is None:
        section = ModelSection(name_or_path=name_or_path)
    else:
        section.name_or_path = name_or_path
    section.trust_remote_code, section.allow_pickle = security.flags().trust_remote_code, security.flags().allow_pickle
    return section


def load_for_eval(
    name: str, field: str = "MODEL", dtype: str = "auto", tokenizer: str | None = None, base: str | None = None
) -> EvalModel:
    """What `finetune eval` scores, `name` being a full model (dir, hub id or tiny name) or an adapter
    dir: the model in eval mode + a left-padding tokenizer with a chat template (from `tokenizer` when
    given: the tuned run's, so a baseline sees the same prompts), with the run's model section (chat
    template, dtype, template kwargs) from its recipe. An adapter dir runs on its base as it was trained
    (4-bit for a QLoRA run), as merge, export and chat load it (`base`: --base, where the recorded one moved)."""
    path = Path(name).expanduser()
    model_dir = inspect(path, base, what=field) if path.is_dir() else None
    adapter = model_dir is not None and model_dir.kind == "adapter"
    if adapter:
        cfg = _eval_model_section(path, model_dir.base)
        if model_dir.has_tokenizer:  # a finetune run saved its tokenizer (and chat template) with the adapter
            cfg.tokenizer = str(path)
    else:
        cfg = _eval_model_section(path if path.is_dir() else None, name)
    cfg.dtype = dtype if dtype != "auto" else cfg.dtype
    cfg.tokenizer = tokenizer or cfg.tokenizer
    tok = load_tokenizer(cfg, padding_side="left")
    if adapter:
        base_path = model_dir.base
        model = attach_adapter(load_base(model_dir, dtype=resolve_dtype(cfg.dtype)), model_dir)
    else:
        base_path = resolve_reference(cfg.name_or_path, field)
        model = load_inference_model(base_path, field, dtype=resolve_dtype(cfg.dtype), revision=cfg.revision)
    if model_dir is None or model_dir.quant is None:  # a quantized base is placed at load time
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    state = path / "trainer_state.json" if path.is_dir() else None
    return EvalModel(
        model,
        tok,
        name,
        base_path,
        str(path) if adapter else None,
        state if state and state.is_file() else None,
        dict(cfg.chat_template_kwargs),
    )
