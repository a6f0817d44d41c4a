"""An interrupted run resumes from its last complete checkpoint and reproduces the
uninterrupted run's losses exactly; a different recipe refuses to resume it."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _support import REPO, logged_losses, memo_recipe
from transformers import TrainerCallback

from finetune import config
from finetune.errors import OutputError
from finetune.stages import sft


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


def _recipe(tmp_path, out, **train):
    text = memo_recipe(
        tmp_path,
        "lora",
        steps=6,
        adapter={"dropout": 0.1},
        train={"save_steps": 2, "learning_rate": 1e-3, **train},
        output={"dir": str(out)},
    )
    return config.load(text=text)


def test_interrupted_run_resumes_to_the_same_losses(tmp_path):
    reference = sft.run(_recipe(tmp_path, tmp_path / "reference"))

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sft.run(_recipe(tmp_path, out), callbacks=[CrashAt(5)])
    work = out.with_name(out.name + ".incomplete")
    assert not out.exists(), "a crashed run must not look finished"
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    with pytest.raises(OutputError, match="different recipe.*learning_rate"):
        sft.run(_recipe(tmp_path, out, learning_rate=2e-3))

    finished = sft.run(_recipe(tmp_path, out))
    assert finished == out and not work.exists()
    expected, got = logged_losses(reference), logged_losses(out)
    assert len(got) == len(expected) == 6
    assert got == pytest.approx(expected, abs=1e-6)


def test_resume_never_starts_over(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        sft.run(_recipe(tmp_path, out), callbacks=[CrashAt(3)])
    restarted = sft.run(_recipe(tmp_path, out, resume="never"))
    assert len(logged_losses(restarted)) == 6


# ----------------------------------------------------------------------------- kill -9, then resume (issue 15)

KILLED_RUN = """
import os, signal, sys
import torch
from finetune import config
from finetune.stages import sft

n = int(sys.argv[2])
save = torch.save
def dying_save(obj, f, *a, **k):  # SIGKILL in the middle of writing checkpoint-n: weights on disk, optimizer half
    if str(f).endswith(f"checkpoint-{n}/optimizer.pt"):
        with open(f, "wb") as fh:
            fh.write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *a, **k)
torch.save = dying_save
sft.run(config.load(sys.argv[1]))
"""


def _epoch_recipe(tmp_path, out) -> Path:
    """12 records of varied length, batch 2: 6 steps an epoch, 14 steps (2.3 epochs), a checkpoint every 4,
    the default (length-grouped) sampler, dropout on: the order and the RNG both matter."""
    import yaml

    words = ["the", "sky", "is", "blue", "and", "the", "grass", "is", "green", "while", "cats", "sleep"]
    rows = [
        {
            "messages": [
                {"role": "user", "content": " ".join(words[: 2 + i % 6]) + "?"},
                {"role": "assistant", "content": " ".join(words[i % 4 : i % 4 + 1 + (i * 7) % 9])},
            ]
        }
        for i in range(12)
    ]
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "model": {"name_or_path": "tiny-llama"},
                "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                "data": {"train": str(data), "format": "messages"},
                "train": {
                    "max_steps": 14,
                    "per_device_train_batch_size": 2,
                    "learning_rate": 1e-3,
                    "save_steps": 4,
                    "logging_steps": 3,
                    "report_to": [],
                    "bf16": False,
                    "max_length": 64,
                },
                "output": {"dir": str(out)},
            }
        ),
        encoding="utf-8",
    )
    return path


def _killed(recipe: Path, checkpoint: int) -> None:
    r = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(recipe), str(checkpoint)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]


def test_kill_9_mid_checkpoint_past_an_epoch_then_resume_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    reference = sft.run(config.load(_epoch_recipe(tmp_path, tmp_path / "reference")))

    out = tmp_path / "killed"
    recipe = _epoch_recipe(tmp_path, out)
    work = out.with_name("killed.incomplete")
    _killed(recipe, 12)  # dies writing checkpoint-12: checkpoint-8 (epoch 2 of 3) is the last complete one
    assert (work / "checkpoint-12").is_dir() and not (work / "checkpoint-12" / "trainer_state.json").exists()
    assert (work / "checkpoint-8" / "trainer_state.json").is_file() and not out.exists()
    finished = sft.run(config.load(recipe))  # resumes from checkpoint-8, inside the second epoch

    a, b = load_file(reference / "adapter_model.safetensors"), load_file(finished / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted run's"
    assert logged_losses(finished) == logged_losses(reference)
    ref_loss, got_loss = (
        json.loads((d / "all_results.json").read_text())["train_loss"] for d in (reference, finished)
    )
    assert got_loss == pytest.approx(ref_loss, rel=1e-9)  # the whole run's, not only the steps after the resume
    assert f"{ref_loss:.4g}" in (finished / "README.md").read_text(encoding="utf-8")


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    """The cause of the old inexact resume: the epoch order came from the global RNG's state."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from finetune.guards import epoch_seed

    lengths = [3, 9, 4, 7, 1, 8, 2, 6, 5, 10, 12, 11]

    def order(epoch, noise):
        torch.manual_seed(noise)  # whatever the global RNG went through before this epoch
        g = torch.Generator()
        g.manual_seed(epoch_seed(42, epoch))
        return list(LengthGroupedSampler(2, lengths=lengths, generator=g))

    assert order(1, noise=0) == order(1, noise=123)
    assert order(0, noise=0) != order(1, noise=0)


# ----------------------------------------------------------------------------- non-finite training


def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_writes_no_output(tmp_path):
    from safetensors.torch import load_file

    from finetune.guards import TrainingDiverged

    out = tmp_path / "diverged"
    recipe = config.load(
        text=memo_recipe(
            tmp_path, "lora", steps=6, train={"learning_rate": 1e30, "save_steps": 1}, output={"dir": str(out)}
        )
    )
    with pytest.raises(TrainingDiverged) as e:
        sft.run(recipe)
    message = str(e.value)
    assert "\n" not in message and "NaN" in message and "train.learning_rate 1e+30" in message
    assert not out.exists(), "a NaN adapter must never be written as a finished output"
    last = Path(message.split("the last good checkpoint is ")[1].split(" (")[0])
    assert last.parent == out.with_name("diverged.incomplete") and last.is_dir()
    weights = load_file(last / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    step = int(message.split("stopped at step ")[1].split(":")[0])
    assert last.name == f"checkpoint-{step - 1}"  # every step before the bad one was checkpointed and kept
