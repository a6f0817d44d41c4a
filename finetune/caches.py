"""`finetune cache list|prune`: what finetune's caches hold on this machine, and removing it.

Three caches, each owned by its module (this one only scans and removes):
- `data`: encoded datasets (`finetune.data.cache`, $FINETUNE_DATA_CACHE or <cache root>/data);
- `merged`: chained stages' merged bases (`finetune.outputs.merged_cache_dir`, <cache root>/merged);
- `tiny`: the built tiny models (`finetune.tiny`, <cache root>/tiny), rebuilt on demand.

`list` is a table like `huggingface-cli scan-cache`: kind, entry, size on disk, last used, what it
holds. `prune` removes by age (`--older-than 30d`), by total size (`--max-size 20GB`: least recently
used first) or everything (`--all`), in the kinds asked for (data and merged unless --kind says
otherwise: a tiny model costs minutes to rebuild). Leftovers of dead processes (unfinished entries,
damaged ones) are removed by any prune. An entry another process is building (its lock held) is
skipped. `--dry-run` says what would go and how much it would free.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from finetune import tiny
from finetune.data import cache as data_cache
from finetune.errors import FinetuneError
from finetune.outputs import MERGED_CACHE, MERGED_STAMP

KINDS = ("data", "merged", "tiny")
PRUNED_BY_DEFAULT = ("data", "merged")
LEFTOVER_AGE = 3600  # an unfinished merged copy older than this is a dead process's (its tmp dirs carry no pid)


@dataclass
class Entry:
    kind: str
    path: Path
    size: int
    last_used: float
    what: str
    leftover: bool = False  # unfinished or damaged: removed by any prune
    busy: bool = False  # another process is building it: never removed


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _data_entries() -> list[Entry]:
    root = data_cache.root()
    out = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        name = p.name
        if name.endswith(".lock"):
            continue
        try:
            mtime = p.stat().st_mtime
            size = _size(p)
        except OSError:
            continue
        if name.startswith((".tmp-", ".off-", ".old-")):
            alive = data_cache.temp_owner_alive(p)
            out.append(
                Entry(
                    "data",
                    p,
                    size,
                    mtime,
                    "unfinished (process running)" if alive else "unfinished, process gone",
                    not alive,
                    alive,
                )
            )
        elif name.endswith(".error"):
            out.append(Entry("data", p, size, mtime, "error note of a failed preparation", True))
        elif p.is_dir():
            busy = data_cache.being_built(name)
            problem = data_cache.damage(p) if data_cache.is_complete(p) else "no meta.json"
            if problem is not None:
                out.append(Entry("data", p, size, mtime, f"damaged: {problem}", not busy, busy))
                continue
            meta = data_cache.read_meta(p)
            source = Path(str(meta.get("source", "?"))).name
            what = f"{source}: {meta.get('format')}, {meta.get('examples', 0):,} examples"
            what += f", max_length {meta.get('max_length')}"
            out.append(Entry("data", p, size, mtime, what, busy=busy))
    return out


def _merged_entries() -> list[Entry]:
    root = tiny.cache_root() / MERGED_CACHE
    out = []
    if not root.is_dir():
        return out
    now = time.time()
    for p in sorted(root.iterdir()):
        mtime, size = p.stat().st_mtime, _size(p)
        stamp = p / MERGED_STAMP
        if stamp.is_file():
            import json

            try:
                info = json.loads(stamp.read_text(encoding="utf-8"))
                what = f"{info.get('adapter')} merged into {info.get('base')}"
            except (OSError, ValueError):
                what = "merged copy (stamp unreadable)"
            out.append(Entry("merged", p, size, mtime, what))
        else:
            old = now - mtime > LEFTOVER_AGE
            out.append(Entry("merged", p, size, mtime, "unfinished merge", old, not old))
    return out


def _tiny_entries() -> list[Entry]:
    root = tiny.cache_root() / "tiny"
    if not root.is_dir():
        return []
    return [
        Entry("tiny", p, _size(p), p.stat().st_mtime, "tiny model (rebuilt on first use)")
        for p in sorted(root.iterdir())
        if p.is_dir()
    ]


def scan(kinds=KINDS) -> list[Entry]:
    found = {"data": _data_entries, "merged": _merged_entries, "tiny": _tiny_entries}
    return [e for kind in kinds for e in found[kind]()]


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _ago(t: float) -> str:
    s = max(0, time.time() - t)
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= span:
            n = int(s // span)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def render(entries: list[Entry]) -> str:
    rows = [("CACHE", "ENTRY", "SIZE", "LAST USED", "HOLDS")]
    rows += [(e.kind, e.path.name, human_size(e.size), _ago(e.last_used), e.what) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    roots = f"data {data_cache.root()}, merged {tiny.cache_root() / MERGED_CACHE}, tiny {tiny.cache_root() / 'tiny'}"
    total = sum(e.size for e in entries)
    lines.append(f"\n{len(entries)} entries, {human_size(total)} on disk ({roots})")
    return "\n".join(lines).rstrip() if entries else f"the caches are empty ({roots})"


_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_BYTES = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)$", re.IGNORECASE)


def parse_age(text: str) -> float:
    m = _AGE.match(text.strip().lower())
    if not m:
        raise FinetuneError(f"--older-than: {text!r} is not an age like 30d, 12h, 90m or 2w")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def parse_size(text: str) -> int:
    m = _BYTES.match(text.strip())
    if not m:
        raise FinetuneError(f"--max-size: {text!r} is not a size like 500MB, 20GB or 1.5TiB")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".index(unit[0]) + 1 if unit else 0
    return int(float(m.group(1)) * base**power)


def select(entries: list[Entry], older_than: float | None, max_size: int | None, everything: bool) -> list[Entry]:
    """What a prune removes: leftovers always; then everything, or what is older than the age, then the
    least recently used until the rest fits max_size. Entries being built are never chosen."""
    free = [e for e in entries if not e.busy]
    chosen = [e for e in free if e.leftover or everything]
    kept = [e for e in free if e not in chosen]
    if older_than is not None:
        cutoff = time.time() - older_than
        chosen += [e for e in kept if e.last_used < cutoff]
        kept = [e for e in kept if e.last_used >= cutoff]
    if max_size is not None:
        total = sum(e.size for e in kept) + sum(e.size for e in entries if e.busy)
        for e in sorted(kept, key=lambda e: e.last_used):
            if total <= max_size:
                break
            chosen.append(e)
            total -= e.size
    return chosen


def remove(entry: Entry) -> None:
    if entry.path.is_dir():
        # rename first, so no reader ever sees a half-removed entry under its own name
        doomed = entry.path.with_name(f".removing-{entry.path.name}-{os.getpid()}")
        os.rename(entry.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        entry.path.unlink(missing_ok=True)


def prune(kinds, older_than: str | None, max_size: str | None, everything: bool, dry_run: bool) -> str:
    if older_than is None and max_size is None and not everything:
        raise FinetuneError("cache prune: say what to remove: --older-than AGE, --max-size SIZE or --all")
    age = parse_age(older_than) if older_than is not None else None
    limit = parse_size(max_size) if max_size is not None else None
    entries = scan(kinds)
    chosen = select(entries, age, limit, everything)
    verb = "would remove" if dry_run else "removed"
    lines = []
    for e in chosen:
        if not dry_run:
            remove(e)
        lines.append(f"{verb} {e.kind:<6} {e.path.name}  {human_size(e.size)}  ({e.what})")
    busy = [e for e in entries if e.busy]
    lines += [f"kept   {e.kind:<6} {e.path.name}: {e.what}" for e in busy]
    freed = sum(e.size for e in chosen)
    lines.append(
        f"{'would free' if dry_run else 'freed'} {human_size(freed)} ({len(chosen)} of {len(entries)} entries"
        f"{', dry run: nothing removed' if dry_run else ''})"
    )
    return "\n".join(lines)
