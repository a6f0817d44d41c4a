"""Shared fixtures: one tiny-model cache per session, and its tokenizer."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def finetune_cache(tmp_path_factory):
    """The tiny-model cache root: $FINETUNE_CACHE when set (reuse a prebuilt tiny model),
    else a fresh dir for this session. Subprocesses inherit it through os.environ."""
    existing = os.environ.get("FINETUNE_CACHE")
    if existing:
        yield existing
        return
    root = str(tmp_path_factory.mktemp("finetune_cache"))
    os.environ["FINETUNE_CACHE"] = root
    try:
        yield root
    finally:
        os.environ.pop("FINETUNE_CACHE", None)


@pytest.fixture(scope="session")
def tiny_path(finetune_cache) -> str:
    """Path of the built tiny-llama model dir (built once per cache root)."""
    from finetune import tiny

    return tiny.build_if_tiny("tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    """The tiny-llama tokenizer (byte-level BPE, chat template with generation markers).
    Session-scoped: copy it (copy.deepcopy) before changing it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_path, tmp_path_factory):
    """An `rm` output dir trained once per session on the demo preference pairs (tests/_support.py:
    train_tiny_rm); eval pairwise accuracy 1.0. Shared by the reward-model and RL tests: read only."""
    from _support import train_tiny_rm

    return train_tiny_rm(tmp_path_factory.mktemp("tiny_rm") / "rm")


@pytest.fixture(scope="session")
def memo_lora_dir(tiny_path, tmp_path_factory):
    """An SFT LoRA output dir that memorised tests/_support.MEMO_CHATS (30 steps, once per session); greedy
    answers are the memorised ones. Shared by the serve and web UI tests: read only."""
    from _support import memo_recipe

    from finetune import config
    from finetune.stages import sft

    root = tmp_path_factory.mktemp("memo_lora")
    (root / "recipe.yaml").write_text(memo_recipe(root, steps=30), encoding="utf-8")
    return sft.run(config.load(str(root / "recipe.yaml"), []))
