"""An interrupted run resumes from its last complete checkpoint and reproduces the
uninterrupted run's losses exactly; a different recipe refuses to resume it."""

import pytest
from transformers import TrainerCallback

from _support import logged_losses, memo_recipe
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
    text = memo_recipe(tmp_path, "lora", steps=6, adapter={"dropout": 0.1},
                       train={"save_steps": 2, "learning_rate": 1e-3, **train}, output={"dir": str(out)})
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
