"""The training stages, one module each (`config.STAGES` is the registry): `run(recipe) -> Path`
trains and returns the output dir, `plan(recipe)` is the dry run."""

from __future__ import annotations

import importlib


def module(stage: str):
    """The module of a stage named in `config.STAGES` (imported on demand: each pulls in its TRL trainer)."""
    from finetune.config import STAGES

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    return importlib.import_module(f"{__name__}.{stage}")
