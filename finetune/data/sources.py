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
    error: str = ""  # a row that could not be read (malformed JSON), kept for data.skip_bad_rows
    root: str | None = None  # the folder relative image paths in the record resolve against (the data file's)


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
        if isinstance(entry, dict) and is_llamafactory_entry(entry):
            return llamafactory_source(name, entry, reg_path, split)
        if not isinstance(entry, dict):
            raise DataError(f"{reg_path}: {name}: an entry is a mapping (path or hub, format, columns, ...)")
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


# ----------------------------------------------------------------------------- LLaMA-Factory's dataset_info.json

LF_KEYS = {
    "hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name", "file_name", "file_sha1", "formatting",
    "ranking", "subset", "split", "folder", "num_samples", "columns", "tags",
}  # fmt: skip
LF_COLUMNS = {  # LLaMA-Factory column -> our field, by kind of dataset (alpaca formatting)
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "system": "system",
    "tools": "tools",
}
LF_MEDIA = ("images", "videos", "audios")
LF_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
LF_FORMATTINGS = ("alpaca", "sharegpt", "openai")


def is_llamafactory_entry(entry: dict) -> bool:
    """An entry of LLaMA-Factory's dataset_info.json (file_name / hf_hub_url / ... instead of path / hub)."""
    return not ({"path", "hub"} & set(entry)) and bool(LF_KEYS & set(entry))


def llamafactory_source(name: str, entry: dict, reg_path: Path, split: str = "train") -> Source:
    """A dataset_info.json entry as a Source: `file_name` relative to the file's folder (LLaMA-Factory's
    dataset_dir), `formatting` + `ranking` + `columns.kto_tag` -> our format, `columns` and `tags` -> our
    column map (docs/data.md has the table). What we cannot load is refused in one line."""
    where = f"{reg_path}: {name}"
    for key in entry:
        if key not in LF_KEYS:
            raise DataError(f"{where}.{key}: unknown key{closest(key, LF_KEYS)} (a LLaMA-Factory dataset_info entry)")
    if entry.get("ms_hub_url") and not entry.get("hf_hub_url"):
        raise DataError(f"{where}.ms_hub_url: ModelScope datasets are not loaded; download it and set file_name")
    if entry.get("cloud_file_name") and not entry.get("hf_hub_url"):
        raise DataError(f"{where}.cloud_file_name: cloud storage is not read; download it and set file_name")
    if entry.get("script_url") and not entry.get("hf_hub_url"):
        raise DataError(
            f"{where}.script_url: dataset loading scripts are not run (remote code); point file_name at the data files"
        )
    for key, hint in (
        ("subset", "a hub dataset's subset (config) is not selectable; set file_name to its files"),
        ("folder", "a hub repo's folder is not selectable; download it and set file_name"),
        ("num_samples", "LLaMA-Factory samples randomly; use data.max_samples (the first N records)"),
    ):
        if entry.get(key) is not None:
            raise DataError(f"{where}.{key}: {hint}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in LF_FORMATTINGS:
        raise DataError(f"{where}.formatting: {formatting!r} is not one of {', '.join(LF_FORMATTINGS)}")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError(f"{where}: columns and tags are mappings")
    for key in columns:
        if key in LF_MEDIA:
            raise DataError(f"{where}.columns.{key}: multimodal data is not supported (text models only)")
        if key not in {*LF_COLUMNS, "messages", "chosen", "rejected", "kto_tag"}:
            raise DataError(f"{where}.columns.{key}: unknown column{closest(key, [*LF_COLUMNS, 'messages'])}")
    for key in tags:
        if key not in LF_TAGS:
            raise DataError(f"{where}.tags.{key}: unknown tag{closest(key, LF_TAGS)}")
    fmt, mapped = _llamafactory_format(where, formatting, bool(entry.get("ranking")), columns, tags)

    if entry.get("hf_hub_url"):
        src = Source(name=name, hub=entry["hf_hub_url"], split=entry.get("split") or split)
    elif entry.get("file_name"):
        path = (reg_path.parent / entry["file_name"]).resolve()
        if path.is_file():
            src = Source(name=name, path=path)
        elif path.is_dir():
            src = Source(name=name, hub=str(path), split=entry.get("split") or split)
        else:
            raise DataError(f"{where}.file_name: {path}: file not found")
    else:
        raise DataError(f"{where}: needs file_name (or hf_hub_url)")
    src.format, src.columns = fmt, mapped
    return src


def _llamafactory_format(where: str, formatting: str, ranking: bool, columns: dict, tags: dict):
    """(our format, our column map) of a dataset_info entry."""
    kto = "kto_tag" in columns
    if ranking and kto:
        raise DataError(f"{where}: ranking and columns.kto_tag together (a dataset is preference or KTO data)")
    if formatting == "alpaca":
        if tags:
            raise DataError(f"{where}.tags: tags are for sharegpt formatting")
        if set(columns) == {"prompt"}:  # LLaMA-Factory's pre-training entries: the prompt column is the text
            return "text", {"text": columns["prompt"]}
        if ranking:
            fields = {**LF_COLUMNS, "chosen": "chosen", "rejected": "rejected"}
            fmt = "alpaca_preference"
        elif kto:
            fields = {"prompt": "prompt", "query": "input", "response": "completion", "system": "system"}
            fields["kto_tag"], fmt = "label", "kto"
            columns = {"prompt": "instruction", "query": "input", "response": "output", **columns}
        else:
            fields, fmt = LF_COLUMNS, "alpaca"
        unused = [k for k in columns if k not in fields]
        if unused:
            raise DataError(f"{where}.columns.{unused[0]}: not a column of alpaca {fmt} data")
        return fmt, {fields[k]: v for k, v in columns.items() if fields[k] != v}
    # sharegpt / openai: a message list with role/content keys and role values from `tags`
    defaults = (
        {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
         "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}
        if formatting == "openai"
        else {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
              "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
    )  # fmt: skip
    mapped = {**defaults, **tags}
    messages = columns.get("messages", "conversations" if formatting == "sharegpt" else "messages")
    if ranking:
        fmt, fields = "sharegpt_preference", {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    elif kto:
        fmt, fields = "kto", {"messages": "prompt", "kto_tag": "label"}
    else:
        fmt, fields = "sharegpt", {"messages": "conversations", "tools": "tools"}
    fields["system"] = "system"
    unused = [k for k in columns if k not in fields]
    if unused:
        raise DataError(f"{where}.columns.{unused[0]}: not a column of sharegpt {fmt} data")
    mapped.update({fields[k]: v for k, v in {**columns, "messages": messages}.items()})
    return fmt, mapped


def read(src: Source, encoding: str | None = None) -> list[Record]:
    """Every record of `src`; text files are UTF-8 (with or without a BOM) unless `encoding`
    (data.encoding) says otherwise."""
    records = list(iter_records(src, encoding=encoding))
    if not records:
        raise DataError(f"{src.label()}: empty dataset (no records)")
    return records


def iter_records(
    src: Source, streaming: bool = False, encoding: str | None = None, keep_bad: bool = False
) -> Iterator[Record]:
    """The records one by one (JSONL, CSV and Parquet are read row by row, never held whole;
    a JSON array file is parsed whole). `streaming`: a hub dataset is streamed, not downloaded.
    `encoding`: data.encoding for text files (default UTF-8, with or without a BOM). `keep_bad`
    (data.skip_bad_rows): a malformed JSON line is yielded as a Record with `error` set (converting it
    raises that error, which the caller counts and skips) instead of ending the read."""
    if not src.path:
        return _read_hub(src, streaming)
    return _rooted(_read_file(src.path, encoding, keep_bad), str(src.path.parent.absolute()))


def _rooted(records: Iterator[Record], root: str) -> Iterator[Record]:
    for record in records:
        record.root = root
        yield record


def fingerprint(src: Source) -> str:
    """The content identity of a source, for the prepared-data cache (see finetune.data.cache)."""
    from finetune.data import cache

    if src.path:
        return "file:" + cache.file_fingerprint(src.path)
    if Path(src.hub).is_dir():
        return "folder:" + cache.folder_fingerprint(Path(src.hub)) + f":{src.split}"
    return f"hub:{src.hub}:{src.split}:{_load_hub(src)._fingerprint}"


def _read_file(path: Path, encoding: str | None = None, keep_bad: bool = False) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with _decoding(path, encoding):
            yield from _read_jsonl(path, encoding, keep_bad)
    elif suffix == ".json":
        with _decoding(path, encoding):
            yield from _read_json(path, encoding, keep_bad)
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
        line, at = "", None
    except UnicodeDecodeError as e:
        line, at = f":{head[: e.start].count(NEWLINE) + 1}", e.start
    byte = error.object[error.start : error.start + 1] if at is None else head[at : at + 1]
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
    readings = _readings(head, at) if at is not None else ""
    if readings:
        return f"{where}; {readings}: set data.encoding to the one that reads right, or save the file as UTF-8"
    return f"{where}; set data.encoding to the file's encoding (e.g. gb18030, big5, latin-1) or save it as UTF-8"


# Single-byte encodings decode any bytes, so no check proves one: a hint shows how the text reads in each.
SINGLE_BYTE_READINGS = ("cp1252", "cp1250", "cp1251")


def _single_byte(encoding: str) -> bool:
    high = bytes(range(0x80, 0x100))
    return len(high.decode(encoding, errors="replace")) == len(high)


def _readings(data: bytes, at: int) -> str:
    """How the text around byte `at` reads in the common single-byte encodings, when they disagree."""
    import re

    word = re.compile(rb'[^\s",;:.!?()\[\]{}]{1,24}')
    chunk = next((m.group() for m in word.finditer(data, max(0, at - 24), at + 24) if m.start() <= at < m.end()), b"")
    seen: dict[str, list[str]] = {}
    for enc in SINGLE_BYTE_READINGS:
        text = chunk.decode(enc, errors="replace")
        seen.setdefault(text, []).append(enc)
    if len(seen) < 2:
        return ""
    return "it reads as " + ", ".join(f"{text!r} in {'/'.join(encs)}" for text, encs in seen.items())


def _wordlike(text: str) -> bool:
    """The non-ASCII characters of a CJK decoding stand apart from Latin words: a wide character between
    two ASCII letters ("na" + 乯 + "e") is a Latin letter misread as half of a two-byte pair."""
    inside = sum(
        1
        for i in range(1, len(text) - 1)
        if ord(text[i]) > 127 and text[i - 1].isascii() and text[i - 1].isalpha() and text[i + 1].isascii()
        and text[i + 1].isalpha()
    )  # fmt: skip
    return inside <= 0.2 * max(1, sum(ord(c) > 127 for c in text))


def _in_gb2312(c: str) -> bool:
    try:
        c.encode("gb2312")
        return True
    except UnicodeEncodeError:
        return False


def likely_encoding(data: bytes) -> str | None:
    """The encoding of non-UTF-8 bytes, where a check proves it: GB18030 (a superset of GBK and GB2312)
    when the bytes decode to mostly common (GB2312) Chinese text and encode back to themselves; else
    charset-normalizer's guess when it is a multi-byte encoding (whose byte structure the decoding checks)
    that round-trips, with no wide character inside a Latin word.
    A single-byte guess (cp1250 for a Latin-1 file, which reads "naïve" as "naďve") proves nothing: None."""
    try:
        text = data.decode("gb18030")
        wide = [c for c in text if ord(c) > 127]
        chinese = sum(
            "\u4e00" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef" for c in wide
        )
        common = sum(_in_gb2312(c) for c in wide)  # GBK's extension pairs take ASCII trail bytes: "ïv" is one
        if wide and min(chinese, common) >= 0.8 * len(wide) and text.encode("gb18030") == data and _wordlike(text):
            return "gb18030"
    except UnicodeDecodeError:
        pass
    try:
        import charset_normalizer
    except ImportError:
        return None
    sample = data[: 1 << 16]
    best = charset_normalizer.from_bytes(sample).best()
    if best is None or best.encoding in ("utf_8", "ascii") or _single_byte(best.encoding):
        return None
    try:
        decoded = sample.decode(best.encoding)
        proven = decoded.encode(best.encoding) == sample and _wordlike(decoded)
    except (UnicodeError, LookupError):
        return None
    return best.encoding if proven else None


def _read_jsonl(path: Path, encoding: str | None = None, keep_bad: bool = False) -> Iterator[Record]:
    with open_text(path, encoding) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            error = ""
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj, error = None, f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})"
            if not error and not isinstance(obj, dict):
                error = f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
            if error and not keep_bad:
                raise DataError(error)
            yield Record({} if error else obj, f"{path}:{lineno}", error)


def _read_json(path: Path, encoding: str | None = None, keep_bad: bool = False) -> Iterator[Record]:
    with open_text(path, encoding) as f:
        text = f.read()
    if not text.strip():
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or (keep_bad and text.lstrip().startswith("{")):  # JSON Lines in a .json file
            yield from _read_jsonl(path, encoding, keep_bad)
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
            error = f"{path} record {i}: expected a JSON object, got {type(row).__name__}"
            if not keep_bad:
                raise DataError(error)
            yield Record({}, f"{path} record {i}", error)
            continue
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
