"""Where records come from: the dataset registry, local files (JSON, JSONL, CSV, Parquet) and
hub datasets. Every record carries `where` ("file:line" or "file record N") for error messages."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import DataError, closest
from finetune.resources import INSTALLED, shipped

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
NEWLINE = b"\n"
SHIPPED_REGISTRY = shipped("data/datasets.yaml") or INSTALLED / "data" / "datasets.yaml"  # checkout or wheel


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


def locate(name: str, split: str = "train", registry: str | None = None, field: str = "data.train") -> Source:
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


def read(src: Source, encoding: str | None = None) -> list[Record]:
    """Every record of `src`; text files are UTF-8 (with or without a BOM) unless `encoding`
    (data.encoding) says otherwise."""
    records = list(iter_records(src, encoding=encoding))
    if not records:
        raise DataError(f"{src.label()}: empty dataset (no records)")
    return records


def iter_records(src: Source, streaming: bool = False, encoding: str | None = None) -> Iterator[Record]:
    """The records one by one (JSONL, CSV and Parquet are read row by row, never held whole;
    a JSON array file is parsed whole). `streaming`: a hub dataset is streamed, not downloaded.
    `encoding`: data.encoding for text files (default UTF-8, with or without a BOM)."""
    return _read_file(src.path, encoding) if src.path else _read_hub(src, streaming)


def fingerprint(src: Source) -> str:
    """The content identity of a source, for the prepared-data cache (see finetune.data.cache)."""
    from finetune.data import cache

    if src.path:
        return "file:" + cache.file_fingerprint(src.path)
    if Path(src.hub).is_dir():
        return "folder:" + cache.folder_fingerprint(Path(src.hub)) + f":{src.split}"
    return f"hub:{src.hub}:{src.split}:{_load_hub(src)._fingerprint}"


def _read_file(path: Path, encoding: str | None = None) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with _decoding(path, encoding):
            yield from _read_jsonl(path, encoding)
    elif suffix == ".json":
        with _decoding(path, encoding):
            yield from _read_json(path, encoding)
    elif suffix in (".csv", ".tsv"):
        with _decoding(path, encoding):
            yield from _read_csv(path, "\t" if suffix == ".tsv" else ",", encoding)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield Record(row, f"{path} record {i}")
                i += 1
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use one of {', '.join(FILE_SUFFIXES)})")


def open_text(path: Path, encoding: str | None = None, newline: str | None = None):
    """A data file opened for reading text: `encoding` (data.encoding) if given, else UTF-8 with an
    optional BOM skipped (Excel's "CSV UTF-8" and some editors write one)."""
    return open(path, encoding=encoding or "utf-8-sig", newline=newline)


@contextmanager
def _decoding(path: Path, encoding: str | None):
    """Turn a decode error while reading `path` into one line naming the file, the place and the likely encoding."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(_decode_error(path, encoding, e)) from None


def _decode_error(path: Path, encoding: str | None, error: UnicodeDecodeError) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 22)
    try:
        head.decode(encoding or "utf-8-sig")
        line, byte = "", error.object[error.start : error.start + 1]
    except UnicodeDecodeError as e:
        line, byte = f":{head[: e.start].count(NEWLINE) + 1}", head[e.start : e.start + 1]
    where = f"{path}{line}: byte 0x{byte.hex()} is not {encoding or 'UTF-8'} text"
    likely = likely_encoding(head)
    named = f"{likely} (GBK)" if likely == "gb18030" else likely
    if encoding:
        hint = (
            f" (it looks like {named})"
            if likely and codecs.lookup(likely).name != codecs.lookup(encoding).name
            else ""
        )
        return f"{where}{hint}; set data.encoding to the file's encoding"
    if likely:
        return f"{where}; it looks like {named}: set data.encoding={likely} or save the file as UTF-8"
    return f"{where}; set data.encoding to the file's encoding (e.g. gb18030, big5, latin-1) or save it as UTF-8"


def likely_encoding(data: bytes) -> str | None:
    """A guess at the encoding of non-UTF-8 bytes: GB18030 (a superset of GBK and GB2312) when they
    decode to mostly Chinese text, else charset-normalizer's best guess."""
    try:
        text = data.decode("gb18030")
        wide = [c for c in text if ord(c) > 127]
        chinese = sum(
            "\u4e00" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef" for c in wide
        )
        if wide and chinese >= 0.8 * len(wide):
            return "gb18030"
    except UnicodeDecodeError:
        pass
    try:
        import charset_normalizer
    except ImportError:
        return None
    best = charset_normalizer.from_bytes(data[: 1 << 16]).best()
    return best.encoding if best is not None and best.encoding not in ("utf_8", "ascii") else None


def _read_jsonl(path: Path, encoding: str | None = None) -> Iterator[Record]:
    with open_text(path, encoding) as f:
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


def _read_json(path: Path, encoding: str | None = None) -> Iterator[Record]:
    with open_text(path, encoding) as f:
        text = f.read()
    if not text.strip():
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            yield from _read_jsonl(path, encoding)
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


def _read_csv(path: Path, delimiter: str, encoding: str | None = None) -> Iterator[Record]:
    with open_text(path, encoding, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            yield Record(dict(row), f"{path}:{reader.line_num}")


def _load_hub(src: Source, streaming: bool = False):
    import datasets

    try:
        return datasets.load_dataset(src.hub, split=src.split, streaming=streaming)
    except Exception as e:  # offline, unknown id, bad split: one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data: {src.hub!r} is not a local file, a registry name, or a loadable hub dataset: {msg}"
        ) from None


def _read_hub(src: Source, streaming: bool = False) -> Iterator[Record]:
    ds = _load_hub(src, streaming)
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{src.hub}[{src.split}] record {i}")
