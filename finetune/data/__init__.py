"""Dataset loading and formatting: recipe `data:` section -> tokenized train/eval datasets.

`load()` reads the records (registry name, file or hub id), converts the declared format to
chat / completion / text examples, tokenizes them with labels on the answers only, truncates,
and splits off eval data. Every failure is a one-line `DataError` naming file, record, field.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

from finetune.config import DataSection, check_stage_format
from finetune.data import formats, sources
from finetune.data.encode import Encoded, EncodeOptions, encode
from finetune.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """One tokenized split and what happened to it on the way."""

    source: str
    encoded: list[Encoded]
    n_records: int
    n_truncated: int = 0
    n_dropped: int = 0  # truncated until no trained token was left
    mode: str = ""  # chat data: how records became sequences, and why (for the plan)

    def dataset(self):
        import datasets

        return datasets.Dataset.from_dict(
            {"input_ids": [e.input_ids for e in self.encoded], "labels": [e.labels for e in self.encoded]}
        )

    def stats(self) -> dict:
        lengths = sorted(len(e.input_ids) for e in self.encoded)
        trained = sum(e.n_trained for e in self.encoded)
        total = sum(lengths)

        def pct(p):
            return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

        return {
            "examples": len(self.encoded),
            "records": self.n_records,
            "truncated": self.n_truncated,
            "dropped": self.n_dropped,
            "tokens": total,
            "trained_tokens": trained,
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
    modes: list[str] = field(default_factory=list)  # chat data: how records became sequences, and why (plan)


def read_examples(name: str, cfg: DataSection, fmt: str | None = None, field_name: str = "data.train") -> tuple[list[dict], str, sources.Source]:
    """Records of one dataset reference, converted to canonical examples."""
    src = sources.resolve(name, split=cfg.split, registry=cfg.registry, field=field_name)
    records = sources.read(src, cfg.encoding)
    if cfg.max_samples and field_name == "data.train":
        records = records[: cfg.max_samples]
    fmt = fmt or cfg.format or src.format or formats.guess_format(records[0].data)
    if fmt is None:
        raise DataError(f"{records[0].where}: cannot tell the format from its fields {sorted(records[0].data)}; set data.format")
    if fmt not in formats.CONVERTERS:
        raise DataError(f"{src.label()}: unknown format {fmt!r} (one of {', '.join(formats.CONVERTERS)})")
    columns = {**(src.columns or {}), **cfg.columns}
    return formats.convert(records, fmt, columns, cfg.system, cfg.reasoning_tags), fmt, src


def _encode_all(examples: list[dict], tok, max_length: int | None, label: str,
                options: EncodeOptions | None = None) -> Split:
    split = Split(source=label, encoded=[], n_records=len(examples))
    note = ""
    for i, example in enumerate(examples):
        try:
            sequences = encode(tok, example, max_length, options=options)
        except DataError as e:
            raise DataError(f"{label} record {i}: {e}") from None
        if sequences[0].note and not note:
            note = f"record {i}: {sequences[0].note}"
        for enc in sequences:
            if enc.truncated:
                split.n_truncated += 1
            if enc.n_trained == 0:
                split.n_dropped += 1
                continue
            split.encoded.append(enc)
    if "messages" in (examples[0] if examples else {}):
        split.mode = chat_mode_note(label, split, options or EncodeOptions(), note)
    if not split.encoded:
        raise DataError(
            f"{label}: all {split.n_records} records are longer than train.max_length={max_length} "
            "before their answers start (nothing left to train); raise train.max_length"
        )
    return split


def chat_mode_note(label: str, split: Split, options: EncodeOptions, why: str) -> str:
    """Which encoding mode a chat dataset got, and why (one line for the dry-run plan)."""
    turns = "the last assistant turn of each record" if options.train_on == "last_turn" else "every assistant turn"
    n_seq, n_rec = len(split.encoded), split.n_records - split.n_dropped
    if options.train_on == "last_turn" and not why:
        return f"{label}: one sequence per record, {turns} trained on its inference prompt (data.train_on=last_turn)"
    if n_seq <= n_rec and not why:
        return (f"{label}: chat template prefix-consistent: one sequence per record, {turns} trained "
                f"(data.train_on={options.train_on})")
    return (f"{label}: {n_seq} sequences from {split.n_records} records, {turns} trained "
            f"(data.train_on={options.train_on}), each on exactly its inference prompt; first case: {why}")


def load(cfg: DataSection, tok, max_length: int | None, seed: int = 42,
         options: EncodeOptions | None = None) -> PreparedData:
    """The SFT data (the other stages' is `finetune.data.pairs.load`)."""
    examples, fmt, src = read_examples(cfg.train, cfg)
    check_stage_format("sft", fmt, lambda: f"{src.label()}: data.format")
    prepared = PreparedData(train=_encode_all(examples, tok, max_length, src.label(), options), format=fmt,
                            language=src.language)
    prepared.modes = [prepared.train.mode] if prepared.train.mode else []
    if cfg.eval:
        eval_examples, _, eval_src = read_examples(cfg.eval, cfg, fmt=None if cfg.format is None else cfg.format, field_name="data.eval")
        prepared.eval = _encode_all(eval_examples, tok, max_length, eval_src.label(), options)
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
    held = heldout_indices(len(train.encoded), ratio, seed)
    n_eval = len(held)
    keep = [e for i, e in enumerate(train.encoded) if i not in held]
    out = [e for i, e in enumerate(train.encoded) if i in held]
    n_out_truncated = sum(e.truncated for e in out)
    return (
        Split(train.source, keep, train.n_records - n_eval, train.n_truncated - n_out_truncated, train.n_dropped),
        Split(f"{train.source} (held out {ratio:g})", out, n_eval, n_out_truncated),
    )
