"""The web UI's security model: what a request sent to it may read, write and turn on.

- Every path the UI reads or writes, and every path-like value in a recipe it runs, is resolved (symlinks
  followed) and must lie inside the workspace root (`finetune webui --root`, default the current dir).
  Relative paths are relative to the root, and every command the UI starts runs there.
- A value that is not a path (a registry dataset name, a hub id, `tiny-llama`) passes as a name.
- Remote code and pickle loading are the UI process's own flags (`--trust-remote-code`, `--allow-pickle`):
  a recipe or form field sent to the UI asking for them is refused unless the UI was started with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError


class Refused(FinetuneError):
    """A request the web UI does not honour (a path outside its root, a flag it was not started with)."""


SECURITY_KEYS = {"trust_remote_code": "--trust-remote-code", "allow_pickle": "--allow-pickle"}


@dataclass(frozen=True)
class Workspace:
    root: Path
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @classmethod
    def at(cls, root: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> Workspace:
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise FinetuneError(f"--root {root}: not a directory")
        return cls(path, trust_remote_code, allow_pickle)

    def path(self, value, what: str) -> Path:
        """`value` resolved against the root (symlinks followed); refused unless it lies inside it."""
        text = str(value or "").strip()
        if not text:
            raise Refused(f"{what}: give a path inside the workspace {self.root}")
        p = Path(text).expanduser()
        resolved = (p if p.is_absolute() else self.root / p).resolve()
        if not resolved.is_relative_to(self.root):
            raise Refused(f"{what}: {text} is outside the workspace {self.root} (finetune webui --root)")
        return resolved

    def output(self, value, what: str) -> Path:
        """A path the UI writes (and may replace): inside the root, never the root itself."""
        p = self.path(value, what)
        if p == self.root:
            raise Refused(f"{what}: {value} is the workspace itself; name a folder inside it")
        return p

    def name_or_path(self, value, what: str) -> str:
        """A registry name or hub id as it is; a path checked as `path` (and returned as given: every
        command the UI starts runs in the root)."""
        text = str(value or "").strip()
        if self.is_path(text):
            self.path(text, what)
        return text

    def is_path(self, text: str) -> bool:
        """Absolute, from home, climbing out (`..`), or naming something that exists under the root. A
        relative name that exists nowhere is a registry name or hub id, or a path that stays in the root."""
        if not text or "\n" in text or len(text) > 4096:
            return False
        p = Path(text)
        return (
            p.is_absolute()
            or text.startswith("~")
            or ".." in p.parts
            or (self.root / p).exists()
            or (self.root / p).is_symlink()
        )

    def check_recipe(self, recipe: dict) -> dict:
        """Refuse a recipe that reads or writes outside the root or asks for remote code / pickle the UI
        was not started with; return it with its paths resolved."""
        model = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
        for key, flag in SECURITY_KEYS.items():
            if model.get(key) and not getattr(self, key):
                raise Refused(
                    f"model.{key}: the web UI was started without {flag}; only the flags `finetune webui` "
                    f"was started with turn it on, never a recipe sent to it"
                )
        out = self._walk(recipe, "")
        output = out.setdefault("output", {}) if isinstance(out.get("output", {}), dict) else None
        if output is None:
            raise Refused("output: expected a section")
        output["dir"] = str(self.output(output.get("dir") or "outputs/run", "output.dir"))
        return out

    def _walk(self, value, where: str):
        if isinstance(value, dict):
            return {k: self._walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            return self.name_or_path(value, where) if self.is_path(value) else value
        return value
