"""Two CPU processes under `accelerate launch` (DDP over gloo): one output, one log, and the
loss of one process with the same global batch."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from _support import REPO, ddp_train, free_port, logged_losses, memo_recipe, run_cli_in_process

COMMON = ["train.max_steps=20", "train.report_to=[]"]
VLM = {"bf16": False, "report_to": [], "save_strategy": "no", "seed": 0}


def test_two_process_ddp_matches_one_process(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(memo_recipe(tmp_path, "lora", steps=20))
    # the one-process reference needs no process of its own: it runs in this one
    single = run_cli_in_process(
        ["train", str(recipe), f"output.dir={tmp_path / 'single'}", "train.per_device_train_batch_size=4", *COMMON],
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    ddp = ddp_train(recipe, tmp_path, f"output.dir={tmp_path / 'ddp'}", "train.per_device_train_batch_size=2", *COMMON)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("finetune: done: output in") == 1, "only the main process reports"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "memo.jsonl", "recipe.yaml", "single"]

    one, two = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "ddp")
    assert len(one) == len(two) == 20
    assert two[-1] < 0.5 * two[0], f"DDP did not learn: {two}"
    tail_one, tail_two = sum(one[-5:]) / 5, sum(two[-5:]) / 5
    assert abs(tail_two - tail_one) < 0.25 * tail_one + 0.05, f"single {one} vs ddp {two}"


def test_accelerate_launch_without_config_is_the_plain_run(tmp_path, monkeypatch):
    # accelerate launch sets OMP_NUM_THREADS for its processes when it is unset; both runs get the same
    # thread count, or the float sums of their matmuls differ in the last bits
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(memo_recipe(tmp_path, "lora", steps=5))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    commands = {
        "plain": [sys.executable],
        "launched": [*launch, "--main_process_port", str(free_port())],
    }

    def train(name: str) -> subprocess.CompletedProcess:
        command = [*commands[name], "-m", "finetune", "train", str(recipe), f"output.dir={tmp_path / name}"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as pool:  # at once, one thread each: neither waits for the other
        done = dict(zip(commands, pool.map(train, commands)))
    for name, r in done.items():
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    assert logged_losses(tmp_path / "launched") == logged_losses(tmp_path / "plain")


def test_two_process_ddp_trains_a_vision_language_model_as_one_process_does(tmp_path):
    """Images under DDP: each process opens its own batch's images (the collator), the prepared rows are shared
    through the cache, and the run is the one-process run with the same global batch."""
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "# finetune train recipe.yaml\n"
        + json.dumps(
            {
                "stage": "sft",
                "model": {"name_or_path": "tiny-vlm"},
                "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                "data": {"train": "vision_en_demo"},
                "train": {"learning_rate": 3e-3, "max_steps": 6, "max_length": 128, "logging_steps": 1, **VLM},
            }
        )
    )
    with ThreadPoolExecutor(max_workers=2) as pool:  # the one-process reference beside the two DDP processes
        single = pool.submit(
            run_cli_in_process,
            ["train", recipe, f"output.dir={tmp_path / 'single'}", "train.per_device_train_batch_size=4"],
            tmp_path,
        )
        ddp = ddp_train(recipe, tmp_path, f"output.dir={tmp_path / 'ddp'}", "train.per_device_train_batch_size=2")
        single = single.result()
    assert single.returncode == 0, single.stderr[-3000:]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("finetune: done: output in") == 1, "only the main process reports"
    one, two = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "ddp")
    assert len(two) == 6 and two[-1] < two[0], two
    # the same global batches in the same order: the per-step losses swing (3.7 -> 1.4 here) and follow each other
    # within the difference of averaging per process (a mean of per-process token means vs one token mean)
    assert all(abs(b - a) < 0.1 * a for a, b in zip(one, two, strict=True)), f"single {one} vs ddp {two}"
    adapter = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert adapter and all(".language_model." in name for name in adapter)
    moved = [name for name, w in adapter.items() if "lora_B" in name and w.abs().max() > 0]
    assert len(moved) == sum("lora_B" in name for name in adapter), "every LoRA B left zero moved"
