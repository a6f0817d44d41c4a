"""One writer per output: an exclusive lock beside the output dir (or file) while a command writes it.

Two `finetune train` runs into one output dir would write into one `DIR.incomplete`, rename it
from under each other and mix their logs. So every command that writes an output (train and each
pipeline stage, the pipeline dir, merge, export, eval) first holds `.<name>.lock` beside it. The
lock is `filelock`'s flock-based lock: the kernel releases it when the process ends, however it
ends (kill -9 included), so a crashed run never leaves a stale lock. The holder writes its PID
into `.<name>.lock.pid`, and a second command is refused in one line naming that PID.

Only the main process of a distributed run locks (the other ranks write nothing of their own).
Held locks are re-entrant within one process and released by `release` / `release_all` (the CLI
releases them when a command ends) or at exit.
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

from finetune.errors import OutputError

_HELD: dict[Path, tuple[Path, FileLock]] = {}  # lock file -> (target, lock), in the order taken


def lock_path(target: str | os.PathLike) -> Path:
    final = Path(target).expanduser().absolute()
    return final.with_name(f".{final.name}.lock")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def hold(target: str | os.PathLike, what: str = "output.dir") -> Path | None:
    """Take the exclusive lock of `target` for this process (a no-op if it already holds it, or on
    a non-main rank); refuse in one line if another process holds it. Returns the lock file."""
    if not _is_main_process():
        return None
    path = lock_path(target)
    if path in _HELD:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=0)
        lock.acquire()
    except Timeout:
        raise OutputError(f"{what}: {Path(target).expanduser().absolute()} is in use by another finetune process "
                          f"({_holder(path)}); wait for it to finish, or choose another {what}") from None
    except OSError as e:
        from finetune.guards import os_error_message  # lazy: guards imports torch

        raise OutputError(f"{what}: cannot write {Path(target).expanduser().absolute()}: "
                          f"{os_error_message(e, path.parent)}") from None
    _HELD[path] = (Path(target).expanduser().absolute(), lock)
    try:
        tmp = path.with_name(path.name + ".pid.tmp")
        tmp.write_text(f"{os.getpid()}\n", encoding="utf-8")
        os.replace(tmp, path.with_name(path.name + ".pid"))
    except OSError:
        pass  # the PID is only for the message of a refused second run
    return path


def _holder(path: Path) -> str:
    try:
        pid = int(path.with_name(path.name + ".pid").read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return "PID unknown"
    return f"PID {pid}"


def held_targets() -> list[Path]:
    """The outputs this process holds, oldest first."""
    return [target for target, _ in _HELD.values()]


def release(target: str | os.PathLike) -> None:
    held = _HELD.pop(lock_path(target), None)
    if held is not None:
        held[1].release(force=True)


def release_all() -> None:
    for path in list(_HELD):
        _HELD.pop(path)[1].release(force=True)
