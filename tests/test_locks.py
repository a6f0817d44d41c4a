"""One writer per output: a second process is refused in one line naming the holder's PID, the lock
dies with its holder (kill -9 included), and two concurrent training runs leave one intact output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _support import REPO, memo_data

from finetune import cli, locks
from finetune.errors import OutputError

HOLD = "import sys; from finetune import locks; locks.hold(sys.argv[1]); print('held', flush=True); sys.stdin.read()"


def _holder(target: Path) -> subprocess.Popen:
    """Another process holding `target`'s lock until its stdin closes (or it is killed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_naming_the_pid_and_kill_9_frees_it(tmp_path):
    target = tmp_path / "out"
    holder = _holder(target)
    try:
        with pytest.raises(
            OutputError, match=rf"output.dir: {target} is in use by another finetune process \(PID {holder.pid}\)"
        ):
            locks.hold(target)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert locks.lock_path(target).exists()  # the dead holder's file stays, unlocked by the kernel
    assert locks.hold(target) == locks.lock_path(target)
    locks.release(target)
    assert not target.exists() and not locks.lock_path(target).exists()  # nothing left beside the output


def test_a_pipeline_dir_in_use_is_refused(tmp_path, capsys):
    pipe_dir = tmp_path / "pipe"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "model": {"name_or_path": "tiny-llama"},
                "data": {"train": str(memo_data(tmp_path)), "format": "messages"},
                "train": {"max_steps": 1},
            }
        ),
        encoding="utf-8",
    )
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        yaml.safe_dump({"output": {"dir": str(pipe_dir)}, "stages": {"sft": {"recipe": str(recipe)}}}),
        encoding="utf-8",
    )
    holder = _holder(pipe_dir)
    try:
        assert cli.main(["pipeline", str(pipe)]) == 2
        assert cli.main(["train", str(recipe), "--dry-run", f"output.dir={pipe_dir}"]) == 0  # a dry run writes nothing
    finally:
        holder.stdin.close()
        holder.wait()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and f"(PID {holder.pid})" in errors[0], errors
    assert not pipe_dir.exists()


@pytest.mark.parametrize("command", ["merge", "eval", "export"])
def test_merge_eval_export_outputs_are_locked_too(tmp_path, tiny_path, capsys, command):
    out = tmp_path / ("model.gguf" if command == "export" else "out")
    adapter = tmp_path / "adapter"  # merge only reads its config before claiming --out
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "base_model_name_or_path": tiny_path}),
        encoding="utf-8",
    )
    argv = {
        "merge": ["merge", str(adapter), "--out", str(out)],
        "eval": ["eval", "tiny-llama", "--data", "alpaca_en_demo", "--out", str(out)],
        "export": ["export", tiny_path, "--out", str(out)],
    }[command]
    holder = _holder(out)
    try:
        assert cli.main(argv) == 2
    finally:
        holder.stdin.close()
        holder.wait()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and f"in use by another finetune process (PID {holder.pid})" in errors[0], errors
    assert not out.exists()


@pytest.mark.parametrize("command", ["merge", "eval", "export"])
def test_a_locked_outputs_work_dir_and_inside_are_locked_too(tmp_path, tiny_path, capsys, command):
    """While a run holds `out`, `--out out.incomplete --overwrite` (its work dir) or a path inside
    either is refused in one line and nothing there changes."""
    out = tmp_path / "out"
    work = tmp_path / "out.incomplete"
    (work / "checkpoint-1").mkdir(parents=True)
    (work / "checkpoint-1" / "trainer_state.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "base_model_name_or_path": tiny_path}),
        encoding="utf-8",
    )
    targets = (
        [work / "model.gguf", out / "model.gguf"] if command == "export" else [work, work / "checkpoint-1", out / "x"]
    )
    holder = _holder(out)
    try:
        for target in targets:
            argv = {
                "merge": ["merge", str(adapter), "--out", str(target), "--overwrite"],
                "eval": ["eval", "tiny-llama", "--data", "alpaca_en_demo", "--out", str(target), "--overwrite"],
                "export": ["export", tiny_path, "--out", str(target), "--overwrite"],
            }[command]
            assert cli.main(argv) == 2, target
            errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
            assert len(errors) == 1 and f"in use by another finetune process (PID {holder.pid})" in errors[0], errors
    finally:
        holder.stdin.close()
        holder.wait()
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name not in ("adapter", ".out.lock"))
    assert [p for p in left if not p.startswith("adapter/")] == [
        "out.incomplete",
        "out.incomplete/checkpoint-1",
        "out.incomplete/checkpoint-1/trainer_state.json",
    ]


def test_an_output_whose_work_dir_is_held_is_refused(tmp_path):
    holder = _holder(tmp_path / "out.incomplete")
    try:
        with pytest.raises(OutputError, match=rf"in use by another finetune process \(PID {holder.pid}\)"):
            locks.hold(tmp_path / "out")
    finally:
        holder.stdin.close()
        holder.wait()
    locks.hold(tmp_path / "out")  # free again
    locks.release(tmp_path / "out")


PAUSED_RUN = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from finetune import config
from finetune.stages import sft

class PauseAtFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            Path(sys.argv[2]).touch()
            deadline = time.time() + 300
            while not Path(sys.argv[3]).exists() and time.time() < deadline:
                time.sleep(0.05)

sft.run(config.load(sys.argv[1]), callbacks=[PauseAtFirstStep()])
"""


def test_two_concurrent_runs_one_refused_nothing_corrupted(tmp_path, tiny_path, capsys):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "model": {"name_or_path": "tiny-llama"},
                "data": {"train": str(memo_data(tmp_path)), "format": "messages"},
                "train": {
                    "max_steps": 3,
                    "per_device_train_batch_size": 2,
                    "report_to": [],
                    "bf16": False,
                    "logging_steps": 1,
                },
                "output": {"dir": str(out)},
            }
        ),
        encoding="utf-8",
    )
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RUN, str(recipe), str(paused), str(go)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not paused.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert paused.exists(), first.communicate()[1][-3000:]
        work = out.with_name("out.incomplete")
        before = sorted(p.name for p in work.iterdir())

        assert cli.main(["train", str(recipe)]) == 2  # the second run, while the first trains
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
        assert len(errors) == 1 and f"(PID {first.pid})" in errors[0] and str(out) in errors[0], errors
        assert sorted(p.name for p in work.iterdir()) == before  # it touched nothing
        adapter = tmp_path / "adapter"  # merge reads only its config before claiming --out
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "base_model_name_or_path": tiny_path})
        )
        assert cli.main(["merge", str(adapter), "--out", str(work), "--overwrite"]) == 2  # the run's work dir
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune: error:")]
        assert len(errors) == 1 and f"the work dir of {out}" in errors[0] and f"(PID {first.pid})" in errors[0]
        assert sorted(p.name for p in work.iterdir()) == before
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 3 and len([h for h in state["log_history"] if "loss" in h]) == 3
    assert (out / "adapter_model.safetensors").is_file() and not out.with_name("out.incomplete").exists()
