"""The prepared-data cache: encoded datasets on disk (Arrow, memory-mapped), keyed by everything
that changes them, built once per node and shared by every rank and every re-run.

Key (`key_of`): the source's content fingerprint, the format, column map, system prompt and
max_samples, the tokenizer (its full serialized state and chat template), the encode options
(template kwargs, train_on), max_length and truncation, and the encoder version
(`finetune.data.encode.ENCODER_VERSION`). The finetune version is not part of it: a release
that changes labels bumps ENCODER_VERSION instead.

Source fingerprint: a streaming xxh3-128 of the file's bytes (plus its size), so a file edited
in place within the same second (same size, same mtime) is still a different source. xxh3 reads
at several GB/s, so a 1 GB file costs well under a second on a warm start. A folder: every file's
relative path and content. A hub id: the fingerprint `datasets` gives the loaded split (its own
cache identity, which follows the hub revision).

Layout: `$FINETUNE_DATA_CACHE/<key>/` (default `<finetune cache root>/data/<key>/`) holds
`meta.json` (what it holds) and the Arrow files `datasets.map` wrote (one per encoding process,
concatenated in order when loaded), plus `keep.npy` when rows were dropped. An entry is built
in `.tmp-<key>-<host>-<pid>/` beside it and renamed into place when complete, so an interrupted
preparation never looks like a finished one.

Checked on open: `meta.json` records every file's size and xxh3-128; the process that opens an
entry checks them (once per process; xxh3 reads at memory speed, a few times the cost of the
source fingerprint already taken). A damaged entry (a truncated Arrow file, an unreadable
`meta.json`, a missing file) is one warning and a rebuild, never a traceback.

Read-only roots: an entry found complete and intact in a root this process cannot write is used
read-only (no lock: nothing there can change). A read-only root without the entry: the data is
encoded without caching, into a temp dir of this process (as with data.cache: off), with one
warning; `finetune data prepare` refuses such a root in one line instead (it exists to write it).

Workers: the processes `datasets.map` forks to encode (and its manager) are killed by the
kernel when the process that prepares the data ends, however it ends (kill -9 included:
Linux's PR_SET_PDEATHSIG), so no worker outlives a killed preparation.

Ranks: the local main process of each node (LOCAL_RANK 0) takes a file lock and builds or
finds the entry; the other ranks poll the file system for the finished entry (no collective,
so no NCCL/gloo timeout however long encoding takes). With a cache dir on a shared file system,
the lock makes the first node's main process build and the others wait for it; with a node-local
cache dir, each node builds its own copy. If the main process fails on bad data, it leaves an
`.error` note that the waiting ranks raise too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("finetune")

LAYOUT_VERSION = 2  # of the entry format on disk (2: meta.json records each file's size and hash)
POLL_SECONDS = 0.5
STALE_ERROR_SECONDS = 600  # a waiting rank ignores an .error note older than this
builds = 0  # entries built by this process (tests count cache misses with it)


def root() -> Path:
    """$FINETUNE_DATA_CACHE (e.g. a shared file system for a cluster), else <finetune cache>/data."""
    if os.environ.get("FINETUNE_DATA_CACHE"):
        return Path(os.environ["FINETUNE_DATA_CACHE"]).expanduser().absolute()
    from finetune.tiny import cache_root

    return cache_root() / "data"


def _xxh():
    import xxhash

    return xxhash.xxh3_128()


def file_fingerprint(path: Path, chunk: int = 1 << 22) -> str:
    h = _xxh()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return f"{size}:{h.hexdigest()}"


def folder_fingerprint(path: Path) -> str:
    h = _xxh()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and ".cache" not in q.parts):
        h.update(str(p.relative_to(path)).encode() + b"\0" + file_fingerprint(p).encode() + b"\0")
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """The tokenizer's whole state: vocab, merges, normalizer, pre-tokenizer, post-processor
    (BOS/EOS insertion), added tokens, and the chat template (possibly set by the recipe). A vision-language
    model's processor: its tokenizer's and its image processor's settings (sizes, pixel limits)."""
    if hasattr(tok, "image_processor") and hasattr(tok, "tokenizer"):
        h = _xxh()
        h.update(tokenizer_fingerprint(tok.tokenizer).encode())
        h.update(type(tok).__name__.encode() + tok.image_processor.to_json_string().encode())
        return h.hexdigest()
    h = _xxh()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow (Python) tokenizer
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    extra = {
        "class": type(tok).__name__,
        "chat_template": getattr(tok, "chat_template", None),
        "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "add_bos": getattr(tok, "add_bos_token", None),
        "add_eos": getattr(tok, "add_eos_token", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def key_of(parts: dict) -> str:
    h = _xxh()
    h.update(json.dumps({"layout": LAYOUT_VERSION, **parts}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def is_local_main() -> bool:
    """LOCAL_RANK 0 (or no launcher): read from the environment, so no process group is needed."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def entry_dir(key: str) -> Path:
    return root() / key


def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()  # written last, in the temp dir, before the rename


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def _contents(path: Path) -> dict:
    """{file name: {bytes, xxh3}} of every file of an entry but meta.json."""
    return {
        p.name: {"bytes": p.stat().st_size, "xxh3": file_fingerprint(p).partition(":")[2]}
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != "meta.json"
    }


_checked: dict[Path, tuple[tuple, str | None]] = {}  # entry -> (its files' stats, its damage or None)


def damage(path: Path) -> str | None:
    """What is wrong with a complete entry (None: intact): meta.json unreadable or not this entry's,
    a file missing, of another size or another content than meta.json records. Hashed once per
    process while its files' stats stay the same (a waiting rank polls this)."""
    try:
        stamp = tuple(
            (p.name, st.st_ino, st.st_mtime_ns, st.st_size) for p in sorted(path.iterdir()) if (st := p.stat())
        )
    except OSError as e:
        return f"unreadable ({e})"
    if path in _checked and _checked[path][0] == stamp:
        return _checked[path][1]
    problem = _damage(path)
    _checked[path] = (stamp, problem)
    return problem


def _damage(path: Path) -> str | None:
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    if not isinstance(meta, dict) or not isinstance(meta.get("contents"), dict) or meta.get("key") != path.name:
        return "meta.json records no contents for this key (an older finetune's entry?)"
    for name, want in meta["contents"].items():
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want.get("bytes"):
            return f"{name} has {size:,} bytes, meta.json records {want.get('bytes'):,}"
        if file_fingerprint(f).partition(":")[2] != want.get("xxh3"):
            return f"{name}: content differs from its recorded hash"
    return None


def touch(path: Path) -> None:
    """Mark an entry used now (`finetune cache list` / `prune --older-than` read it); not where read-only."""
    with contextlib.suppress(OSError):
        os.utime(path)


def writable() -> bool:
    """Whether this process can write in the cache root (made if missing)."""
    try:
        root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root()):
            return True
    except OSError:
        return False


def private_dir() -> Path:
    """A temp dir for this process's Arrow files, removed at exit (data.cache: off, or a read-only
    root without the entry): in the cache root when writable, else in the system temp dir."""
    where = root() if writable() else None
    if where is not None:
        clean_stale_temps()
    path = Path(tempfile.mkdtemp(prefix=".off-", suffix=f"-{socket.gethostname()}-{os.getpid()}", dir=where))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _finish(tmp: Path, meta: dict, key: str) -> None:
    """Write meta.json (last): what the entry holds, with each file's size and hash."""
    meta["key"] = key
    meta["contents"] = _contents(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")


def size_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _error_note(key: str) -> Path:
    return root() / f"{key}.error"


def clean_stale_temps() -> None:
    """Remove temp dirs of dead preparations on this host (killed, crashed, out of memory), and
    the data.cache=off dirs of dead runs (`.tmp-...` / `.off-...`, named `...-<host>-<pid>`)."""
    for tmp in [*root().glob(".tmp-*"), *root().glob(".off-*")]:
        if not temp_owner_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def temp_owner_alive(tmp: Path) -> bool:
    """Whether the process that made a `.tmp-`/`.off-` dir (`...-<host>-<pid>`) or an `.old-` one
    (`...-<pid>`) may still run (a dir of another host: assumed so)."""
    rest, _, pid = tmp.name.rpartition("-")
    if not pid.isdigit():
        return False
    if not tmp.name.startswith(".old-") and not rest.endswith(f"-{socket.gethostname()}"):
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def being_built(key: str) -> bool:
    """Whether a process holds the entry's build lock now (`finetune cache prune` leaves it alone)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(root() / f".{key}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:  # a read-only root: nobody builds there
        return False
    lock.release()
    return False


def obtain(key: str, build: Callable[[Path], dict], mode: str = "auto") -> Path:
    """The finished entry for `key`: found, built here (local main process), or waited for (other ranks).

    `build(tmp_dir)` writes the entry's files into `tmp_dir` and returns the metadata; `mode` is data.cache:
    auto (reuse), refresh (rebuild once, then reuse), off (handled by the caller)."""
    final = entry_dir(key)
    if not writable():
        return _read_only(key, final, build, mode)
    if not is_local_main():
        return _wait_for(key, final, time.time())
    from filelock import FileLock

    with FileLock(str(root() / f".{key}.lock")):
        if is_complete(final) and mode != "refresh":
            problem = damage(final)
            if problem is None:
                touch(final)
                return final
            log.warning("data cache: %s is damaged (%s); encoding it again", final, problem)
        _error_note(key).unlink(missing_ok=True)
        clean_stale_temps()
        tmp = root() / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            meta = build(tmp)
        except Exception as e:
            _error_note(key).write_text(json.dumps({"time": time.time(), "error": str(e), "type": type(e).__name__}))
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _finish(tmp, meta, key)
        if final.exists():  # refresh, or an incomplete leftover: move it aside, then swap
            old = root() / f".old-{key}-{os.getpid()}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        global builds
        builds += 1
    return final


def _read_only(key: str, final: Path, build: Callable[[Path], dict], mode: str) -> Path:
    """A root this process cannot write: its intact entry, read as it is; else encode without caching."""
    problem = damage(final) if is_complete(final) else "not in it"
    if problem is None and mode != "refresh":
        return final
    log.warning(
        "data cache: %s is read-only and does not hold this data intact (%s); encoding without caching "
        "(set FINETUNE_DATA_CACHE to a writable dir to keep it)",
        root(),
        "asked to refresh" if problem is None else problem,
    )
    tmp = private_dir()
    _finish(tmp, build(tmp), key)
    return tmp


def _wait_for(key: str, final: Path, since: float) -> Path:
    """Other ranks: poll until the local main process has finished the entry (or failed)."""
    from finetune.errors import DataError

    note = _error_note(key)
    next_report = time.time() + 60
    while not (is_complete(final) and damage(final) is None):
        if note.is_file():
            try:
                failure = json.loads(note.read_text())
            except (OSError, ValueError):
                failure = None
            # A note from this run's main process (same inputs, so a recent note is this failure);
            # older ones are left for the main process to clear.
            if failure and failure["time"] >= since - STALE_ERROR_SECONDS:
                raise DataError(failure["error"])
        time.sleep(POLL_SECONDS)
        if time.time() > next_report:
            next_report += 300
            log.info("waiting for the main process to prepare the data (%s)", final)
    return final


def entries() -> list[tuple[Path, dict]]:
    """The complete entries whose meta.json reads, with it."""
    out = []
    if root().is_dir():
        for p in sorted(root().iterdir()):
            if not p.name.startswith(".") and is_complete(p):
                with contextlib.suppress(OSError, ValueError):
                    out.append((p, read_meta(p)))
    return out


# ----------------------------------------------------------------------------- encoding workers

_WORKERS_DIE = False  # while set, every process forked gets SIGKILL when its parent ends
_forker = (0, False)  # (pid, forked from the main thread) of the process that forked last


def _note_forker() -> None:
    global _forker
    _forker = (os.getpid(), threading.current_thread() is threading.main_thread())


def _die_with_parent() -> None:
    """In a child just forked: ask the kernel for SIGKILL when the parent ends. Only for forks from
    the parent's main thread: PR_SET_PDEATHSIG fires when the forking *thread* ends."""
    parent, from_main_thread = _forker
    if not (_WORKERS_DIE and from_main_thread):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before prctl: nothing will signal us
        os._exit(1)


if sys.platform.startswith("linux"):
    os.register_at_fork(before=_note_forker, after_in_child=_die_with_parent)


@contextlib.contextmanager
def workers_die_with_this_process():
    """While encoding: the processes forked (datasets.map's workers, its manager) die with this one."""
    global _WORKERS_DIE
    before, _WORKERS_DIE = _WORKERS_DIE, True
    try:
        yield
    finally:
        _WORKERS_DIE = before
