"""Sharded and multi-node training on CPU (2 gloo processes), through `accelerate launch` and the shipped
configs in recipes/accelerate/ (process count, port and `use_cpu` changed): FSDP2, DeepSpeed ZeRO-2 and ZeRO-3,
and two "machines" on localhost. What each launched rank holds after `prepare` is recorded by the test hooks
in tests/cpu_sharding/sitecustomize.py (FSDP2 on CPU needs its patch: accelerate takes its FSDP path only for
GPU-type backends). Every mode is compared with one shared DDP run of the same recipe."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _support import REPO, free_port, logged_losses, memo_recipe, preference_recipe, probe_inputs, run_cli

pytest.importorskip("deepspeed")

CONFIGS = REPO / "recipes" / "accelerate"
SHIM = Path(__file__).resolve().parent / "cpu_sharding"
STEPS = 8  # a checkpoint at step 4: the crash-and-resume runs stop there


def accelerate_config(tmp: Path, name: str, **changes) -> Path:
    """A shipped accelerate config made to run here: 2 processes, a free port, and `changes`."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg.update({"num_processes": 2, "main_process_port": free_port(), **changes})
    path = tmp / f"{Path(name).stem}-{cfg['main_process_port']}-{cfg['machine_rank']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *args]


def launch_env(probe: Path | None = None, cpu_fsdp: bool = False, out: Path | None = None, **extra: str) -> dict:
    """The launched processes' environment: the test hooks on PYTHONPATH; `probe` records what each rank holds
    after `prepare` and what it writes under `out` (the output dir and its .incomplete work dir)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SHIM), str(REPO)])}
    env.pop("FINETUNE_TEST_CPU_FSDP", None)
    if cpu_fsdp:
        env["FINETUNE_TEST_CPU_FSDP"] = "1"
    if probe is not None:
        probe.mkdir(parents=True, exist_ok=True)
        env.update(FINETUNE_TEST_PROBE=str(probe), FINETUNE_TEST_WATCH=str(out or probe.parent))
    return {**env, **extra}


def train(config: Path, recipe: Path, out: Path, *overrides: str, probe=None, cpu_fsdp=False, **extra):
    """`finetune train` under `accelerate launch --config_file config`; the finished launch."""
    return subprocess.run(
        launch_command(config, "-m", "finetune", "train", str(recipe), f"output.dir={out}", *overrides),
        cwd=recipe.parent,
        env=launch_env(probe, cpu_fsdp, out, **extra),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def crash_after_checkpoint(config: Path, recipe: Path, out: Path, probe: Path, cpu_fsdp=False):
    """Start the run, and once checkpoint-4 is on disk on every rank, kill the launcher and every rank with
    SIGKILL (no clean-up of any kind)."""
    import psutil

    launched = subprocess.Popen(
        launch_command(config, "-m", "finetune", "train", str(recipe), f"output.dir={out}"),
        cwd=recipe.parent,
        env=launch_env(probe, cpu_fsdp, out, FINETUNE_TEST_HANG_AFTER_CHECKPOINT="4"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not (probe / "checkpoint-4.saved").exists():
        assert launched.poll() is None, f"the run ended before its checkpoint: {launched.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint-4 in 600 s"
        time.sleep(0.2)
    processes = [psutil.Process(launched.pid), *psutil.Process(launched.pid).children(recursive=True)]
    for p in processes:
        p.kill()
    launched.wait(timeout=60)
    psutil.wait_procs(processes, timeout=60)
    assert not out.exists() and (out.parent / f"{out.name}.incomplete" / "checkpoint-4").is_dir()


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def probe_of(probe: Path, rank: int) -> dict:
    return json.loads((probe / f"prepared-rank{rank}.json").read_text())


def lora_params(record: dict) -> dict:
    (module,) = record["modules"]
    params = {n: p for n, p in module["params"].items() if "lora_" in n}
    assert params, module["params"].keys()
    return params


def writes(probe: Path, rank: int) -> list[str]:
    f = probe / f"writes-rank{rank}.txt"
    return f.read_text().splitlines() if f.exists() else []


def assert_only_main_writes(probe: Path, out: Path) -> None:
    """Rank 1 writes nothing but its own part of a checkpoint (its RNG state, its ZeRO shards); rank 0 writes
    the output (the audit sees it: the hook works)."""
    stray = [w for w in writes(probe, 1) if "/checkpoint-" not in w]
    assert not stray, stray
    assert any(w.endswith("adapter_config.json") for w in writes(probe, 0)), writes(probe, 0)[:20]
    assert str(out) in "\n".join(writes(probe, 0))


def assert_full_adapter_like(out: Path, reference: Path, tolerance: float) -> float:
    """Every tensor at the reference's (full) shape, and within `tolerance` of it; the largest difference."""
    ours, theirs = adapter(out), adapter(reference)
    assert ours.keys() == theirs.keys()
    worst = 0.0
    for name, t in theirs.items():
        assert ours[name].shape == t.shape, (name, ours[name].shape, t.shape)
        assert ours[name].abs().sum() > 0 or t.abs().sum() == 0, f"{name} is empty"
        worst = max(worst, (ours[name].float() - t.float()).abs().max().item())
    assert worst < tolerance, f"adapter differs from the reference by {worst}"
    return worst


def reloaded_logits(tiny_path: str, tokenizer, out: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(out)).eval()
    with torch.no_grad():
        return model(**probe_inputs(tokenizer)).logits


# ----------------------------------------------------------------------------- the shared runs


@pytest.fixture(scope="session")
def sharded_root(tmp_path_factory, tiny_path) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    (root / "sft.yaml").write_text(
        memo_recipe(root, steps=STEPS, train={"per_device_train_batch_size": 2, "save_steps": 4})
    )
    return root


@pytest.fixture(scope="session")
def ddp_run(sharded_root) -> Path:
    """The reference: the recipe as 2-process DDP (recipes/accelerate/cpu_ddp.yaml)."""
    out = sharded_root / "ddp"
    done = train(accelerate_config(sharded_root, "cpu_ddp.yaml"), sharded_root / "sft.yaml", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def fsdp2_run(sharded_root):
    """recipes/accelerate/fsdp.yaml through the CPU shim, uninterrupted: (output, probe dir, launch)."""
    out, probe = sharded_root / "fsdp2", sharded_root / "probe-fsdp2"
    config = accelerate_config(sharded_root, "fsdp.yaml")
    done = train(config, sharded_root / "sft.yaml", out, probe=probe, cpu_fsdp=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, probe, done


@pytest.fixture(scope="session")
def zero3_run(sharded_root):
    """recipes/accelerate/deepspeed_zero3.yaml as shipped (mixed_precision bf16; the recipe says fp32)."""
    out, probe = sharded_root / "zero3", sharded_root / "probe-zero3"
    done = train(accelerate_config(sharded_root, "deepspeed_zero3.yaml"), sharded_root / "sft.yaml", out, probe=probe)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, probe, done


# ----------------------------------------------------------------------------- fast checks (no launch)


def test_cpu_shim_tripwire():
    """The library internals tests/cpu_sharding/sitecustomize.py patches or relies on are where it expects
    them: if accelerate or transformers move them, this fails before the sharded tests mislead."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from transformers import Trainer

    assert list(inspect.signature(PartialState._prepare_backend).parameters) == [
        "self",
        "cpu",
        "sagemaker_dp",
        "backend",
    ]
    state_init = inspect.getsource(PartialState.__init__)
    assert "self._prepare_backend(cpu, use_sagemaker_dp, original_backend)" in state_init
    assert 'os.environ.get("ACCELERATE_TORCH_DEVICE", None)' in state_init
    # the FSDP branch is taken for GPU-type distributed types only (what the shim's MULTI_GPU unlocks)
    accelerator_init = inspect.getsource(AcceleratorState.__init__)
    gpu_branch = accelerator_init.index("DistributedType.MULTI_GPU,")
    assert gpu_branch < accelerator_init.index("self.distributed_type = DistributedType.FSDP")
    assert DistributedType.MULTI_GPU.value == "MULTI_GPU"
    assert callable(Accelerator.prepare) and callable(Accelerator.prepare_model)
    assert callable(Trainer.training_step) and callable(Trainer._save_checkpoint)


def test_count_never_builds_under_zero_init(tiny_path, tmp_path, monkeypatch):
    """Regression: with a ZeRO-3 config registered (what accelerate does under deepspeed_zero3.yaml), the
    meta-device parameter count ran inside deepspeed.zero.Init and failed ('Cannot copy out of meta tensor')."""
    from transformers.integrations import HfDeepSpeedConfig

    from finetune import config
    from finetune.stages.common import count_adapter_parameters

    port = str(free_port())
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        recipe = config.load(text=memo_recipe(tmp_path, steps=2))
        assert count_adapter_parameters(recipe) == (155_648, 1_336_448)
    finally:
        del registered
        if torch.distributed.is_initialized():  # only if zero.Init ran (the bug)
            torch.distributed.destroy_process_group()


def test_precision_rule_recipe_wins(tiny_path, tmp_path, monkeypatch, caplog):
    """An accelerate config's mixed_precision that differs from the recipe's is overridden, in one log line
    naming both; 'no' in the config is no conflict."""
    from finetune import config
    from finetune.stages.common import trl_args

    recipe = config.load(text=memo_recipe(tmp_path, steps=2))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    finetune_log = logging.getLogger("finetune")  # an in-process CLI test may have stopped its propagation
    monkeypatch.setattr(finetune_log, "handlers", [*finetune_log.handlers, caplog.handler])
    with caplog.at_level(logging.WARNING, logger="finetune"):
        args = trl_args(recipe, tmp_path / "never")
    assert not args.bf16 and args.mixed_precision == "no" and os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    (line,) = {r.getMessage() for r in caplog.records if "precision" in r.getMessage()}  # seen once or twice
    assert "train.bf16=false" in line and "mixed_precision: bf16 is overridden" in line
    caplog.clear()
    recipe = config.load(text=memo_recipe(tmp_path, steps=2, train={"bf16": True}))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert trl_args(recipe, tmp_path / "never").bf16
    assert not [r for r in caplog.records if "precision" in r.getMessage()]  # 'no' never conflicts


def test_fsdp1_is_refused_in_one_line(tiny_path, tmp_path, monkeypatch):
    (tmp_path / "r.yaml").write_text(memo_recipe(tmp_path, steps=2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    done = run_cli(["train", str(tmp_path / "r.yaml"), "--dry-run"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fsdp_version is 1 (FSDP1)" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_plan_warns_fsdp_without_sharding(sharded_root):
    """fsdp.yaml on a CPU machine (no shim): the dry-run plan says it trains as DDP, in one warning line."""
    config = accelerate_config(sharded_root, "fsdp.yaml")
    plan = subprocess.run(
        launch_command(config, "-m", "finetune", "train", str(sharded_root / "sft.yaml"), "--dry-run"),
        cwd=sharded_root,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    text = plan.stdout + plan.stderr
    assert "distributed    DDP, 2 processes on 1 machine, batch 2 per device x 1 accumulation x 2 = 4" in text
    assert "FSDP on CPU: the accelerate config asks for FSDP" in text and "this trains as DDP" in text


# ----------------------------------------------------------------------------- FSDP2


def test_fsdp2_shards_lora_and_matches_ddp(fsdp2_run, ddp_run, tiny_path, tiny_tokenizer):
    out, probe, done = fsdp2_run
    records = [probe_of(probe, rank) for rank in (0, 1)]
    for record in records:
        assert record["distributed_type"] == "DistributedType.FSDP" and record["is_fsdp2"], record
    for name, p in lora_params(records[0]).items():  # rows split between the ranks: Shard(0) on a 2-rank mesh
        q = lora_params(records[1])[name]
        assert p["placements"] == q["placements"] == ["S(0)"], (name, p)
        assert p["local"][0] + q["local"][0] == p["full"][0] and p["local"][0] == math.ceil(p["full"][0] / 2)
    assert "parallel    FSDP2, 2 processes on 1 machine" in done.stderr
    losses = logged_losses(out)
    assert len(losses) == STEPS and losses[-1] < 0.5 * losses[0], losses
    assert_full_adapter_like(out, ddp_run, 1e-4)
    logits = reloaded_logits(tiny_path, tiny_tokenizer, out)
    torch.testing.assert_close(logits, reloaded_logits(tiny_path, tiny_tokenizer, ddp_run), atol=1e-4, rtol=0)
    assert_only_main_writes(probe, out)


def test_fsdp2_crash_and_resume_is_exact(fsdp2_run, sharded_root):
    """kill -9 after checkpoint-4, then the same command: the uninterrupted run's adapter, bit for bit (what
    accelerate's adapter-only FSDP checkpoints got wrong before PR 4206)."""
    out, probe = sharded_root / "fsdp2-crash", sharded_root / "probe-fsdp2-crash"
    config = accelerate_config(sharded_root, "fsdp.yaml")
    crash_after_checkpoint(config, sharded_root / "sft.yaml", out, probe, cpu_fsdp=True)
    resumed = train(config, sharded_root / "sft.yaml", out, cpu_fsdp=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out.parent / out.name}.incomplete/checkpoint-4" in resumed.stderr
    assert logged_losses(out) == logged_losses(fsdp2_run[0])
    ours, uninterrupted = adapter(out), adapter(fsdp2_run[0])
    assert all(torch.equal(ours[k], uninterrupted[k]) for k in uninterrupted)


# ----------------------------------------------------------------------------- DeepSpeed


def test_zero3_shards_lora_and_matches_ddp(zero3_run, ddp_run, tiny_path, tiny_tokenizer):
    out, probe, done = zero3_run
    for rank in (0, 1):
        record = probe_of(probe, rank)
        assert record["distributed_type"] == "DistributedType.DEEPSPEED", record
        assert record["modules"][0]["zero_stage"] == 3
        for name, p in lora_params(record).items():  # each rank holds half of every parameter
            assert p["placements"] == ["zero3-partition"] and p["local"] == [math.prod(p["full"]) // 2], (name, p)
    assert "parallel    ZeRO-3, 2 processes on 1 machine" in done.stderr
    assert "mixed_precision: bf16 is overridden" in done.stderr  # the shipped config's bf16 vs the fp32 recipe
    losses = logged_losses(out)
    assert losses[-1] < 0.5 * losses[0], losses
    assert_full_adapter_like(out, ddp_run, 1e-3)  # DeepSpeed reduces in its own order: 1.05e-4 measured
    torch.testing.assert_close(
        reloaded_logits(tiny_path, tiny_tokenizer, out),
        reloaded_logits(tiny_path, tiny_tokenizer, ddp_run),
        atol=1e-3,
        rtol=0,
    )
    assert_only_main_writes(probe, out)


def test_zero3_crash_and_resume_is_exact(zero3_run, sharded_root):
    out, probe = sharded_root / "zero3-crash", sharded_root / "probe-zero3-crash"
    config = accelerate_config(sharded_root, "deepspeed_zero3.yaml")
    crash_after_checkpoint(config, sharded_root / "sft.yaml", out, probe)
    resumed = train(config, sharded_root / "sft.yaml", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out.parent / out.name}.incomplete/checkpoint-4" in resumed.stderr
    assert logged_losses(out) == logged_losses(zero3_run[0])
    ours, uninterrupted = adapter(out), adapter(zero3_run[0])
    assert all(torch.equal(ours[k], uninterrupted[k]) for k in uninterrupted)


def test_zero2_shards_optimizer_state_and_matches_ddp(sharded_root, ddp_run):
    out, probe = sharded_root / "zero2", sharded_root / "probe-zero2"
    done = train(accelerate_config(sharded_root, "deepspeed_zero2.yaml"), sharded_root / "sft.yaml", out, probe=probe)
    assert done.returncode == 0, done.stderr[-3000:]
    trainable = sum(t.numel() for t in adapter(ddp_run).values())
    for rank in (0, 1):
        record = probe_of(probe, rank)
        module = record["modules"][0]
        assert record["distributed_type"] == "DistributedType.DEEPSPEED" and module["zero_stage"] == 2
        assert all(p["local"] == p["full"] for p in lora_params(record).values())  # weights replicated
        assert module["optimizer_partition_numel"] == trainable // 2  # fp32 master weights + Adam state: half
    assert "parallel    ZeRO-2, 2 processes on 1 machine" in done.stderr
    losses = logged_losses(out)
    assert losses[-1] < 0.5 * losses[0], losses
    assert_full_adapter_like(out, ddp_run, 1e-3)
    assert_only_main_writes(probe, out)


# ----------------------------------------------------------------------------- two machines, failures


def test_two_machines_on_localhost_equal_ddp(sharded_root, ddp_run):
    """recipes/accelerate/multi_node.yaml as two 'machines' of one process each (static rendezvous on
    127.0.0.1): the same adapter as DDP on one machine, one output, written by machine 0."""
    out = sharded_root / "two-machines"
    port = free_port()
    launches = []
    for rank in (0, 1):
        config = accelerate_config(
            sharded_root,
            "multi_node.yaml",
            machine_rank=rank,
            main_process_ip="127.0.0.1",
            main_process_port=port,
            use_cpu=True,
        )
        command = launch_command(
            config, "-m", "finetune", "train", str(sharded_root / "sft.yaml"), f"output.dir={out}"
        )
        launches.append(
            subprocess.Popen(
                command,
                cwd=sharded_root,
                env=launch_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [(p.wait(timeout=600), *p.communicate()) for p in launches]
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "parallel    DDP, 2 processes on 2 machines" in results[0][2]
    assert "finetune: done: output in" in results[0][2] and "finetune: done" not in results[1][2]
    assert_full_adapter_like(out, ddp_run, 1e-6)


def test_a_failing_rank_stops_the_launch_with_its_error(sharded_root):
    """Rank 1 raises at step 2: the launch exits non-zero, promptly (no hang until ddp_timeout), and its
    output carries rank 1's message."""
    out = sharded_root / "fails"
    started = time.monotonic()
    done = train(
        accelerate_config(sharded_root, "cpu_ddp.yaml"),
        sharded_root / "sft.yaml",
        out,
        FINETUNE_TEST_FAIL="1:2",
    )
    assert done.returncode != 0
    assert "injected failure on rank 1 at step 2" in done.stderr
    assert time.monotonic() - started < 300, "the other rank hung"
    assert not out.exists()


# ----------------------------------------------------------------------------- DPO and QLoRA


@pytest.fixture(scope="session")
def dpo_recipe(sharded_root) -> Path:
    path = sharded_root / "dpo.yaml"
    train_section = {"max_steps": 6, "per_device_train_batch_size": 4, "eval_strategy": "no", "logging_steps": 1}
    path.write_text(preference_recipe(sharded_root / "unused", "dpo", data={"eval_ratio": 0}, train=train_section))
    return path


@pytest.fixture(scope="session")
def dpo_zero3(sharded_root, dpo_recipe) -> Path:
    out = sharded_root / "dpo-zero3"
    done = train(accelerate_config(sharded_root, "deepspeed_zero3.yaml"), dpo_recipe, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_dpo_under_fsdp2_and_zero3_agree(sharded_root, dpo_recipe, dpo_zero3, tiny_path, tiny_tokenizer):
    """DPO's reference model is the policy with its adapter disabled (TRL): under both sharded modes the
    implicit reward margin grows, and the two adapters agree."""
    from _support import log_series

    out, probe = sharded_root / "dpo-fsdp2", sharded_root / "probe-dpo-fsdp2"
    done = train(accelerate_config(sharded_root, "fsdp.yaml"), dpo_recipe, out, probe=probe, cpu_fsdp=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(p["placements"] == ["S(0)"] for p in lora_params(probe_of(probe, 0)).values())
    for run in (out, dpo_zero3):
        losses, margins = logged_losses(run), log_series(run, "rewards/margins")
        assert losses[-1] < losses[0] and margins[-1] > margins[0], (run.name, losses, margins)
    assert_full_adapter_like(out, dpo_zero3, 1e-4)
    reloaded_logits(tiny_path, tiny_tokenizer, out)


def test_qlora_fsdp2_matches_qlora_ddp(sharded_root):
    """QLoRA under FSDP2 (4-bit base weights stored as bnb_4bit_quant_storage): the adapter of QLoRA under DDP."""
    recipe = sharded_root / "qlora.yaml"
    recipe.write_text(
        memo_recipe(sharded_root, "qlora", steps=4, train={"per_device_train_batch_size": 2, "save_steps": 100})
    )
    ddp, fsdp2, probe = sharded_root / "qlora-ddp", sharded_root / "qlora-fsdp2", sharded_root / "probe-qlora"
    done = train(accelerate_config(sharded_root, "cpu_ddp.yaml"), recipe, ddp)
    assert done.returncode == 0, done.stderr[-3000:]
    done = train(accelerate_config(sharded_root, "fsdp.yaml"), recipe, fsdp2, probe=probe, cpu_fsdp=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(p["placements"] == ["S(0)"] for p in lora_params(probe_of(probe, 1)).values())
    losses = logged_losses(fsdp2)
    assert losses[-1] < losses[0], losses
    assert_full_adapter_like(fsdp2, ddp, 1e-4)


def test_gpu_bench_refuses_without_cuda_in_one_line(tmp_path):
    """bench/gpu.sh on a machine without CUDA: one line, exit status 2, nothing prepared."""
    env = {**os.environ, "BENCH_DIR": str(tmp_path / "bench"), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on one
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "bench/gpu.sh: no CUDA GPU is visible (torch.cuda.is_available() is False): nothing to run"
    ], done.stderr
    assert not (tmp_path / "bench").exists()
