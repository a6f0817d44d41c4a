"""What finetune keeps off the terminal: transformers' per-model "Loading weights" bars and its mtime notice
(which landed inside the training bar), and the resume warning our own fractional eval_steps default caused."""

from __future__ import annotations

import sys

import yaml


def test_a_terminal_keeps_its_bars_but_not_the_loading_weights_ones(monkeypatch):
    from transformers.utils import logging as hf_logging

    from finetune import cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    previous = hf_logging.set_tqdm_hook(None)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # an earlier in-process command (piped output) may have turned them all off
    try:
        cli._quiet_libraries(False)
        assert hf_logging.tqdm(range(3), desc="Loading weights").disable
        assert not hf_logging.tqdm(range(3), desc="generating").disable
    finally:
        hf_logging.set_tqdm_hook(previous)
        if not bars_were_on:
            hf_logging.disable_progress_bar()


def test_the_mtime_notice_is_not_printed(tmp_path, capfd):
    from transformers.trainer_utils import sort_checkpoints

    from finetune import cli

    cli._quiet_libraries(False)
    for step in (10, 20):  # saved within the same second, as a tiny run does
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert sort_checkpoints(str(tmp_path), use_mtime=True)[-1].endswith("checkpoint-20")
    assert "mtime" not in capfd.readouterr().err


def test_resuming_with_the_default_eval_steps_warns_of_nothing(tmp_path, tiny_path, capfd):
    """data.eval_ratio sets eval_steps 0.1 (a share of the run); the checkpoint records the step count Trainer
    derived (30 of 300): the stage gives the TRL config that count, so resuming finds them equal."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import compare_trainer_and_checkpoint_args

    from finetune import config
    from finetune.stages.common import absolute_intervals, trl_args

    recipe = {
        "stage": "sft",
        "model": {"name_or_path": "tiny-llama"},
        "data": {"train": "alpaca_en_demo", "eval_ratio": 0.1},
        "train": {"max_steps": 300, "logging_steps": 5},
        "output": {"dir": str(tmp_path / "out")},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    r = config.load(str(tmp_path / "r.yaml"), [])
    assert r.train["eval_steps"] == 0.1  # the fractional default
    args = trl_args(r, tmp_path / "work")
    absolute_intervals(args, 300)
    saved = TrainerState(train_batch_size=args.per_device_train_batch_size)
    saved.compute_steps(args, 300)
    assert (args.eval_steps, saved.eval_steps, args.logging_steps) == (30, 30, 5)
    compare_trainer_and_checkpoint_args(args, saved)
    assert "do not match" not in capfd.readouterr().err


def test_the_stages_turn_fractional_steps_into_counts():
    """The SFT, preference and distill stages call absolute_intervals before training (the check above is theirs)."""
    import inspect

    from finetune.stages import distill, preference, sft

    assert "absolute_intervals(" in inspect.getsource(sft.run)
    assert "absolute_intervals(" in inspect.getsource(preference)
    assert "absolute_intervals(" in inspect.getsource(distill.run)
