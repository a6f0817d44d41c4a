"""Output dirs: the one writer (`RunDir`) and the one reader (`OutputDir`).

The run directory: never overwrite a finished output by accident, never let a half-written
one look finished, and resume an interrupted run.

A run trains in `<output.dir>.incomplete/` (checkpoints live there) and is renamed to
`<output.dir>` only once everything is written. An interrupted run leaves the `.incomplete`
dir behind; the next run with `train.resume: auto` continues from its last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune import config, tiny
from finetune.atomic import publish_modes, replace_dir, write_text_atomic  # noqa: F401  (the one atomic swap, re-exported)
from finetune.errors import FinetuneError, OutputError

log = logging.getLogger("finetune")

RECIPE_STAMP = "recipe.yaml"
ADAPTER_CONFIG = "adapter_config.json"
BASE_RECORD = "base.json"  # a chained output's portable description of its base (written at training time)
MERGED_STAMP = "finetune_merged.json"  # written last into a merged copy: a copy without it is incomplete
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_target(final: Path, overwrite: bool, what: str = "output.dir") -> None:
    """Fail early (before any work) if `final` holds something and overwriting was not asked for."""
    if final.exists() and not final.is_dir():
        raise OutputError(f"{what}: {final} exists and is not a directory")
    if is_nonempty_dir(final) and not overwrite:
        fix = "pass --overwrite" if what.startswith("--") else "set output.overwrite=true"  # a flag or a recipe key
        raise OutputError(f"{what}: {final} exists and is not empty; {fix} or choose another {what}")


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
            if _identity_of(previous) != _identity_of(recipe_text):  # the comparison OutputDir.identity makes
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


def _identity_of(recipe_yaml: str) -> dict:
    import yaml

    return config.identity(yaml.safe_load(recipe_yaml) or {})


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


# ----------------------------------------------------------------------------- reading an output dir


@dataclass
class Base:
    """Where an adapter's base is (a local dir or a hub id) and which field said so (for errors).
    `unmerged`: the adapter whose merged copy `where` is, when that copy is not built yet
    (`finetune.loading.merged_copy` builds it; reading this dir loads nothing)."""

    where: str
    field: str
    unmerged: OutputDir | None = None


class OutputDir:
    """What a finetune (or any PEFT / transformers) output dir holds: the one reader.

    `recipe_dict()` / `recipe()`: the resolved recipe it was trained with; `method`, `quantization()`;
    `base()`: the model its adapter loads on, in one priority order; `identity()`: what makes two
    runs the same training (the function `Recipe.identity` uses); `finished`; and for a stage
    chained on another stage's adapter, `base.json`: the portable description of that base (the
    original model plus the parent adapter(s), each with a content fingerprint), so a retrained
    parent is detected and named, and another machine can rebuild the merged base."""

    def __init__(self, path: str | os.PathLike, what: str = "MODEL_DIR"):
        self.path = Path(path).expanduser().resolve()
        self.what = what

    # --- what is there

    @property
    def finished(self) -> bool:
        """A finished finetune run (its recipe is written last, before the atomic rename)."""
        return (self.path / RECIPE_STAMP).is_file()

    @property
    def interrupted(self) -> bool:
        return self.path.with_name(self.path.name + ".incomplete").is_dir()

    @property
    def is_adapter(self) -> bool:
        return (self.path / ADAPTER_CONFIG).is_file()

    @property
    def is_model(self) -> bool:
        return (self.path / "config.json").is_file() and not self.is_adapter

    def adapter_config(self) -> dict:
        f = self.path / ADAPTER_CONFIG
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise OutputError(f"{f}: unreadable adapter config ({str(e).splitlines()[0]})") from None

    @property
    def task_type(self) -> str | None:
        return self.adapter_config().get("task_type") if self.is_adapter else None

    def recipe_dict(self) -> dict:
        """The dir's recipe.yaml as a plain mapping ({} when there is none: another tool's output)."""
        f = self.path / RECIPE_STAMP
        if not f.is_file():
            return {}
        raw = config.parse_yaml(f.read_text(encoding="utf-8"), str(f))
        return raw if isinstance(raw, dict) else {}

    def recipe(self) -> config.Recipe:
        """The typed, validated recipe (train.resume is not re-checked: its checkpoint is gone)."""
        f = self.path / RECIPE_STAMP
        return config.load(f, ["train.resume=never"])

    def identity(self) -> dict | None:
        """`config.identity` of the recipe it was trained with (None: not a finished finetune run)."""
        return config.identity(self.recipe_dict()) if self.finished else None

    @property
    def method(self) -> str | None:
        """adapter.method of its recipe, else the PEFT type in lower case (None for a plain model)."""
        method = (self.recipe_dict().get("adapter") or {}).get("method")
        if method:
            return method
        if not self.is_adapter:
            return None
        return self.adapter_config().get("peft_type", "").lower() or None

    def model_section(self) -> config.ModelSection | None:
        """The recipe's model section (dtype, chat template, trust flags...), None without a recipe."""
        raw = self.recipe_dict().get("model") or {}
        if not raw:
            return None
        known = set(config.ModelSection.__dataclass_fields__)
        return config.ModelSection(**{k: v for k, v in raw.items() if k in known})

    def quantization(self) -> config.AdapterSection | None:
        """How a QLoRA run quantized its base (None for every other method)."""
        adapter = self.recipe_dict().get("adapter") or {}
        if adapter.get("method") != "qlora":
            return None
        keys = ("quant_bits", "quant_type", "double_quant", "compute_dtype")
        return config.AdapterSection(method="qlora", **{k: adapter[k] for k in keys if k in adapter})

    # --- the base

    def base_record(self) -> dict | None:
        """base.json of a chained output: {base, adapters: [{dir, relative, fingerprint}], fingerprint}."""
        f = self.path / BASE_RECORD
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise OutputError(f"{f}: not valid JSON ({e})") from None

    def _recipe_base_name(self) -> str | None:
        return (self.recipe_dict().get("model") or {}).get("name_or_path")

    def base(self, override: str | None = None) -> Base:
        """The base this adapter loads on, first match wins: `override` (--base); a chained output's
        recorded base (the merged parent it trained on, checked by content); the recipe's
        model.name_or_path (a tiny name is built here, a parent adapter dir merged); the adapter
        config's base_model_name_or_path. A candidate is used if it exists locally; else the first
        is taken as a hub id."""
        if override:
            return _local_or_hub([(override, "--base")], self.path)
        record = self.base_record()
        if record is not None:
            return self._recorded_base(record, f"{self.path / BASE_RECORD}: base")
        candidates = []
        name = self._recipe_base_name()
        if name:
            candidates.append((name, f"{self.path / RECIPE_STAMP}: model.name_or_path"))
        if self.is_adapter and self.adapter_config().get("base_model_name_or_path"):
            candidates.append(
                (
                    self.adapter_config()["base_model_name_or_path"],
                    f"{self.path / ADAPTER_CONFIG}: base_model_name_or_path",
                )
            )
        if not candidates:
            raise OutputError(f"{self.path / ADAPTER_CONFIG}: base_model_name_or_path: not set; pass --base MODEL")
        return _local_or_hub(candidates, self.path)

    def base_key(self) -> str:
        """What identifies this adapter's base by content, portably: a chained base's fingerprint,
        else the model name as the recipe (or adapter config) gives it."""
        record = self.base_record()
        if record is not None:
            return f"fingerprint:{record['fingerprint']}"
        name = self._recipe_base_name()
        if name and OutputDir(name).is_adapter:  # chained before base.json existed
            return f"fingerprint:{OutputDir(name).fingerprint()}"
        return name or (self.adapter_config().get("base_model_name_or_path") or "" if self.is_adapter else "")

    def fingerprint(self) -> str:
        """Content fingerprint of base + this adapter (what a stage chained on this dir trains on):
        it changes when this dir is retrained, and not when it is copied, moved or trained again
        identically. Canonical: the adapter config as data (sets such as target_modules sorted, the
        base's path left out: `base_key` names the base), the weights as named tensors (not the
        file's bytes, whose header order may vary)."""
        h = hashlib.sha256(self.base_key().encode())
        for name in sorted(p.name for p in self.path.iterdir() if p.name.startswith("adapter_")):
            h.update(name.encode() + b"\0")
            if name == ADAPTER_CONFIG:
                h.update(_canonical_adapter_config(self.path / name))
            elif name.endswith(".safetensors"):
                _hash_tensors(self.path / name, h)
            else:
                with open(self.path / name, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
        return h.hexdigest()[:16]

    def merged_dir(self) -> Path:
        """Where this adapter merged into its base (full precision) is cached, by content, under
        $FINETUNE_CACHE/merged/: what a stage chained on this dir loads as its base
        (`finetune.loading.merged_copy` builds it). Named by the fingerprint alone, so identical
        adapters (a re-run, a copy in another dir) share one copy."""
        return merged_cache_dir(self.fingerprint())

    def as_merged_base(self, field: str) -> Base:
        """This adapter's merged copy as a base (not built yet: `unmerged` says so)."""
        target = self.merged_dir()
        return Base(str(target), field, None if is_merged_copy(target) else self)

    def chained_description(self) -> dict:
        """base.json for a stage trained on this adapter merged: the original model and every
        adapter merged into it, in order, each with its content fingerprint."""
        parent = self.base_record()
        adapters = list(parent["adapters"]) if parent else []
        if parent:
            root = parent["base"]
        else:
            root = self._recipe_base_name() or self.adapter_config().get("base_model_name_or_path")
        adapters.append({"dir": str(self.path), "fingerprint": self.fingerprint()})
        return {"base": root, "adapters": adapters, "fingerprint": adapters[-1]["fingerprint"]}

    def _recorded_base(self, record: dict, field: str) -> Base:
        """The merged base recorded in base.json: the parent adapter's merge when its content still
        matches; the cached merge of the recorded content when the parent was retrained since
        (with a warning naming both fingerprints); else an error saying how to rebuild it."""
        last, fp = record["adapters"][-1], record["fingerprint"]
        parent = _find_parent(self.path, last)
        cached = merged_cache_dir(fp)
        if parent is not None:
            now = parent.fingerprint()
            if now == fp:
                return parent.as_merged_base(field)
            changed = (
                f"{self.path} was trained on {parent.path} with fingerprint {fp}, and {parent.path} now has "
                f"fingerprint {now} (retrained since)"
            )
            if is_merged_copy(cached):
                log.warning("%s; using the cached merge of the adapter it was trained on, %s", changed, cached)
                return Base(str(cached), field)
            raise OutputError(
                f"{self.path / BASE_RECORD}: {changed}; restore that adapter, retrain this stage, "
                "or pass --base with the merged model it was trained on"
            )
        if is_merged_copy(cached):
            return Base(str(cached), field)
        chain = " + ".join([str(record["base"])] + [a["dir"] for a in record["adapters"]])
        raise OutputError(
            f"{self.path / BASE_RECORD}: its base is {chain} merged in that order, and adapter "
            f"{last['dir']} is not there (nor at {self.path / last.get('relative', '?')}); "
            "copy it there, "
            "or pass --base with the merged model"
        )


def record_base(work: Path, final: Path, name_or_path: str) -> dict | None:
    """Write base.json into `work` (to become `final`) when the run's base was another stage's
    adapter dir (a chained stage); returns the description, None for a plain base."""
    parent = OutputDir(name_or_path)
    if not parent.is_adapter:
        return None
    description = parent.chained_description()
    for adapter in description["adapters"]:
        adapter["relative"] = os.path.relpath(adapter["dir"], final)
    write_text_atomic(work / BASE_RECORD, json.dumps(description, indent=2) + "\n")
    return description


def _find_parent(child: Path, entry: dict) -> OutputDir | None:
    candidates = [Path(entry["dir"])] + ([(child / entry["relative"]).resolve()] if entry.get("relative") else [])
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG).is_file():
            return OutputDir(candidate)
    return None


def _local_or_hub(candidates: list[tuple[str, str]], path: Path) -> Base:
    """The first candidate that is a tiny name (built here), an adapter dir (merged) or a local dir;
    else the first one as a hub id; a missing local path is an error."""
    for name, field in candidates:
        if tiny.is_tiny(name):
            try:
                return Base(tiny.build_if_tiny(name), field)
            except ValueError as e:
                raise OutputError(f"{field}: {e}") from None
        local = Path(name).expanduser()
        if (local / ADAPTER_CONFIG).is_file():  # chained without base.json (trained before it existed)
            return OutputDir(local).as_merged_base(field)
        if local.is_dir():
            return Base(str(local.resolve()), field)
    name, field = candidates[0]
    if name.startswith(("/", "./", "../", "~")) or Path(name).is_absolute():
        others = f" (nor {candidates[1][0]})" if len(candidates) > 1 else ""
        raise OutputError(f"{field}: base model {name} not found{others}; pass --base MODEL")
    return Base(name, field)  # a hub id: from_pretrained finds it (in the HF cache, or online)


MERGED_CACHE = "merged"  # $FINETUNE_CACHE/merged/<fingerprint>/: chained stages' merged bases
SET_VALUED = ("target_modules", "modules_to_save", "exclude_modules")  # PEFT saves these sets in any order


def merged_cache_dir(fingerprint: str) -> Path:
    return tiny.cache_root() / MERGED_CACHE / fingerprint


def _canonical_adapter_config(path: Path) -> bytes:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: unreadable adapter config ({str(e).splitlines()[0]})") from None
    cfg.pop("base_model_name_or_path", None)
    for key in SET_VALUED:
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key], key=str)
    return json.dumps(cfg, sort_keys=True, default=str).encode()


def _hash_tensors(path: Path, h) -> None:
    """Each tensor's name, dtype, shape and bytes, in name order, read from the safetensors layout
    (an 8-byte header length, a JSON header of offsets, the data): no torch needed."""
    import struct

    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise OutputError(f"{path}: not a safetensors file ({e})") from None
        start = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            t = header[name]
            h.update(json.dumps([name, t["dtype"], t["shape"]]).encode())
            begin, end = t["data_offsets"]
            f.seek(start + begin)
            remaining = end - begin
            while remaining:
                block = f.read(min(remaining, 1 << 20))
                if not block:
                    raise OutputError(f"{path}: truncated (tensor {name})")
                h.update(block)
                remaining -= len(block)


def is_merged_copy(path: Path) -> bool:
    """A finished merged copy (its stamp is written last, before the atomic swap into place)."""
    return (path / MERGED_STAMP).is_file()


def recorded_system_prompt(model_dir: str | os.PathLike) -> str | None:
    """The system prompt a finetune output was trained with (`data.system` of its recipe.yaml), for
    chat, serve and export's Modelfile. A merged model follows its merge_report.json to the adapter
    it came from (several adapters: only when they agree). None when nothing was recorded."""
    path = Path(model_dir).expanduser()
    if (path / RECIPE_STAMP).is_file():
        try:
            raw = OutputDir(path).recipe_dict()
        except FinetuneError:
            return None
        system = (raw.get("data") or {}).get("system")
        return system if isinstance(system, str) and system else None
    report = path / "merge_report.json"
    if report.is_file():
        try:
            adapters = json.loads(report.read_text(encoding="utf-8")).get("adapters") or []
        except (OSError, ValueError, AttributeError):
            return None
        found = {recorded_system_prompt(a) for a in adapters if Path(a).is_dir()}
        return found.pop() if len(found) == 1 else None
    return None
