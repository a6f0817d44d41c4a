"""Two CPU processes under `accelerate launch` (DDP over gloo) train the quickstart recipe:
one output, one log, and a loss comparable to one process with the same global batch."""

import subprocess
import sys

from _support import REPO, free_port, logged_losses, run_cli

RECIPE = str(REPO / "recipes" / "tiny" / "sft_lora.yaml")
COMMON = ["train.max_steps=16", "train.logging_steps=1", "data.eval_ratio=0", "train.report_to=[]"]


def test_two_process_ddp_matches_one_process(tmp_path):
    single = run_cli(["train", RECIPE, f"output.dir={tmp_path / 'single'}", "train.per_device_train_batch_size=8",
                      *COMMON], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
              "-m", "finetune", "train", RECIPE, f"output.dir={tmp_path / 'ddp'}",
              "train.per_device_train_batch_size=4", *COMMON]
    ddp = subprocess.run(launch, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("finetune: done: output in") == 1, "only the main process reports"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"], "only the outputs, nothing else"

    one, two = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "ddp")
    assert len(one) == len(two) == 16
    tail_one, tail_two = sum(one[-4:]) / 4, sum(two[-4:]) / 4
    assert tail_two < 0.85 * (sum(two[:2]) / 2), f"DDP did not learn: {two}"
    assert abs(tail_two - tail_one) < 0.15 * tail_one, f"single {tail_one:.3f} vs ddp {tail_two:.3f}"
