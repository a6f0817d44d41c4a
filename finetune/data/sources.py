"""Where records come from: the dataset registry, local files (JSON, JSONL, CSV, Parquet) and
hub datasets. Every record carries `where` ("file:line" or "file record N") for error messages."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from finetune.errors import DataError, closest

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
SHIPPED_REGISTRY = Path(__file__).resolve().parents[2] / "data" / "datasets.yaml"


@dataclass
class Record:
    data: dict[str, Any]
    where: str  # "data/x.jsonl:17" or "org/name record 3"


@dataclass
class Source:
    """A resolved dataset reference: a local file or a hub dataset, with its registry metadata."""

    name: str  # what the recipe said
    path: Path | None = None
    hub: str | None = None
    split: str = "train"
    format: str | None = None
    columns: dict[str, str] | None = None
    language: str | None = None

    def label(self) -> str:
        return str(self.path) if self.path else str(self.hub)


def find_registry(explicit: str | None = None) -> Path | None:
    """data.registry if given, else ./data/datasets.yaml, else the registry shipped with finetune."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise DataError(f"data.registry: {explicit}: file not found")
        return p
    for p in (Path.cwd() / "data" / "datasets.yaml", SHIPPED_REGISTRY):
        if p.is_file():
            return p
    return None


def read_registry(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    from finetune.config import parse_yaml  # one line with the line number, duplicate keys refused

    entries = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(entries, dict):
        raise DataError(f"{path}: a registry maps dataset names to entries")
    return entries


def resolve(name: str, split: str = "train", registry: str | None = None, field: str = "data.train") -> Source:
    """A recipe's dataset reference -> Source. Files and folders first, then registry names, then hub ids."""
    p = Path(name).expanduser()
    if p.is_file():
        return Source(name=name, path=p, split=split)
    if p.is_dir():  # a dataset folder (data files, or a downloaded hub repo): datasets reads it
        return Source(name=name, hub=str(p), split=split)
    looks_like_file = p.suffix.lower() in FILE_SUFFIXES or name.startswith((".", "/", "~"))
    if looks_like_file:
        raise DataError(f"{field}: {name}: file not found")
    reg_path = find_registry(registry)
    entries = read_registry(reg_path)
    if name in entries:
        entry = entries[name] or {}
        known = {"path", "hub", "split", "format", "columns", "language", "description"}
        for key in entry:
            if key not in known:
                raise DataError(f"{reg_path}: {name}.{key}: unknown key{closest(key, known)}")
        if "path" in entry:
            path = (reg_path.parent / entry["path"]).resolve()
            if not path.is_file():
                raise DataError(f"{reg_path}: {name}.path: {path}: file not found")
            src = Source(name=name, path=path)
        elif "hub" in entry:
            src = Source(name=name, hub=entry["hub"], split=entry.get("split", split))
        else:
            raise DataError(f"{reg_path}: {name}: needs 'path' or 'hub'")
        src.format, src.columns, src.language = entry.get("format"), entry.get("columns"), entry.get("language")
        return src
    if "/" in name or not entries:
        return Source(name=name, hub=name, split=split)
    raise DataError(f"{field}: {name!r} is not a file nor a dataset in {reg_path}{closest(name, entries)}")


def read(src: Source) -> list[Record]:
    records = list(_read_file(src.path) if src.path else _read_hub(src))
    if not records:
        raise DataError(f"{src.label()}: empty dataset (no records)")
    return records


def _read_file(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        for i, row in enumerate(rows):
            yield Record(row, f"{path} record {i}")
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use one of {', '.join(FILE_SUFFIXES)})")


def _read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield Record(obj, f"{path}:{lineno}")


def _read_json(path: Path) -> Iterator[Record]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records (or an object holding one)")
        obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(obj).__name__}")
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise DataError(f"{path} record {i}: expected a JSON object, got {type(row).__name__}")
        yield Record(row, f"{path} record {i}")


def _read_csv(path: Path, delimiter: str) -> Iterator[Record]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            yield Record(dict(row), f"{path}:{reader.line_num}")


def _read_hub(src: Source) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(src.hub, split=src.split)
    except Exception as e:  # offline, unknown id, bad split: one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data: {src.hub!r} is not a local file, a registry name, or a loadable hub dataset: {msg}") from None
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{src.hub}[{src.split}] record {i}")
