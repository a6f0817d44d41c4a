"""Test-only hooks for the processes `accelerate launch` starts in tests/test_sharded.py (never shipped).

Python imports this module at start-up when this folder is on PYTHONPATH; each hook is off unless its
variable is set, and only a launched rank (LOCAL_RANK set) is touched.

- FINETUNE_TEST_CPU_FSDP=1: accelerate runs its real FSDP2 code on CPU processes over gloo. accelerate 1.15
  takes its FSDP branch only for GPU-type backends (`AcceleratorState.__init__` checks the distributed type
  `PartialState._prepare_backend` returns), so on a CPU-only machine an FSDP config silently trains DDP.
  Here `_prepare_backend` reports ("gloo", MULTI_GPU) and starts the gloo group itself (accelerate skips its
  own `init_process_group` for a `cpu` state); ACCELERATE_TORCH_DEVICE=cpu keeps the tensors on the CPU.
- FINETUNE_TEST_PROBE=DIR: after every `Accelerator.prepare` that returns a model, this rank writes what the
  model holds (each trainable parameter's full and local shape, DTensor placements, DeepSpeed partition
  sizes) to DIR/prepared-rank{RANK}.json, and logs every path it opens for writing, renames, creates or
  removes under FINETUNE_TEST_WATCH to DIR/writes-rank{RANK}.txt.
- FINETUNE_TEST_HANG_AFTER_CHECKPOINT=N (with FINETUNE_TEST_PROBE): once every rank has written checkpoint-N,
  rank 0 writes DIR/checkpoint-N.saved and every rank waits, for the test to kill the launch with SIGKILL.
- FINETUNE_TEST_FAIL=RANK:STEP: that rank raises at that training step.

tests/test_sharded.py::test_cpu_shim_tripwire fails if the library internals patched here move.
"""

import os

RANK = os.environ.get("RANK", "0")
LAUNCHED = int(os.environ.get("LOCAL_RANK", -1)) != -1


def _cpu_fsdp():
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        return "gloo", DistributedType.MULTI_GPU

    PartialState._prepare_backend = _prepare_backend
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"


def _layout(module) -> dict:
    """What each trainable parameter of `module` holds on this rank."""
    from torch.distributed.tensor import DTensor

    params = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if isinstance(p, DTensor):
            full, local, placement = list(p.shape), list(p.to_local().shape), [str(x) for x in p.placements]
        elif hasattr(p, "ds_shape"):  # ZeRO-3: the parameter is empty, this rank holds `ds_tensor`
            full, local, placement = list(p.ds_shape), [p.ds_tensor.numel()], ["zero3-partition"]
        else:
            full, local, placement = list(p.shape), list(p.shape), []
        params[name] = {"full": full, "local": local, "placements": placement}
    layout = {"type": type(module).__name__, "params": params}
    optimizer = getattr(module, "optimizer", None)  # a DeepSpeedEngine's ZeRO optimizer
    for groups in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(optimizer, groups):
            layout["zero_stage"] = module.zero_optimization_stage()
            layout["optimizer_partition_numel"] = sum(t.numel() for t in getattr(optimizer, groups))
    return layout


def _probe(folder: str):
    import json
    import sys

    import torch
    from accelerate import Accelerator

    def record(accelerator, out):
        modules = [m for m in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(m, torch.nn.Module)]
        if modules:
            layout = {
                "distributed_type": str(accelerator.distributed_type),
                "is_fsdp2": bool(getattr(accelerator, "is_fsdp2", False)),
                "world": accelerator.num_processes,
                "modules": [_layout(m) for m in modules],
            }
            with open(os.path.join(folder, f"prepared-rank{RANK}.json"), "w", encoding="utf-8") as f:
                json.dump(layout, f)
        return out

    # Trainer calls `prepare`, or `prepare_model` where transformers loaded the model sharded itself
    for method in ("prepare", "prepare_model"):
        original = getattr(Accelerator, method)
        setattr(Accelerator, method, lambda self, *a, _original=original, **k: record(self, _original(self, *a, **k)))

    watch = os.environ.get("FINETUNE_TEST_WATCH")
    if not watch:
        return
    log = os.open(os.path.join(folder, f"writes-rank{RANK}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            paths = [path] if writes else []
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in paths:
            path = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else path
            path = os.path.abspath(path) if isinstance(path, str) else ""
            if path.startswith(watch) and not path.startswith(folder):  # this hook's own files aside
                os.write(log, f"{event} {path}\n".encode())

    sys.addaudithook(audit)


def _hang_after_checkpoint(step: int, folder: str):
    import time

    import torch.distributed as dist
    from transformers import Trainer

    save = Trainer._save_checkpoint

    def save_then_hang(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.state.global_step == step:
            dist.barrier()  # every rank's part of the checkpoint is on disk
            if RANK == "0":
                open(os.path.join(folder, f"checkpoint-{step}.saved"), "w").close()
            time.sleep(3600)  # until the test kills the launch

    Trainer._save_checkpoint = save_then_hang


def _fail(rank: str, step: int):
    from transformers import Trainer

    training_step = Trainer.training_step
    calls = []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if RANK == rank and len(calls) == step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        return training_step(self, *args, **kwargs)

    Trainer.training_step = failing_step


if LAUNCHED:
    if os.environ.get("FINETUNE_TEST_CPU_FSDP") == "1":
        _cpu_fsdp()
    if os.environ.get("FINETUNE_TEST_PROBE"):
        _probe(os.environ["FINETUNE_TEST_PROBE"])
    if os.environ.get("FINETUNE_TEST_HANG_AFTER_CHECKPOINT"):
        _hang_after_checkpoint(
            int(os.environ["FINETUNE_TEST_HANG_AFTER_CHECKPOINT"]), os.environ["FINETUNE_TEST_PROBE"]
        )
    if os.environ.get("FINETUNE_TEST_FAIL"):
        _rank, _step = os.environ["FINETUNE_TEST_FAIL"].split(":")
        _fail(_rank, int(_step))
