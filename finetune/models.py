"""Tokenizer, base model (dtype, 4/8-bit) and the PEFT config of the chosen adapter method."""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path

import torch

from finetune import tiny
from finetune.config import AdapterSection, ModelSection
from finetune.errors import RecipeError, closest

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

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_path(cfg: ModelSection) -> str:
    """The path or hub id to load: a built-in tiny name is built (once) and cached locally; a
    previous stage's adapter dir is merged into its base (finetune.chain: merge-first)."""
    from finetune import chain

    return chain.resolve(resolve_reference(cfg.name_or_path, "model.name_or_path"))


def resolve_reference(name: str, field: str) -> str:
    """A tiny-model name, local path or hub id -> what from_pretrained loads; bad ones name the field."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise RecipeError(f"{field}: {name}: no such directory")
    if Path(name).expanduser().is_file():
        raise RecipeError(f"{field}: {name} is a file; give the model's directory (config.json + weights) or a hub id")
    try:
        return tiny.resolve(name)
    except ValueError as e:  # an unknown tiny-* name
        raise RecipeError(f"{field}: {e}{closest(name, tiny.TINY_MODELS)}") from None


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[name]


def load_tokenizer(cfg: ModelSection, padding_side: str = "right"):
    from transformers import AutoTokenizer

    source = resolve_reference(cfg.tokenizer, "model.tokenizer") if cfg.tokenizer else model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
        raise RecipeError(f"model.name_or_path: cannot load a tokenizer from {source!r}: {why}") from None
    if cfg.chat_template:
        template = cfg.chat_template
        if template.endswith(".jinja") and Path(template).is_file():
            template = Path(template).read_text(encoding="utf-8")
        tok.chat_template = template
        _check_template(tok)
    elif not tok.chat_template:
        log.warning("%s has no chat template: using finetune's plain 'User:/Assistant:' template", source)
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


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
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def load_model(
    cfg: ModelSection,
    adapter: AdapterSection,
    activation_checkpointing: bool = False,
    *,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
):
    """The base causal LM, quantized for qlora and prepared for k-bit training. With `num_labels`,
    a sequence classifier on the same base (a reward model: num_labels=1, a fresh `score` head)."""
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


def align_router_aux_loss(model, args) -> bool:
    """TRL treats a model whose config has `output_router_logits` as a MoE with a router load-balancing loss,
    asks the forward for it and adds `outputs.aux_loss`. A model whose forward takes no `output_router_logits`
    returns none (DeepSeek-V3 / Kimi-K2 / Moonlight balance experts with a routing bias, not an auxiliary
    loss), and TRL crashed on the missing loss. For such a model the TRL config's public switch,
    `router_aux_loss_coef`, is set to 0.0 (the config's own field cannot hold None); returns whether it was."""
    import inspect

    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", None) is None or not getattr(args, "router_aux_loss_coef", 0.0):
        return False
    if "output_router_logits" in inspect.signature(model.forward).parameters:
        return False
    args.router_aux_loss_coef = 0.0
    log.info(
        "%s returns no router load-balancing loss: trained without one (router_aux_loss_coef 0)", type(model).__name__
    )
    return True


def _kbit_device_map():
    """Quantized weights are placed at load time: this process's GPU, or the CPU."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def adapter_config(adapter: AdapterSection, model=None, **kw):
    """The PEFT config for the recipe's adapter section (None for freeze/full); see finetune.adapters."""
    from finetune import adapters

    return adapters.peft_config(adapter, model, **kw)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
