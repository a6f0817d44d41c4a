"""The run directory: never overwrite a finished output by accident, never let a half-written
one look finished, and resume an interrupted run.

A run trains in `<output.dir>.incomplete/` (checkpoints live there) and is renamed to
`<output.dir>` only once everything is written. An interrupted run leaves the `.incomplete`
dir behind; the next run with `train.resume: auto` continues from its last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from finetune.errors import OutputError

RECIPE_STAMP = "recipe.yaml"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_target(final: Path, overwrite: bool, what: str = "output.dir") -> None:
    """Fail early (before any work) if `final` holds something and overwriting was not asked for."""
    if final.exists() and not final.is_dir():
        raise OutputError(f"{what}: {final} exists and is not a directory")
    if is_nonempty_dir(final) and not overwrite:
        raise OutputError(f"{what}: {final} exists and is not empty; set output.overwrite=true or choose another {what}")


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The highest-numbered checkpoint whose trainer_state.json (written last) is readable."""
    if not run_dir.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
        reverse=True,
    )
    for _, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            continue
    return None


class RunDir:
    def __init__(self, final: str | os.PathLike, overwrite: bool = False, resume: str = "auto"):
        self.final = Path(final).expanduser().resolve()
        self.work = self.final.with_name(self.final.name + ".incomplete")
        self.overwrite, self.resume = overwrite, resume

    def check(self) -> None:
        check_target(self.final, self.overwrite)

    def resume_from(self) -> Path | None:
        """The checkpoint this run continues from, if any (read-only: safe on every rank)."""
        if self.resume == "never":
            return None
        if self.resume != "auto":
            return Path(self.resume)
        return last_complete_checkpoint(self.work)

    def start(self, recipe_text: str, is_main: bool = True) -> Path | None:
        """Make the work dir (main process only) and return the checkpoint to resume from.

        The recipe is kept in the work dir, so an interrupted run is only resumed by the
        same recipe: resuming someone else's checkpoints would silently mix two runs."""
        checkpoint = self.resume_from()
        stamp = self.work / RECIPE_STAMP
        if checkpoint is not None and self.resume == "auto" and stamp.is_file():
            previous = stamp.read_text(encoding="utf-8")
            if previous != recipe_text:
                raise OutputError(
                    f"output.dir: {self.work} holds an interrupted run of a different recipe "
                    f"({_first_difference(previous, recipe_text)}); rerun that recipe to resume it, "
                    "or set train.resume=never to start over"
                )
        if is_main:
            if checkpoint is None and self.work.exists():
                shutil.rmtree(self.work)  # an interrupted run with nothing worth keeping, or resume: never
            self.work.mkdir(parents=True, exist_ok=True)
            write_text_atomic(stamp, recipe_text)
        return checkpoint

    def finish(self) -> Path:
        """Atomically replace `final` by the finished work dir (main process only)."""
        self.check()  # someone may have written there while we trained
        replace_dir(self.work, self.final)
        return self.final


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
    """Make the finished dir `src` become `final`, swapping out an existing `final` (two renames).
    Every output is finalised here, so here its modes follow the umask (`publish_modes`)."""
    publish_modes(src)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / "old")
        os.replace(src, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, final)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _first_difference(old: str, new: str) -> str:
    """`section.key: old -> new` for the first differing key of two dumped recipes."""
    import yaml

    a, b = yaml.safe_load(old) or {}, yaml.safe_load(new) or {}
    for section in dict.fromkeys([*a, *b]):
        sa, sb = a.get(section), b.get(section)
        if sa == sb:
            continue
        if isinstance(sa, dict) and isinstance(sb, dict):
            for key in dict.fromkeys([*sa, *sb]):
                if sa.get(key) != sb.get(key):
                    return f"{section}.{key}: {sa.get(key)!r} -> {sb.get(key)!r}"
        return f"{section}: {sa!r} -> {sb!r}"
    return "the recipe changed"
