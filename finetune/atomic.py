"""Atomic writes: a file or a directory is written beside its target and renamed into place, so a
reader never sees half of it. The one implementation (outputs, tiny models, merged copies, eval
reports, merge/export all use it); it imports nothing of ours, so every module may."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def publish_modes(path: Path) -> None:
    """Give `path` (a file, or a dir and everything in it) the modes a plain write under the umask would:
    mkdtemp makes dirs 0700 and safetensors writes files 0600, which a serving container or a colleague
    could not read. The owner's execute bit is kept on files."""
    umask = current_umask()
    path = Path(path)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in entries:
        if p.is_symlink():
            continue
        executable = p.is_dir() or bool(p.stat().st_mode & 0o100)
        os.chmod(p, (0o777 if executable else 0o666) & ~umask)


def replace_dir(src: Path, final: Path) -> None:
    """Make the finished dir `src` become `final`, swapping out an existing `final` (two renames:
    at every moment `final` is either the old or the new dir, never a mix or missing for longer
    than between the renames). Every output is finalised here, so here its modes follow the umask
    (`publish_modes`: mkdtemp and safetensors make them private)."""
    src, final = Path(src), Path(final)
    publish_modes(src)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(src, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, final)
