"""What `finetune eval` scores: a full model (dir, hub id or tiny name) or an adapter dir, loaded by
`finetune.loading` as merge, export and chat load it, with the run's model section (chat template,
dtype, template kwargs) from its recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune import security
from finetune.config import ModelSection
from finetune.outputs import OutputDir

USER_ONLY = ("trust_remote_code", "allow_pickle")  # finetune.security: never taken from the dir being read


@dataclass
class Loaded:
    model: object
    tokenizer: object
    name: str  # what the user gave
    base: str  # the base model path (== name's path for a full model)
    adapter: str | None = None
    train_state: Path | None = None  # trainer_state.json of a finetune output dir, if any
    template_kwargs: dict = field(default_factory=dict)  # the run's model.chat_template_kwargs


def _model_section(path: Path | None, name_or_path: str) -> tuple[ModelSection, str | None]:
    """The recipe's model section for a finetune output dir (chat template, dtype...) pointed at
    `name_or_path`, else defaults; and the model name the recipe gave (None without a recipe). Its
    security flags are the user's (finetune.security), never the evaluated dir's own."""
    section = OutputDir(path).model_section() if path is not None else None
    if section is None:
        section, recipe_name = ModelSection(name_or_path=name_or_path), None
    else:
        recipe_name, section.name_or_path = section.name_or_path, name_or_path
    section.trust_remote_code, section.allow_pickle = security.flags().trust_remote_code, security.flags().allow_pickle
    return section, recipe_name


def load(name: str, field: str = "MODEL", dtype: str = "auto", tokenizer: str | None = None):
    """(Loaded) model in eval mode + a left-padding tokenizer with a chat template (from
    `tokenizer` when given: the tuned run's, so a baseline sees the same prompts). An adapter
    dir runs on its base as it was trained (4-bit for a QLoRA run); all loading is `finetune.loading`'s."""
    from finetune import loading

    path = Path(name).expanduser()
    model_dir = loading.inspect(path, what=field) if path.is_dir() else None
    adapter = model_dir is not None and model_dir.kind == "adapter"
    if adapter:
        cfg, _ = _model_section(path, model_dir.base)
        if model_dir.has_tokenizer:  # a finetune run saved its tokenizer (and chat template) with the adapter
            cfg.tokenizer = str(path)
    else:
        cfg, _ = _model_section(path if path.is_dir() else None, name)
    cfg.dtype = dtype if dtype != "auto" else cfg.dtype
    cfg.tokenizer = tokenizer or cfg.tokenizer
    tok = loading.load_tokenizer(cfg, padding_side="left")
    if adapter:
        base_path = model_dir.base
        model = loading.attach_adapter(loading.load_base(model_dir, dtype=loading.resolve_dtype(cfg.dtype)), model_dir)
    else:
        base_path = loading.resolve_reference(cfg.name_or_path, field)
        model = loading.load_inference_model(
            base_path, field, dtype=loading.resolve_dtype(cfg.dtype), revision=cfg.revision
        )
    if model_dir is None or model_dir.quant is None:  # a quantized base is placed at load time
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    state = path / "trainer_state.json" if path.is_dir() else None
    return Loaded(
        model,
        tok,
        name,
        base_path,
        str(path) if adapter else None,
        state if state and state.is_file() else None,
        dict(cfg.chat_template_kwargs),
    )
