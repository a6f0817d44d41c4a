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


def replace_dir(src: Path, final: Path) -> None:
    """Make the finished dir `src` become `final`, swapping out an existing `final` (two renames:
    at every moment `final` is either the old or the new dir, never a mix or missing for longer
    than between the renames). `src` gets the umask's permissions (mkdtemp makes it private)."""
    src, final = Path(src), Path(final)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(src, 0o777 & ~umask)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(src, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, final)
