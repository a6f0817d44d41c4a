"""Disk trouble is one line naming the path and the cause: a read-only output location (every command
that writes), and a disk that fills up during a checkpoint (the run resumes once space is freed).
Both use a small tmpfs, which needs root (mount); elsewhere they skip, saying so."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from _support import memo_data, memo_recipe, missing_tool
from transformers import TrainerCallback

from finetune import cli, config, guards, locks
from finetune.stages import sft


@pytest.fixture
def tmpfs(tmp_path):
    """mount(mode, size) -> a fresh tmpfs under tmp_path; unmounted afterwards."""
    mounted = []

    def mount(size: str = "16m", read_only: bool = False) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            missing_tool(f"needs root and mount(8) to make a small tmpfs: {r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d

    if os.geteuid() != 0:
        missing_tool("needs root to mount a small tmpfs (read-only / full disk)")
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]


def test_read_only_output_location_is_one_line_for_every_command(tmp_path, tmpfs, tiny_path, capsys):
    ro = tmpfs(read_only=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(memo_recipe(tmp_path, steps=1, output={"dir": str(ro / "out")}), encoding="utf-8")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "base_model_name_or_path": tiny_path}),
        encoding="utf-8",
    )
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        yaml.safe_dump({"output": {"dir": str(ro / "pipe")}, "stages": {"sft": {"recipe": str(recipe)}}}),
        encoding="utf-8",
    )
    commands = {
        "train": ["train", str(recipe)],
        "pipeline": ["pipeline", str(pipe)],
        "merge": ["merge", str(adapter), "--out", str(ro / "merged")],
        "export": ["export", tiny_path, "--out", str(ro / "m.gguf")],
        "eval": ["eval", "tiny-llama", "--data", "alpaca_en_demo", "--max-samples", "1", "--out", str(ro / "ev")],
        "score": [
            "score",
            str(adapter),
            "--data",
            "preference_en_demo",
            "--out",
            str(ro / "s.jsonl"),
        ],  # checked first
    }
    for name, argv in commands.items():
        assert cli.main(argv) == 2, name
        errors = _error_lines(capsys)
        assert len(errors) == 1 and "read-only file system" in errors[0] and str(ro) in errors[0], (name, errors)
    assert list(ro.iterdir()) == []


class FillDiskAfterFirstCheckpoint(TrainerCallback):
    """Once checkpoint-2 is written, take all the space left, so checkpoint-4 cannot be."""

    def __init__(self, filler: Path):
        self.filler = filler

    def on_save(self, args, state, control, **kw):
        if state.global_step == 2:
            with open(self.filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass


def test_disk_full_during_a_checkpoint_names_it_and_the_run_resumes_once_space_is_freed(tmp_path, tmpfs):
    disk = tmpfs(size="24m")
    out = disk / "out"
    recipe = config.load(text=memo_recipe(tmp_path, steps=6, train={"save_steps": 2}, output={"dir": str(out)}))
    filler = disk / "filler"
    try:
        with pytest.raises((OSError, RuntimeError)) as e:
            sft.run(recipe, callbacks=[FillDiskAfterFirstCheckpoint(filler)])
        line = guards.disk_error(e.value)
    finally:
        locks.release_all()
    assert line == (
        "no space left on device while writing checkpoint-4; the run can resume from checkpoint-2 once "
        "space is freed (run the same command again)"
    ), line
    work = out.with_name("out.incomplete")
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]  # the half-written one is gone
    filler.unlink()
    finished = sft.run(recipe)
    state = json.loads((finished / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 6 and not work.exists()


def test_cli_prints_disk_full_as_one_line(tmp_path, capsys, monkeypatch):
    """The CLI's mapping, without a tmpfs: an ENOSPC from deep inside a command is one line."""
    import errno

    from finetune.stages import sft as sft_stage

    def full(recipe, callbacks=()):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "adapter_model.safetensors"))

    monkeypatch.setattr(sft_stage, "run", full)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "model": {"name_or_path": "tiny-llama"},
                "data": {"train": str(memo_data(tmp_path)), "format": "messages"},
                "output": {"dir": str(tmp_path / "out")},
            }
        ),
        encoding="utf-8",
    )
    assert cli.main(["train", str(recipe)]) == 2
    errors = _error_lines(capsys)
    assert errors == [f"finetune: error: no space left on device: {tmp_path / 'x' / 'adapter_model.safetensors'}"]


def test_eval_writes_its_history_line_only_after_its_outputs(tmp_path, capsys, monkeypatch):
    import errno

    from finetune.eval import report

    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"prediction": "Paris", "reference": "Paris"}) + "\n", encoding="utf-8")
    history = tmp_path / "eval_history.jsonl"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(report, "write", full)
    assert cli.main(["eval", "--predictions", str(preds), "--out", str(tmp_path / "ev")]) == 2
    assert len(_error_lines(capsys)) == 1
    assert not history.exists() and not (tmp_path / "ev").exists()  # no history line for an output never written
    monkeypatch.undo()
    assert cli.main(["eval", "--predictions", str(preds), "--out", str(tmp_path / "ev")]) == 0
    assert len(history.read_text(encoding="utf-8").splitlines()) == 1 and (tmp_path / "ev" / "metrics.json").is_file()


def test_a_run_failing_before_its_first_checkpoint_leaves_no_incomplete_dir(tmp_path, monkeypatch):
    """Failures that only training can find (here: a crash inside train()) must not leave `DIR.incomplete`
    holding nothing resumable."""
    import trl

    def crash(self, *a, **k):
        raise RuntimeError("simulated crash inside training")

    monkeypatch.setattr(trl.SFTTrainer, "train", crash)
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(memo_recipe(tmp_path, steps=2, output={"dir": str(out)}), encoding="utf-8")
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(["train", str(recipe)])
    assert not out.exists() and not out.with_name("out.incomplete").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
