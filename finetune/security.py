"""Who may turn on code execution and pickle loading: only the user, never a directory being read.

`trust_remote_code` runs Python shipped with a model; a pickle (`.bin`, `.pt`, `.pth`) can run code
when it is loaded. Both are off unless the user turns them on: in the recipe they run
(`model.trust_remote_code`, `model.allow_pickle`) or on the command line (`--trust-remote-code`,
`--allow-pickle`). A dir that is merged, exported, evaluated, chatted with or chained from may carry
a `recipe.yaml` saying `trust_remote_code: true`: that is data written by whoever made the dir, and
is never obeyed. The user's flags live here for the duration of one command (`user_flags`).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError


class UnsafeFileError(FinetuneError):
    """A pickle (or remote code) the user did not opt in to."""


@dataclass(frozen=True)
class Flags:
    trust_remote_code: bool = False
    allow_pickle: bool = False


_FLAGS: contextvars.ContextVar[Flags | None] = contextvars.ContextVar("finetune_security_flags", default=None)


def flags() -> Flags:
    """The user's own flags for the command being run (off unless they turned them on)."""
    return _FLAGS.get() or Flags()


@contextlib.contextmanager
def user_flags(trust_remote_code: bool = False, allow_pickle: bool = False):
    """`with user_flags(...)`: the user's flags (command line or the recipe they run) for this block."""
    token = _FLAGS.set(Flags(bool(trust_remote_code), bool(allow_pickle)))
    try:
        yield
    finally:
        _FLAGS.reset(token)


PICKLED_ADAPTER = "adapter_model.bin"
SAFE_ADAPTER = "adapter_model.safetensors"


def check_adapter_weights(adapter_dir: str | Path, flag: str = "--allow-pickle") -> None:
    """Refuse an adapter dir whose weights are only a pickle (`adapter_model.bin`) unless the user opted in;
    peft would otherwise `torch.load` it."""
    d = Path(adapter_dir)
    if (d / SAFE_ADAPTER).is_file() or not (d / PICKLED_ADAPTER).is_file():
        return
    if not flags().allow_pickle:
        raise UnsafeFileError(
            f"{d / PICKLED_ADAPTER}: the adapter's weights are a pickle, which can run code when "
            f"loaded; only safetensors are loaded unless you pass {flag} (if you trust its author)"
        )


# What transformers' Trainer unpickles (torch.load with weights_only=True) when it resumes.
CHECKPOINT_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")


def check_checkpoint(checkpoint: str | Path) -> None:
    """Load a checkpoint's pickled trainer state the way the Trainer will (torch's weights-only
    unpickler, which refuses code), so a planted or damaged file is one line naming it and the way out."""
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals  # the numpy types the Trainer's own load allows

    ckpt = Path(checkpoint)
    names = [p for p in sorted(ckpt.glob("rng_state*.pth")) if p.name != "rng_state.pth"]
    for path in [ckpt / n for n in CHECKPOINT_PICKLES] + names:
        if not path.is_file():
            continue
        try:
            with safe_globals(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's note on pickle protocols: the error below says it all
                torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            why = "it holds objects torch's safe loader refuses (a pickle that could run code)"
        except (RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
            why = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
        else:
            continue
        raise UnsafeFileError(
            f"{path}: cannot resume from this checkpoint: {why}; set train.resume=never to start "
            "over (or delete the checkpoint)"
        )
