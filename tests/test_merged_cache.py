"""Chained stages' merged bases are cached by content: identical adapters (a re-run whose
adapter_config.json lists target_modules in another order, a copy in another dir) share one copy."""

from __future__ import annotations

import json
import shutil

import torch

from finetune import loading
from finetune.outputs import OutputDir


def _adapter(tiny_path, out, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_identical_adapters_share_one_merged_copy(tmp_path, tiny_path, monkeypatch):
    first = _adapter(tiny_path, tmp_path / "run1" / "sft", seed=0)
    second = shutil.copytree(first, tmp_path / "run2" / "adapter")  # the same training, written elsewhere
    config = json.loads((second / "adapter_config.json").read_text())
    config["target_modules"] = list(reversed(config["target_modules"]))  # PEFT saves this set in any order
    (second / "adapter_config.json").write_text(json.dumps(config, indent=4))
    assert json.loads((first / "adapter_config.json").read_text())["target_modules"] != config["target_modules"]

    merges = []
    real = loading._merge_into
    monkeypatch.setattr(loading, "_merge_into", lambda *a: merges.append(a[0].path) or real(*a))
    copy = loading.merged_copy(OutputDir(first))
    assert loading.merged_copy(OutputDir(second)) == copy and merges == [first.resolve()]

    other = _adapter(tiny_path, tmp_path / "run3" / "sft", seed=1)  # other weights: another copy
    assert loading.merged_copy(OutputDir(other)) != copy and len(merges) == 2
