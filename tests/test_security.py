"""Security flags come only from the user: a dir being read (evaluated, chatted with, merged, chained
from) can neither turn on trust_remote_code nor get its pickles loaded. Planted code and pickles would
write a marker file if they ever ran; each test checks that they did not, and that the same plant DOES
run once the user opts in (so the test can fail)."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from finetune import loading, security
from finetune.errors import FinetuneError


class Payload:
    """Unpickling this writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


EVIL_MODULE = """from pathlib import Path
Path({marker!r}).touch()  # runs on import: the planted code
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def planted_model(tmp_path, tiny_path) -> tuple[Path, Path]:
    """A copy of the tiny model whose config.json maps the auto classes to a planted module, and whose
    recipe.yaml claims trust_remote_code and allow_pickle."""
    d = tmp_path / "evil_model"
    shutil.copytree(tiny_path, d)
    marker = tmp_path / f"RAN-{tmp_path.name}"
    (d / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)), encoding="utf-8")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    recipe = {"model": {"name_or_path": str(d), "trust_remote_code": True, "allow_pickle": True}}
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return d, marker


def test_eval_ignores_the_evaluated_dirs_trust_remote_code(planted_model):
    d, marker = planted_model
    loaded = loading.load_for_eval(str(d), "MODEL")
    assert not marker.exists(), "eval ran code planted in the evaluated dir"
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    # the plant is live: the user's own flag runs it (and only that)
    with security.user_flags(trust_remote_code=True), contextlib.suppress(Exception):  # importing it is the point
        loading.load_for_eval(str(d), "MODEL")
    assert marker.exists(), "control: with the user's --trust-remote-code the planted module is imported"


def test_chat_and_merge_loaders_never_run_planted_code(planted_model):
    d, marker = planted_model
    model, _, source = loading.load_for_inference(d)
    assert source.kind == "model" and type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()


def _adapter(tmp_path: Path, tiny_path: str, name: str) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path / name
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(d)
    return d


def test_pickled_adapter_needs_the_users_opt_in(tmp_path, tiny_path):
    from safetensors.torch import load_file

    d = _adapter(tmp_path, tiny_path, "pickled")
    weights = load_file(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").unlink()
    torch.save(weights, d / "adapter_model.bin")  # a legitimate pickle: tensors only
    with pytest.raises(security.UnsafeFileError, match=r"adapter_model\.bin.*pickle.*--allow-pickle"):
        loading.load_for_inference(d)
    with security.user_flags(allow_pickle=True):
        model, _, _ = loading.load_for_inference(d)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert loaded and all(v.abs().sum() > 0 for v in loaded.values())  # the adapter's own (non-zero) weights


def test_malicious_pickle_never_runs_even_when_opted_in(tmp_path, tiny_path):
    d = _adapter(tmp_path, tiny_path, "evil")
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (d / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    for flags in ({}, {"allow_pickle": True}):
        with security.user_flags(**flags), pytest.raises(FinetuneError) as e:
            loading.load_for_inference(d)
        assert "\n" not in str(e.value) and "adapter_model.bin" in str(e.value)
    assert not marker.exists()


def test_resume_refuses_a_planted_checkpoint_pickle_in_one_line(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    marker = tmp_path / "PWNED"
    for name in security.CHECKPOINT_PICKLES:
        (ckpt / name).write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(security.UnsafeFileError) as e:
            security.check_checkpoint(ckpt)
        message = str(e.value)
        assert "\n" not in message and name in message and "train.resume=never" in message
        (ckpt / name).unlink()
    torch.save({"step": torch.tensor(2)}, ckpt / "scheduler.pt")  # a legitimate one passes
    security.check_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_pickled_model_weights_one_line_with_or_without_the_opt_in(tmp_path, tiny_path, capsys, command):
    from finetune import cli

    d = tmp_path / "pickled_model"
    shutil.copytree(tiny_path, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "PWNED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    argv = {
        "chat": ["chat", str(d), "--prompt", "hi"],
        "eval": ["eval", str(d), "--data", "alpaca_en_demo", "--max-samples", "1", "--out", str(tmp_path / "ev")],
    }
    for extra in ([], ["--allow-pickle"]):
        assert cli.main(argv[command] + extra) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
        assert len(errors) == 1, errors
        assert ("safe loader refuses" in errors[0]) == bool(extra), errors[0]
    assert not marker.exists()
