"""Load what `finetune eval` scores: a full model (dir, hub id or tiny name) or an adapter dir
(its base from adapter_config.json, or from the run's recipe.yaml when that path has moved)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import models
from finetune.config import ModelSection
from finetune.errors import RecipeError


@dataclass
class Loaded:
    model: object
    tokenizer: object
    name: str  # what the user gave
    base: str  # the base model path (== name's path for a full model)
    adapter: str | None = None
    train_state: Path | None = None  # trainer_state.json of a finetune output dir, if any


def _model_section(path: Path | None, name_or_path: str) -> tuple[ModelSection, str | None]:
    """The recipe's model section for a finetune output dir (chat template, dtype...), else
    defaults; and the model name the recipe gave (None without a recipe)."""
    recipe_file = path / "recipe.yaml" if path else None
    if recipe_file and recipe_file.is_file():
        import yaml

        raw = (yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}).get("model") or {}
        known = {f for f in ModelSection.__dataclass_fields__}
        section = ModelSection(**{k: v for k, v in raw.items() if k in known})
        recipe_name, section.name_or_path = section.name_or_path, name_or_path
        return section, recipe_name
    return ModelSection(name_or_path=name_or_path), None


def load(name: str, field: str = "MODEL", dtype: str = "auto", tokenizer: str | None = None):
    """(Loaded) model in eval mode + a left-padding tokenizer with a chat template (from
    `tokenizer` when given: the tuned run's, so a baseline sees the same prompts)."""
    from transformers import AutoModelForCausalLM

    path = Path(name).expanduser()
    adapter = path / "adapter_config.json" if path.is_dir() else None
    if path.is_dir() and not adapter.is_file() and not (path / "config.json").is_file():
        raise RecipeError(f"{field}: {name}: neither a model dir (config.json) nor an adapter dir (adapter_config.json)")
    if adapter is not None and adapter.is_file():
        try:
            base = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (ValueError, KeyError) as e:
            raise RecipeError(f"{adapter}: base_model_name_or_path: cannot read it ({e})") from None
        cfg, recipe_name = _model_section(path, base)
        if not Path(base).exists() and recipe_name:  # e.g. the tiny-model cache moved: use the recipe's name
            cfg.name_or_path = recipe_name
        cfg.tokenizer = str(path)  # the run saved its tokenizer (and chat template) with the adapter
    else:
        cfg, _ = _model_section(path if path.is_dir() else None, name)
    cfg.dtype = dtype if dtype != "auto" else cfg.dtype
    cfg.tokenizer = tokenizer or cfg.tokenizer
    base_path = models.resolve_reference(cfg.name_or_path, field)
    tok = models.load_tokenizer(cfg, padding_side="left")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=models.resolve_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code,
            use_safetensors=None if cfg.allow_pickle else True, revision=cfg.revision,
        )
    except OSError as e:
        raise RecipeError(f"{field}: cannot load {base_path!r}: {str(e).splitlines()[0]}") from None
    adapter_dir = None
    if adapter is not None and adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
        adapter_dir = str(path)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    state = path / "trainer_state.json" if path.is_dir() else None
    return Loaded(model, tok, name, base_path, adapter_dir, state if state and state.is_file() else None)
