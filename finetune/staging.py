"""Write an output dir or file atomically: build it in a temp dir beside the target, rename at the end.

On any failure the temp dir is removed, so nothing half-written is ever left at the target, and an
existing target is replaced only when the caller asked to overwrite it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from finetune import locks
from finetune.errors import OutputError
from finetune.outputs import publish_modes, replace_dir


def check_free(target: str | Path, overwrite: bool, file: bool = False, flag: str = "--out") -> Path:
    """The absolute target; fail (before any work) if it exists and overwriting was not asked for."""
    final = Path(target).expanduser().absolute()
    locks.check_free(final, flag)  # in use by another process, or not writable: fail before any work
    if final.exists() and not overwrite:
        raise OutputError(f"{flag}: {final} exists; pass --overwrite to replace it, or choose another {flag}")
    if final.exists() and final.is_dir() == file:
        raise OutputError(f"{flag}: {final} exists and is {'a directory' if file else 'not a directory'}")
    return final


class Staged:
    """`with Staged(final, overwrite) as tmp:` write into `tmp` (a dir); on success `tmp` becomes `final`
    (or, with `file=True`, the single file `tmp / final.name` becomes `final`)."""

    def __init__(self, final: Path, overwrite: bool, file: bool = False):
        self.final, self.overwrite, self.file = Path(final), overwrite, file
        self.tmp: Path | None = None
        self._made_parent: Path | None = None

    def __enter__(self) -> Path:
        locks.hold(self.final, "--out")  # one writer per output (finetune.locks); released in __exit__
        parent = self.final.parent
        if not parent.exists():
            top = parent
            while not top.parent.exists():
                top = top.parent
            parent.mkdir(parents=True)
            self._made_parent = top
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type)
        finally:
            locks.release(self.final)

    def _finish(self, exc_type) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self._made_parent is not None:
                shutil.rmtree(self._made_parent, ignore_errors=True)
            return
        if self.file:
            publish_modes(self.tmp / self.final.name)
            os.replace(self.tmp / self.final.name, self.final)  # a file replaces a file atomically
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        replace_dir(self.tmp, self.final)
