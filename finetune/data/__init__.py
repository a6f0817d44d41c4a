"""Dataset loading and formatting: recipe `data:` section -> tokenized train/eval datasets.

`load()` reads the records (registry name, file or hub id) row by row, converts the declared
format to chat / completion / text examples, and encodes them (labels on the answers only,
truncated) through `datasets.map` into Arrow files: memory-mapped, never held as Python lists.
The result is kept in the prepared-data cache (`finetune.data.cache`), built once per node and
reused by every rank, re-run, resumed run and other recipe with the same data and tokenizer.
`data.streaming` encodes on the fly instead (data larger than the disk cache or RAM).
Every failure is a one-line `DataError` naming file, record, field.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import DataSection, check_stage_format
from finetune.data import cache, formats, sources, vision
from finetune.data import encode as encode_module
from finetune.data import images as image_refs
from finetune.data.encode import Encoded, EncodeOptions
from finetune.errors import DataError, plural

log = logging.getLogger("finetune")

SMALL_DATASET = 20_000  # rows below which one process encodes: spawning workers costs more than it saves
MAX_DEFAULT_PROC = 8
WRITE_BATCH = 8192  # converted examples per Arrow record batch
STREAM_SAMPLE = 256  # streaming: records encoded up front (errors, statistics for the plan)
FIRST_BAD_ROWS = 5  # data.skip_bad_rows: how many skipped rows a note names


def default_num_proc(n_rows: int) -> int:
    """data.num_proc when unset: the usable cores (capped), one process for small datasets."""
    if n_rows < SMALL_DATASET:
        return 1
    return max(1, min(MAX_DEFAULT_PROC, len(os.sched_getaffinity(0))))


class EncodedRows(Sequence):
    """The rows of an encoded Arrow dataset as `Encoded` objects, read on access (not held)."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    @staticmethod
    def _row(ids, labels, truncated) -> Encoded:
        return Encoded(list(ids), list(labels), bool(truncated))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        row = self.table[i]
        return self._row(row["input_ids"], row["labels"], row["truncated"])

    def __iter__(self):
        for batch in self.table.select_columns(["input_ids", "labels", "truncated"]).iter(batch_size=1000):
            yield from map(self._row, batch["input_ids"], batch["labels"], batch["truncated"])

    def __add__(self, other):
        return list(self) + list(other)


@dataclass
class Split:
    """One tokenized split (an Arrow dataset: input_ids, labels, truncated, n_trained, length,
    record) and what happened to it on the way."""

    source: str
    table: object  # datasets.Dataset, memory-mapped from the cache
    n_records: int
    n_truncated: int = 0
    n_dropped: int = 0  # truncated until no trained token was left
    cache_dir: Path | None = None
    first_note: str = ""  # the encoder's first note (why a record became several sequences), for the plan

    @property
    def encoded(self) -> EncodedRows:
        return EncodedRows(self.table)

    def dataset(self, with_length: bool = False):
        """What the trainer takes: input_ids and labels (and `length`, for the length-grouped sampler; the image
        references, for a vision-language model's collator)."""
        columns = ["input_ids", "labels"] + (["images"] if "images" in self.table.column_names else [])
        if not with_length:
            return self.table.select_columns(columns)
        from finetune.data import _WithLengths

        rows = self.table.select_columns(columns + ["length"])
        return _WithLengths(
            rows.data, info=rows.info, split=rows.split, indices_table=rows._indices, fingerprint=rows._fingerprint
        )

    def _column(self, name: str):
        return self.table.with_format("arrow")[name].to_numpy()

    def stats(self) -> dict:
        import numpy as np

        lengths = np.sort(self._column("length"))

        def pct(p):
            return int(lengths[min(len(lengths) - 1, int(p * len(lengths)))])

        return {
            "examples": len(lengths),
            "records": self.n_records,
            "truncated": self.n_truncated,
            "dropped": self.n_dropped,
            "tokens": int(lengths.sum()),
            "trained_tokens": int(self._column("n_trained").sum()),
            "length_min": int(lengths[0]),
            "length_mean": round(float(lengths.mean()), 1),
            "length_p50": pct(0.5),
            "length_p95": pct(0.95),
            "length_max": int(lengths[-1]),
        }


def _with_lengths_class():
    import datasets

    class WithLengths(datasets.Dataset):
        """A dataset whose `length` column reads as one list. transformers' length-grouped sampler
        takes `dataset["length"]` and indexes it row by row; on a datasets 5 `Column` that costs
        ~0.1 ms a row (2 minutes per million rows at every epoch), on a list nothing."""

        def __getitem__(self, key):
            if key == "length":  # the base class's lookup on an Arrow-formatted copy: one array
                return datasets.Dataset.__getitem__(self.with_format("arrow"), "length").to_numpy().tolist()
            return super().__getitem__(key)

    WithLengths.__qualname__ = WithLengths.__name__ = "_WithLengths"
    WithLengths.__module__ = __name__
    return WithLengths


def __getattr__(name):  # the datasets subclass is built on first use: importing finetune.data stays light
    if name == "_WithLengths":
        globals()[name] = _with_lengths_class()
        return globals()[name]
    raise AttributeError(name)


@dataclass
class StreamSplit:
    """data.streaming: an IterableDataset encoded on the fly; statistics from its first records."""

    source: str
    stream: object  # datasets.IterableDataset of input_ids + labels
    sample: list[Encoded]
    n_records: int  # of the sample
    n_truncated: int = 0
    n_dropped: int = 0

    @property
    def encoded(self) -> list[Encoded]:
        return self.sample

    def dataset(self, with_length: bool = False):
        return self.stream

    def stats(self) -> dict:
        lengths = sorted(len(e.input_ids) for e in self.sample)

        def pct(p):
            return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

        return {
            "examples": len(lengths),
            "records": self.n_records,
            "truncated": self.n_truncated,
            "dropped": self.n_dropped,
            "tokens": sum(lengths),
            "trained_tokens": sum(e.n_trained for e in self.sample),
            "length_min": lengths[0],
            "length_mean": round(statistics.fmean(lengths), 1),
            "length_p50": pct(0.5),
            "length_p95": pct(0.95),
            "length_max": lengths[-1],
        }


@dataclass
class PreparedData:
    train: Split
    eval: Split | None = None
    format: str = ""
    language: str | None = None
    notes: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)  # chat data: how records became sequences, and why (the plan)


# ----------------------------------------------------------------------------- reading


def _records(src: sources.Source, cfg: DataSection, field_name: str, streaming: bool = False):
    records = sources.iter_records(src, streaming, cfg.encoding, keep_bad=cfg.skip_bad_rows)
    if cfg.max_samples and field_name == "data.train":
        records = itertools.islice(records, cfg.max_samples)
    return records


def _format_of(src: sources.Source, cfg: DataSection, first: sources.Record | None, fmt: str | None = None) -> str:
    if first is None:
        raise DataError(f"{src.label()}: empty dataset (no records)")
    fmt = fmt or cfg.format or src.format or formats.guess_format(first.data)
    if fmt is None:
        raise DataError(f"{first.where}: cannot tell the format from its fields {sorted(first.data)}; set data.format")
    if fmt not in formats.CONVERTERS:
        raise DataError(f"{src.label()}: unknown format {fmt!r} (one of {', '.join(formats.CONVERTERS)})")
    return fmt


def read_examples(
    name: str, cfg: DataSection, fmt: str | None = None, field_name: str = "data.train"
) -> tuple[list[dict], str, sources.Source]:
    """Records of one dataset reference, converted to canonical examples (a list: for previews,
    scoring and eval prompts; training data goes through `load`, which holds no lists)."""
    src = sources.locate(name, split=cfg.split, registry=cfg.registry, field=field_name)
    records = list(_records(src, cfg, field_name))
    fmt = _format_of(src, cfg, next((r for r in records if not r.error), None), fmt)
    columns = {**(src.columns or {}), **cfg.columns}
    if not cfg.skip_bad_rows:
        return formats.convert(records, fmt, columns, cfg.system, *_convert_extra(cfg)), fmt, src
    examples = []
    for record in records:
        try:
            examples += formats.convert([record], fmt, columns, cfg.system, *_convert_extra(cfg))
        except DataError:
            continue
    return examples, fmt, src


SUMMARY_ROWS = 10_000  # phases below this many rows (and a second) log their summary at debug level


class _Progress:
    """A progress bar (on a terminal) and a summary line with rows/s for one phase."""

    def __init__(self, phase: str, label: str, bar: bool = True):
        from tqdm.auto import tqdm

        self.phase, self.label, self.start = phase, label, time.perf_counter()
        self.bar = tqdm(
            desc=f"{phase} {Path(label).name}",
            unit=" rows",
            disable=None if bar else True,
            leave=False,
            mininterval=1.0,
        )

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def done(self, rows: int, what: str = "") -> float:
        self.bar.close()
        seconds = time.perf_counter() - self.start
        # a summary where a phase is worth watching; small demo files stay quiet (errors stay one line)
        level = logging.INFO if seconds >= 1.0 or rows >= SUMMARY_ROWS else logging.DEBUG
        log.log(
            level,
            "%s: %s %s rows in %.1f s (%s rows/s)%s",
            self.phase,
            self.label,
            f"{rows:,}",
            seconds,
            f"{rows / max(seconds, 1e-9):,.0f}",
            what,
        )
        return seconds


def _convert_extra(cfg: DataSection) -> tuple:
    """formats.convert's arguments after `system` that the data section has (data.reasoning_tags)."""
    return (cfg.reasoning_tags,) if getattr(cfg, "reasoning_tags", None) is not None else ()


def _write_examples(
    records, fmt: str, columns: dict, cfg: DataSection, label: str, path: Path
) -> tuple[int, list[str], int, list]:
    """Convert records to canonical examples, row by row, into an Arrow file (JSON per example,
    with its `where` and record number). Returns (records read, skipped rows' first locations, skipped
    count, [how many chats end after their last answer, the first of them])."""
    import pyarrow as pa

    schema = pa.schema([("example", pa.large_string()), ("where", pa.string()), ("record", pa.int64())])
    batch, n, bad, n_bad = {"example": [], "where": [], "record": []}, 0, [], 0
    trailing = [0, ""]  # chats whose last turn is not an answer: that turn trains nothing
    progress = _Progress("read", label)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:

        def flush():
            writer.write_batch(pa.record_batch([batch[k] for k in ("example", "where", "record")], schema=schema))
            progress.update(len(batch["record"]))
            for v in batch.values():
                v.clear()

        for record in records:
            try:
                example = formats.convert([record], fmt, columns, cfg.system, *_convert_extra(cfg))[0]
            except DataError as e:
                if not cfg.skip_bad_rows:
                    raise
                n_bad += 1
                if len(bad) < FIRST_BAD_ROWS:
                    bad.append(str(e))
                continue
            messages = example.get("messages")
            if messages and messages[-1].get("role") != "assistant":
                trailing[0] += 1
                trailing[1] = trailing[1] or record.where
            batch["example"].append(json.dumps(example, ensure_ascii=False))
            batch["where"].append(record.where)
            batch["record"].append(n)
            n += 1
            if len(batch["record"]) >= WRITE_BATCH:
                flush()
        if batch["record"]:
            flush()
    progress.done(n, f", {n_bad:,} bad rows skipped" if n_bad else "")
    return n, bad, n_bad, trailing


# ----------------------------------------------------------------------------- encoding


def _encode_batch(batch: dict, tok, max_length: int | None, options, skip_bad: bool = False) -> dict:
    """datasets.map function: canonical examples -> encoded rows (a record may give several). `tok` is a
    processor for a vision-language model (finetune.data.vision): its rows also hold their images, and a bad
    record under data.skip_bad_rows one row with its `error`."""
    out = {"input_ids": [], "labels": [], "truncated": [], "n_trained": [], "length": [], "record": [], "note": []}
    examples = [json.loads(text) for text in batch["example"]]
    if vision.is_processor(tok):
        out.update(images=[], error=[])
        encoded = vision.encode_many(
            tok, examples, max_length, options=options, where=batch["where"], skip_bad=skip_bad
        )
    else:
        for example, where in zip(examples, batch["where"]):
            if example.get("images"):
                raise DataError(
                    f"{where}: the record has images but the model is not a vision-language model "
                    "(its config has no vision part)"
                )
        encoded = encode_module.encode_many(tok, examples, max_length, options=options, where=batch["where"])
    for sequences, record in zip(encoded, batch["record"]):
        for enc in sequences:
            if "images" in out:
                out["images"].append(enc.images or [])
                out["error"].append(enc.error)
            out["input_ids"].append(enc.input_ids)
            out["labels"].append(enc.labels)
            out["truncated"].append(bool(enc.truncated))
            out["n_trained"].append(enc.n_trained)
            out["length"].append(len(enc.input_ids))
            out["record"].append(record)
            out["note"].append(enc.note or "")
    return out


def _features(with_images: bool = False):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    features = {
        "input_ids": ids,
        "labels": ids,
        "truncated": datasets.Value("bool"),
        "n_trained": datasets.Value("int32"),
        "length": datasets.Value("int32"),
        "record": datasets.Value("int64"),
        "note": datasets.Value("string"),
    }
    if with_images:
        features.update(images=datasets.List(datasets.Value("string")), error=datasets.Value("string"))
    return datasets.Features(features)


def _options_key(options):
    options = options or EncodeOptions()  # no options and the default options encode the same: one key
    key = getattr(options, "key", None)
    return key() if callable(key) else repr(options)


def _build(src, records, fmt, columns, cfg: DataSection, tok, max_length, options, tmp: Path) -> dict:
    """Read, convert and encode one source into `tmp/dataset`; returns what the entry holds."""
    import datasets
    import numpy as np

    label = src.label()
    start = time.perf_counter()
    n_records, bad, n_bad, trailing = _write_examples(records, fmt, columns, cfg, label, tmp / "examples.arrow")
    if n_records == 0:
        raise DataError(f"{label}: empty dataset (no records)" + (f"; {n_bad} bad rows skipped" if n_bad else ""))
    raw = datasets.Dataset.from_file(str(tmp / "examples.arrow"))
    num_proc = min(cfg.num_proc or default_num_proc(n_records), n_records)
    progress = _Progress("encode", label, bar=False)  # datasets.map draws the bar
    bars = datasets.is_progress_bar_enabled()
    if not bars and n_records >= SMALL_DATASET:
        datasets.enable_progress_bars()
    try:
        with cache.workers_die_with_this_process():  # kill -9 of this process leaves no worker behind
            encoded = raw.map(
                _encode_batch,
                batched=True,
                batch_size=64,  # measured: 64 chats per tokenizer call is ~9% faster than 256 (bench/README.md)
                num_proc=num_proc if num_proc > 1 else None,
                fn_kwargs={"tok": tok, "max_length": max_length, "options": options, "skip_bad": cfg.skip_bad_rows},
                remove_columns=raw.column_names,
                features=_features(vision.is_processor(tok)),
                cache_file_name=str(tmp / "encoded.arrow"),
                new_fingerprint=tmp.name,
                desc=f"encode {Path(label).name}",
            )
    finally:
        if not bars:
            datasets.disable_progress_bars()
    encode_seconds = progress.done(n_records, f", {num_proc} process(es)")
    n_trained = encoded.with_format("arrow")["n_trained"].to_numpy()
    n_truncated = int(encoded.with_format("arrow")["truncated"].to_numpy().sum())
    keep = np.flatnonzero(n_trained > 0)
    n_refused = 0
    if "error" in encoded.column_names:  # records the image checks refused under data.skip_bad_rows
        errors = encoded.with_format("arrow")["error"].to_numpy(zero_copy_only=False)
        refused = np.flatnonzero(errors != "")
        n_refused, n_bad = len(refused), n_bad + len(refused)
        bad += [str(errors[i]) for i in refused[: max(0, FIRST_BAD_ROWS - len(bad))]]
    if len(keep) == 0:
        raise DataError(
            f"{label}: all {n_records} records are longer than train.max_length={max_length} "
            "before their answers start (nothing left to train); raise train.max_length"
        )
    noted = np.flatnonzero(encoded.with_format("arrow")["note"].to_numpy(zero_copy_only=False) != "")
    first_note = ""
    if len(noted):
        row = encoded.with_format("arrow")[int(noted[0])]
        first_note = f"record {row['record'][0].as_py()}: {row['note'][0].as_py()}"
    # The entry is map's own output files (no second copy); rows left with nothing to train are
    # skipped through an index list applied when it is loaded.
    (tmp / "examples.arrow").unlink()  # still mapped by `raw`: fine on POSIX
    files = sorted(p.name for p in tmp.glob("encoded*.arrow"))
    if len(keep) < len(encoded):
        np.save(tmp / "keep.npy", keep)
    return {
        "files": files,
        "source": label,
        "format": fmt,
        "language": src.language,
        "records": n_records,
        "examples": len(keep),
        "truncated": n_truncated,
        "dropped": int(len(n_trained) - len(keep) - n_refused),
        "bad_rows": n_bad,
        "first_bad_rows": bad,
        "trailing_turns": trailing,
        "first_note": first_note,
        "max_length": max_length,
        "num_proc": num_proc,
        "encode_rows_per_s": round(n_records / max(encode_seconds, 1e-9), 1),
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _open_entry(path: Path, meta: dict):
    """The encoded rows of a cache entry, memory-mapped (the files of every map process, in order)."""
    import datasets
    import numpy as np

    parts = [datasets.Dataset.from_file(str(path / f)) for f in meta["files"]]
    table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    table = table.remove_columns([c for c in ("note", "error") if c in table.column_names])
    if (path / "keep.npy").is_file():
        table = table.select(np.load(path / "keep.npy"))
    return table


def cache_key_parts(src, fmt, columns, cfg: DataSection, tok, max_length, options, field_name) -> dict:
    """Everything that changes an encoded split (see finetune.data.cache for the choices)."""
    return {
        "source": sources.fingerprint(src),
        "format": fmt,
        "columns": columns,
        "system": cfg.system,
        "conversion": _convert_extra(cfg),
        "encoding": cfg.encoding,
        "max_samples": cfg.max_samples if field_name == "data.train" else None,
        "skip_bad_rows": cfg.skip_bad_rows,
        "tokenizer": cache.tokenizer_fingerprint(tok),
        "images": _images_fingerprint(src, fmt, columns, cfg, field_name) if vision.is_processor(tok) else None,
        "options": _options_key(options),
        "max_length": max_length,
        "truncation": "keep_start",
        "encoder": encode_module.ENCODER_VERSION,
    }


def _images_fingerprint(src, fmt, columns, cfg: DataSection, field_name: str) -> str:
    """The content of every image the source's records name (a pass over the records before the cache is
    looked up: an image edited in place is new data)."""
    refs = []
    for record in _records(src, cfg, field_name):
        try:
            refs += formats.convert([record], fmt, columns, cfg.system, *_convert_extra(cfg))[0].get("images") or []
        except DataError:
            refs.append(f"bad:{record.where}")  # the record's own error comes when it is encoded
    return image_refs.fingerprint(refs)


def open_source(name: str, cfg: DataSection, stage: str, field_name: str, streaming: bool = False):
    """One data reference, checked before any work: (source, its records (an iterator, read once),
    format (fits the stage), column map). Unknown data.columns fail here."""
    src = sources.locate(name, split=cfg.split, registry=cfg.registry, field=field_name)
    records = _records(src, cfg, field_name, streaming)
    bad = []  # data.skip_bad_rows: unreadable rows before the first one the format is guessed from
    first = next(records, None)
    while first is not None and first.error:
        bad.append(first)
        first = next(records, None)
    fmt = _format_of(src, cfg, first)
    if stage is not None:  # None: any format (the file form of `data preview`)
        check_stage_format(stage, fmt, lambda: f"{src.label()}: data.format")
    columns = {**(src.columns or {}), **cfg.columns}
    formats.convert([], fmt, columns)
    return src, itertools.chain(bad, [first], records), fmt, columns


def prepare_split(
    name: str,
    cfg: DataSection,
    tok,
    max_length: int | None,
    options=None,
    field_name: str = "data.train",
    stage: str = "sft",
) -> tuple[Split, str, sources.Source, list[str]]:
    """One source encoded (from the cache when it holds it): (split, format, source, notes)."""
    src, records, fmt, columns = open_source(name, cfg, stage, field_name)

    def build(tmp: Path) -> dict:
        return _build(src, records, fmt, columns, cfg, tok, max_length, options, tmp)

    start = time.perf_counter()
    if cfg.cache == "off":
        path = cache.private_dir()  # data.cache: off
        meta = build(path)
    else:
        key = cache.key_of(cache_key_parts(src, fmt, columns, cfg, tok, max_length, options, field_name))
        builds = cache.builds
        path = cache.obtain(key, build, cfg.cache)
        meta = cache.read_meta(path)
        if cache.builds == builds:
            log.info(
                "cache: %s %s examples from %s (%.1f s)",
                src.label(),
                f"{meta['examples']:,}",
                path,
                time.perf_counter() - start,
            )
        else:
            log.info("cache: %s saved in %s", src.label(), path)
    table = _open_entry(path, meta)
    split = Split(src.label(), table, meta["records"], meta["truncated"], meta["dropped"], path, meta["first_note"])
    notes = []
    trailing, first = meta.get("trailing_turns") or [0, ""]
    if trailing:
        notes.append(
            f"{src.label()}: {plural(trailing, 'conversation')} {'ends' if trailing == 1 else 'end'} with a turn "
            f"after the last answer (first: "
            f"{first}); nothing is trained from such a turn, and it is left out of the sequence"
        )
    if meta.get("bad_rows"):
        notes.append(
            f"{src.label()}: {meta['bad_rows']} bad records skipped (data.skip_bad_rows), first: "
            + "; ".join(meta["first_bad_rows"])
        )
    return split, fmt, src, notes


def chat_mode_note(label: str, split, options: EncodeOptions, why: str) -> str:
    """Which encoding mode a chat dataset got, and why (one line for the dry-run plan)."""
    turns = "the last assistant turn of each record" if options.train_on == "last_turn" else "every assistant turn"
    n_seq, n_rec = len(split.encoded), split.n_records - split.n_dropped
    if options.train_on == "last_turn" and not why:
        return f"{label}: one sequence per record, {turns} trained on its inference prompt (data.train_on=last_turn)"
    if n_seq <= n_rec and not why:
        return (
            f"{label}: chat template prefix-consistent: one sequence per record, {turns} trained "
            f"(data.train_on={options.train_on})"
        )
    return (
        f"{label}: {n_seq} sequences from {split.n_records} records, {turns} trained "
        f"(data.train_on={options.train_on}), each on exactly its inference prompt; first case: {why}"
    )


NOT_CHAT_FORMATS = ("prompt_completion", "text")


def load_recipe(recipe, tok) -> PreparedData:
    """A recipe's SFT data, exactly as `finetune train` encodes it (and `finetune data prepare` caches it for
    train: one call, so the two commands compute one cache key)."""
    return load(
        recipe.data,
        tok,
        recipe.train["max_length"],
        seed=recipe.train["seed"],
        options=encode_module.options_of(recipe),
    )


def load(cfg: DataSection, tok, max_length: int | None, seed: int = 42, options=None) -> PreparedData:
    """The SFT data (the other stages' is `finetune.data.pairs.load`)."""
    if cfg.streaming:
        return load_streaming(cfg, tok, max_length, options)
    train, fmt, src, notes = prepare_split(cfg.train, cfg, tok, max_length, options)
    prepared = PreparedData(train=train, format=fmt, language=src.language, notes=notes)
    if fmt not in NOT_CHAT_FORMATS:
        prepared.modes = [chat_mode_note(train.source, train, options or EncodeOptions(), train.first_note)]
    if cfg.eval:
        prepared.eval, _, _, eval_notes = prepare_split(cfg.eval, cfg, tok, max_length, options, "data.eval")
        prepared.notes += eval_notes
    elif cfg.eval_ratio:
        prepared.train, prepared.eval = _split(prepared.train, cfg.eval_ratio, seed)
    for split in (prepared.train, prepared.eval):
        if split and (split.n_truncated or split.n_dropped):
            prepared.notes.append(
                f"{split.source}: {split.n_truncated} of {split.n_records} records truncated to "
                f"train.max_length={max_length}, {split.n_dropped} dropped (no answer token left)"
            )
    return prepared


def heldout_indices(n: int, ratio: float, seed: int) -> set[int]:
    """Which of n examples data.eval_ratio holds out (also used by finetune.eval to find them)."""
    import random

    n_eval = max(1, round(n * ratio))
    if n_eval >= n:
        raise DataError(f"data.eval_ratio: {ratio} of {n} examples leaves nothing to train on")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:n_eval])


def _split(train: Split, ratio: float, seed: int) -> tuple[Split, Split]:
    import numpy as np

    n = len(train.table)
    held = np.zeros(n, dtype=bool)
    held[list(heldout_indices(n, ratio, seed))] = True
    keep, out = train.table.select(np.flatnonzero(~held)), train.table.select(np.flatnonzero(held))
    n_eval = len(out)
    n_out_truncated = int(out.with_format("arrow")["truncated"].to_numpy().sum())
    return (
        Split(
            train.source,
            keep,
            train.n_records - n_eval,
            train.n_truncated - n_out_truncated,
            train.n_dropped,
            train.cache_dir,
        ),
        Split(f"{train.source} (held out {ratio:g})", out, n_eval, n_out_truncated, 0, train.cache_dir),
    )


# ----------------------------------------------------------------------------- streaming


def _stream_rows(
    src, fmt, columns, cfg: DataSection, shards: list[int] | None = None, n_shards: int = 1, report: bool = True
):
    """Generator of canonical examples for IterableDataset.from_generator (errors name the row).
    Shard k of n keeps records k, k + n, k + 2n, ...: each rank reads the stream (cheap) and
    converts and encodes only its own records."""
    n_bad = 0
    for n, record in enumerate(_records(src, cfg, "data.train", streaming=True)):
        if shards is not None and n % n_shards not in shards:
            continue
        try:
            example = formats.convert([record], fmt, columns, cfg.system, *_convert_extra(cfg))[0]
        except DataError as e:
            if not cfg.skip_bad_rows:
                raise
            n_bad += 1
            if report and (n_bad <= FIRST_BAD_ROWS or n_bad % 1000 == 0):
                log.warning("data.skip_bad_rows: %s skipped so far; this one: %s", f"{n_bad:,}", e)
            continue
        yield {"example": json.dumps(example, ensure_ascii=False), "where": record.where, "record": n}


def stream_shards() -> int:
    """Shards of a stream: one per process of the run (WORLD_SIZE, set by accelerate launch /
    torchrun), so that accelerate hands each rank exactly one (it splits a datasets
    IterableDataset by whole shards when it has at least as many as processes)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def load_streaming(cfg: DataSection, tok, max_length: int | None, options=None) -> PreparedData:
    """data.streaming: read and encode while training (train.max_steps sets the length of the run).

    The first STREAM_SAMPLE records are encoded up front: their errors surface before any output
    dir exists, and they give the plan's statistics; an error deeper in the stream stops training.
    Under DDP the stream has one shard per process (`stream_shards`); accelerate gives rank r shard
    r: records r, r + W, r + 2W, ... of the W processes, dealt round-robin, so the ranks' shares differ
    by at most one record whatever the count, and no record is encoded twice. Each rank reads
    (not encodes) the whole source. The stream repeats without end: a rank reads its share again
    when it is through it, and every rank takes train.max_steps steps. Resuming re-reads and
    re-encodes the consumed part of the stream to skip it (the trainer skips the batches it
    consumed), so a resumed run sees exactly the batches an uninterrupted one would."""
    import datasets

    if vision.is_processor(tok):
        raise DataError(
            "data.streaming: not supported for vision-language models yet; prepare the data (no streaming)"
        )
    if cfg.eval or cfg.eval_ratio:
        raise DataError(
            "data.streaming: eval data is not streamed; unset data.eval / data.eval_ratio "
            "(or prepare the data without streaming)"
        )
    src, _, fmt, columns = open_source(cfg.train, cfg, "sft", "data.train", streaming=True)  # the stream re-reads
    sample_rows = list(itertools.islice(_stream_rows(src, fmt, columns, cfg, report=False), STREAM_SAMPLE))
    if not sample_rows:
        raise DataError(f"{src.label()}: no record could be read (data.skip_bad_rows skipped every one)")
    n_bad = sample_rows[-1]["record"] + 1 - len(sample_rows)  # records before the last kept one, not kept
    batch = {k: [r[k] for r in sample_rows] for k in ("example", "where", "record")}
    sample = _encode_batch(batch, tok, max_length, options)
    encoded = [
        Encoded(i, lab, t)
        for i, lab, t, n in zip(sample["input_ids"], sample["labels"], sample["truncated"], sample["n_trained"])
        if n > 0
    ]
    if not encoded:
        raise DataError(
            f"{src.label()}: the first {len(sample_rows)} records are longer than train.max_length="
            f"{max_length} before their answers start (nothing left to train); raise train.max_length"
        )
    n_shards = stream_shards()
    stream = datasets.IterableDataset.from_generator(
        _stream_rows,
        gen_kwargs={
            "src": src,
            "fmt": fmt,
            "columns": columns,
            "cfg": cfg,
            "shards": list(range(n_shards)),  # datasets splits the list: one shard per process
            "n_shards": n_shards,
        },
        features=datasets.Features(
            {
                "example": datasets.Value("large_string"),
                "where": datasets.Value("string"),
                "record": datasets.Value("int64"),
            }
        ),
    )
    stream = stream.map(
        _encode_batch,
        batched=True,
        batch_size=64,
        remove_columns=["example", "where", "record"],
        fn_kwargs={"tok": tok, "max_length": max_length, "options": options},
        features=_features(),
    )
    stream = stream.filter(lambda n: n > 0, input_columns=["n_trained"]).select_columns(["input_ids", "labels"])
    # Endless: the trainer's one pass is train.max_steps batches, read across the stream's end (no short
    # batch there), and a resumed run skips exactly the batches it consumed (a trainer restarting a
    # finite stream at its end would count the skip from the wrong place).
    stream = stream.repeat(None)
    split = StreamSplit(
        f"{src.label()} (streamed)",
        stream,
        encoded,
        len(sample_rows),
        sum(sample["truncated"]),
        len(sample["n_trained"]) - len(encoded),
    )
    notes = [
        f"data.streaming: statistics of the first {len(sample_rows)} records; the stream is encoded while training"
    ]
    if n_bad:
        notes.append(
            f"{src.label()}: {n_bad} bad records skipped among the first {n_bad + len(sample_rows)} "
            "(data.skip_bad_rows); while training, the log names the first "
            f"{FIRST_BAD_ROWS} skipped and counts every 1000th"
        )
    return PreparedData(train=split, format=fmt, language=src.language, notes=notes)
