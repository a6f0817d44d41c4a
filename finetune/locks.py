"""One writer per output: an exclusive lock beside the output dir (or file) while a command writes it.

Two `finetune train` runs into one output dir would write into one `DIR.incomplete`, rename it
from under each other and mix their logs. So every command that writes an output (train and each
pipeline stage, the pipeline dir, merge, export, eval, score --out) first holds `.<name>.lock`
beside it. The lock is an `flock` on that file: the kernel releases it when the process ends,
however it ends (kill -9 included), so a crashed run never leaves a stale lock. The holder writes
its PID into the file, and a second command is refused in one line naming that PID. The file is
removed on release, so a finished output leaves nothing beside it (a process that dies leaves the
file, unlocked: the next command takes it over).

A lock covers what is inside its output, and a run's work dir: while `DIR` is held, no other
process takes `DIR.incomplete` (where the run writes its checkpoints), anything inside `DIR` or
`DIR.incomplete`, or `DIR` while someone holds `DIR.incomplete` (e.g. `finetune merge X --out
DIR.incomplete --overwrite` during a run of `DIR` is refused in one line: it would replace the
run's work dir from under it). Checked by probing the lock files of those paths (no new file made).

Only the main process of a distributed run locks (the other ranks write nothing of their own).
Held locks are re-entrant within one process and released by `release` / `release_all` (the CLI
releases them when a command ends) or at exit. Where `fcntl` is missing (Windows), filelock's
lock is used instead, without the PID.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.errors import OutputError, os_error_message

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_HELD: dict[Path, tuple[Path, object, Path | None]] = {}  # lock file -> (target, fd or filelock, first dir made)


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
    final = Path(target).expanduser().absolute()
    path = lock_path(final)
    if path in _HELD:
        return path
    made = None  # the outermost parent dir this lock creates: removed again on release if still empty
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            break
        made = parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _acquire(path)
    except OSError as e:
        raise OutputError(f"{what}: cannot write {final}: {os_error_message(e, path.parent)}") from None
    if handle is None:
        _remove_empty(path.parent, made)
        raise OutputError(
            f"{what}: {final} is in use by another finetune process ({_holder(path)}); wait for it "
            f"to finish, or choose another {what}"
        )
    for other, relation in _covering(final):
        if lock_path(other) not in _HELD and _held_elsewhere(lock_path(other)):
            _release(path, (final, handle, made))
            raise OutputError(
                f"{what}: {final} is {relation} {other}, in use by another finetune process "
                f"({_holder(lock_path(other))}); wait for it to finish, or choose another {what}"
            )
    _HELD[path] = (final, handle, made)
    return path


WORK_SUFFIX = ".incomplete"  # a run's work dir beside its output (finetune.outputs.RunDir)


def _covering(final: Path) -> list[tuple[Path, str]]:
    """The other outputs whose lock also covers `final`: each dir above it, the output whose work
    dir it is (or is inside), and its own work dir (a command holding that writes into it)."""
    out = [(final.with_name(final.name + WORK_SUFFIX), "the output of the work dir")]
    for p in [final, *final.parents[:-1]]:  # not the file system root: it has no name to lock
        if p != final:
            out.append((p, "inside"))
        if p.name.endswith(WORK_SUFFIX) and len(p.name) > len(WORK_SUFFIX):
            owner = p.with_name(p.name[: -len(WORK_SUFFIX)])
            out.append((owner, "the work dir of" if p == final else "inside the work dir of"))
    return out


def _held_elsewhere(path: Path) -> bool:
    """Whether another process holds the lock file `path` (probed without creating it)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing it drops the probe's shared lock
    return False


def check_free(target: str | os.PathLike, what: str = "output.dir") -> None:
    """Fail now (one line) if another process holds `target` or its location is not writable, without
    keeping the lock: for commands that take it (`hold`) only when they start writing."""
    if lock_path(target) in _HELD:
        return
    hold(target, what)
    release(target)


def _acquire(path: Path):
    """The locked fd (None if another process holds the lock). A lock file that its holder unlinked
    while we opened it is not the lock any more: open the current one again."""
    if fcntl is None:  # pragma: no cover
        from filelock import FileLock, Timeout

        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return None
        return lock
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        return f"PID {int(path.read_text(encoding='utf-8').strip())}"
    except (OSError, ValueError):
        return "PID unknown"


def held_targets() -> list[Path]:
    """The outputs this process holds, oldest first."""
    return [target for target, *_ in _HELD.values()]


def _remove_empty(d: Path, top: Path | None) -> None:
    """rmdir `d` and its parents up to `top` while they are empty (dirs the lock itself created)."""
    if top is None:
        return
    for p in [d, *d.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


def _release(path: Path, held) -> None:
    _, handle, made = held
    if isinstance(handle, int):
        try:
            path.unlink(missing_ok=True)  # before unlocking: a waiter then re-opens the new file
        finally:
            os.close(handle)
    else:  # pragma: no cover
        handle.release(force=True)
    _remove_empty(path.parent, made)


def release(target: str | os.PathLike) -> None:
    path = lock_path(target)
    held = _HELD.pop(path, None)
    if held is not None:
        _release(path, held)


def release_all() -> None:
    for path in list(_HELD):
        _release(path, _HELD.pop(path))
