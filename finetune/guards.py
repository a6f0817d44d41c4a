"""Guards around a training run: exact resume, a stop on non-finite numbers, and disk trouble as one line.

- Exact resume. transformers' LengthGroupedSampler (the SFT default, `train_sampling_strategy:
  group_by_length`) draws each epoch's order from torch's global RNG when the epoch starts. A run
  resumed inside epoch 2 draws it from the freshly seeded RNG (the checkpoint's RNG state is only
  restored after the skipped batches), so the resumed run saw another order than the run it
  continues. `ExactResume` gives the sampler its own generator, seeded from (seed, epoch) when each
  epoch begins, through the callback's public `train_dataloader`; and it logs at every checkpoint,
  so the whole run's `train_loss` can be rebuilt after a resume (`whole_run_metrics`).
- Non-finite training. `StopOnNonFinite` checks the trainable weights after every optimizer step
  (before a checkpoint can be saved) and the logged loss / grad norm: the run stops with one line,
  its last good checkpoint kept, nothing written as finished.
- Disk trouble (`disk_error`): a full disk or a read-only location while writing is one line naming
  what was being written and what can be resumed.
"""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path

from transformers import TrainerCallback

from finetune.errors import CAUSES, FinetuneError


class TrainingDiverged(FinetuneError):
    """The loss, gradient norm or weights became NaN or infinite."""


# ----------------------------------------------------------------------------- exact resume


def _length_grouped_sampler(loader, depth: int = 4):
    """The LengthGroupedSampler inside a (prepared) train dataloader, if any."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if loader is None or depth < 0:
        return None
    if isinstance(loader, LengthGroupedSampler):
        return loader
    for attr in ("batch_sampler", "sampler", "base_dataloader"):
        found = _length_grouped_sampler(getattr(loader, attr, None), depth - 1)
        if found is not None:
            return found
    return None


def epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63)


class ExactResume(TrainerCallback):
    """Each epoch's length-grouped order from (seed, epoch) alone; a log line at every checkpoint."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator = None
        self.start_step = 0  # the step a resumed run starts from (0: a fresh run)

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        import torch

        self.start_step = state.global_step

        sampler = _length_grouped_sampler(train_dataloader)
        if sampler is not None and sampler.generator is None:
            self.generator = sampler.generator = torch.Generator()

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.generator is not None:
            epoch = math.floor((state.epoch or 0.0) + 1e-6)  # a resumed run's state.epoch is e.g. 1.05
            self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # the loss up to a checkpoint is in its log history (whole_run_metrics)
            control.should_log = True


def whole_run_metrics(trainer, result) -> dict:
    """`result.metrics` with `train_loss` over the whole run: after a resume the Trainer's own
    averages only the steps since the resume; the earlier ones are in the checkpoint's log history."""
    metrics = dict(result.metrics)
    guard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ExactResume)), None)
    start, end = (guard.start_step if guard else 0), trainer.state.global_step
    if not start or "train_loss" not in metrics or end <= start:
        return metrics
    before, last = 0.0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and entry.get("step", 0) <= start:
            before += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    if last != start:  # the history does not cover the steps before the resume: keep the Trainer's figure
        return metrics
    metrics["train_loss"] = (before + metrics["train_loss"] * (end - start)) / end
    return metrics


# ----------------------------------------------------------------------------- non-finite training


def _last_checkpoint_line(output_dir) -> str:
    from finetune.outputs import last_complete_checkpoint

    ckpt = last_complete_checkpoint(Path(output_dir))
    if ckpt is None:
        return "no checkpoint was saved before it"
    return f"the last good checkpoint is {ckpt} (train.resume=auto continues from it)"


class StopOnNonFinite(TrainerCallback):
    """Stop when the loss, the gradient norm or a trainable weight becomes NaN or infinite."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        if model is None:
            return
        params = [p for p in model.parameters() if p.requires_grad and p.numel()]
        if params and not bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()):
            name = next(
                n
                for n, p in model.named_parameters()
                if p.requires_grad and p.numel() and not bool(torch.isfinite(p.detach()).all())
            )
            self._stop(args, state, f"the trainable weight {name} became NaN or infinite")

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss",) if args.fp16 else ("loss", "grad_norm")  # fp16's loss scaler skips inf grads by design
        for key in keys:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._stop(args, state, f"the {'loss' if key == 'loss' else 'gradient norm'} became {value}")

    @staticmethod
    def _stop(args, state, what: str):
        raise TrainingDiverged(
            f"training stopped at step {state.global_step}: {what} "
            f"(train.learning_rate {args.learning_rate:g} too high?); "
            f"nothing was written as a finished output; {_last_checkpoint_line(args.output_dir)}"
        )


# ----------------------------------------------------------------------------- stop with a checkpoint

_STOP = {"requested": False, "training": False}


def request_stop(signum=None, frame=None) -> None:
    """A SIGUSR1 handler (the web UI's Stop): save a checkpoint at the end of the current step, then stop
    as Ctrl-C does, so a restart resumes from the step reached rather than from the last `save_steps`.
    Before training has begun there is nothing to save: it is Ctrl-C."""
    if not _STOP["training"]:
        raise KeyboardInterrupt
    _STOP["requested"] = True


class SaveOnStop(TrainerCallback):
    """After `request_stop`: save a checkpoint at the end of this step, then interrupt the run (the
    checkpoint is complete when `on_save` is called; the run is left interrupted, never finished)."""

    def on_train_begin(self, args, state, control, **kwargs):
        _STOP["training"] = True

    def on_train_end(self, args, state, control, **kwargs):
        _STOP["training"] = False

    def on_step_end(self, args, state, control, **kwargs):
        if _STOP["requested"]:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if _STOP["requested"]:
            raise KeyboardInterrupt(f"stopped at step {state.global_step}")


def callbacks(recipe) -> list:
    """The guards every training stage runs with."""
    return [ExactResume(recipe.train["seed"]), StopOnNonFinite(), SaveOnStop()]


# ----------------------------------------------------------------------------- disk trouble

_DISK_FULL_TEXT = ("No space left on device", "file write failed", "os error 28")


def disk_error(e: BaseException) -> str | None:
    """One line for a file-system problem (disk full, read-only, no permission, a file in the way), or
    None if `e` is not one. Inside a training run a full or read-only disk names the checkpoint being
    written and the one to resume from (a half-written checkpoint is removed)."""
    if isinstance(e, OSError) and e.errno in CAUSES:
        cause = CAUSES[e.errno]
    elif any(t in str(e) for t in _DISK_FULL_TEXT):  # torch.save / safetensors wrap ENOSPC in their own errors
        cause = CAUSES[errno.ENOSPC]
    else:
        return None
    filename = getattr(e, "filename", None)
    if getattr(e, "errno", errno.ENOSPC) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        line = _run_context(cause, getattr(e, "errno", errno.ENOSPC))
        if line:
            return line
    return f"{cause}: {filename}" if filename else cause


def _run_context(cause: str, err: int) -> str | None:
    from finetune import locks
    from finetune.outputs import last_complete_checkpoint

    for target in reversed(locks.held_targets()):
        work = target.with_name(target.name + ".incomplete")
        if not work.is_dir():
            continue
        partial = [p for p in work.glob("checkpoint-*") if p.is_dir() and not (p / "trainer_state.json").is_file()]
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        writing = partial[0].name if partial else f"the output in {work}"
        last = last_complete_checkpoint(work)
        remedy = "space is freed" if err != errno.EROFS else "the location is writable"
        then = (
            f"the run can resume from {last.name} once {remedy} (run the same command again)"
            if last
            else "no checkpoint to resume from"
        )
        return f"{cause} while writing {writing}; {then}"
    return None


def memory_error(e: BaseException) -> str | None:
    """One line for running out of (GPU or CPU) memory, or None. The run's checkpoints stay resumable."""
    text = str(e)
    if not (isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text):
        return None
    from finetune import locks
    from finetune.outputs import last_complete_checkpoint

    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)[:200]
    line = (
        f"out of memory ({first}); lower train.per_device_train_batch_size (raising "
        "train.gradient_accumulation_steps keeps the effective batch) or train.max_length"
    )
    for target in reversed(locks.held_targets()):
        last = last_complete_checkpoint(target.with_name(target.name + ".incomplete"))
        if last is not None:
            return f"{line}; {last} is kept (a changed recipe starts over: train.resume=never)"
    return line


def discard_unresumable() -> None:
    """After a failed command: remove the `DIR.incomplete` of each output this process holds that has no
    complete checkpoint (nothing to resume; a half-made dir must not linger). Resumable ones stay."""
    from finetune import locks
    from finetune.outputs import last_complete_checkpoint

    for target in locks.held_targets():
        work = target.with_name(target.name + ".incomplete")
        if work.is_dir() and last_complete_checkpoint(work) is None:
            shutil.rmtree(work, ignore_errors=True)
