"""The data of the stages after SFT: preference pairs (rm, dpo, orpo, cpo, simpo), KTO examples
and prompts (ppo, grpo, rloo), as untokenised conversational datasets the TRL trainers tokenise.

`load(cfg, tok, stage)` mirrors `finetune.data.load` (same sources, formats, eval split,
errors, data.skip_bad_rows); the splits also give token statistics for the dry-run plan and the
model card. Records are read and converted row by row into Arrow files (a private temp dir,
removed at exit) and memory-mapped: a million-pair set is not held in memory, and TRL's own
tokenization (`datasets.map`, dataset_num_proc) caches its result next to them, so under DDP the
ranks after the first reuse it.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import RL_STAGES, DataSection
from finetune.data import (
    PreparedData,
    _write_examples,
    heldout_indices,
    log,
    open_source,
    vision,
)
from finetune.data import cache as data_cache
from finetune.data import images as image_refs
from finetune.data.preference import PAIR_FORMATS, prompt_only, unpair
from finetune.errors import DataError

STATS_SAMPLE = 4000  # token statistics of a bigger split are estimated from this many examples


def _without_nulls(value):
    """A row as the converter made it: Arrow gives every row every key of the file's schema (null
    where a row had none); dropping them restores the example."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


class ExampleRows(Sequence):
    """The examples of an Arrow dataset as dicts, read on access (not held)."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [_without_nulls(row) for row in self.table.select(range(*i.indices(len(self))))]
        return _without_nulls(self.table[i + len(self) if i < 0 else i])

    def __iter__(self):
        for batch in self.table.iter(batch_size=1000):
            columns = list(batch)
            yield from (_without_nulls(dict(zip(columns, row))) for row in zip(*batch.values()))


@dataclass
class ExampleSplit:
    """Canonical examples of one split (pairs, KTO examples or prompts)."""

    source: str
    table: object  # datasets.Dataset (memory-mapped), or a list of example dicts
    n_records: int
    tok: object = field(default=None, repr=False)
    n_dropped: int = 0  # set by a stage whose trainer drops examples (RewardTrainer: longer than max_length)
    template_kwargs: dict = field(default_factory=dict)  # model.chat_template_kwargs, as TRL renders them
    _lengths: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def examples(self) -> Sequence[dict]:
        return self.table if isinstance(self.table, list) else ExampleRows(self.table)

    @property
    def encoded(self) -> Sequence[dict]:  # what TrainPlan counts
        return self.examples

    def dataset(self):
        """What the trainer takes (every row has every key of the split; null where a record had none). Pairs
        with images keep their references in the Arrow file; they are opened as rows are read (TRL's vision
        collator takes PIL images)."""
        import datasets

        table = datasets.Dataset.from_list(self.table) if isinstance(self.table, list) else self.table
        if "images" not in table.column_names:
            return table
        return table.with_transform(_opened_images(self.source))

    def lengths(self) -> list[tuple[int, int]]:
        """(tokens in the longest sequence the example makes, answer tokens) per example, for at most
        STATS_SAMPLE examples (a seeded sample of a bigger split: rendering and tokenizing every pair
        of a million-row set would take minutes before training starts; the trainer tokenizes them
        all anyway, in parallel). Computed once."""
        if self._lengths is None:
            examples = self.examples
            if len(examples) > STATS_SAMPLE:
                sample = sorted(random.Random(0).sample(range(len(examples)), STATS_SAMPLE))
                if isinstance(self.table, list):
                    examples = [self.table[i] for i in sample]
                else:
                    examples = ExampleRows(self.table.select(sample))
            self._lengths = []
            for e in examples:
                prompt = _n_tokens(self.tok, e["prompt"], generation_prompt=True, **self.template_kwargs)
                answers = [e[k] for k in ("chosen", "rejected", "completion") if k in e]
                full = [_n_tokens(self.tok, e["prompt"] + a, **self.template_kwargs) for a in answers] or [prompt]
                self._lengths.append((max(full), sum(n - prompt for n in full)))
        return self._lengths

    def stats(self) -> dict:
        """Token statistics; for a split of more than STATS_SAMPLE examples, `sampled` says how many
        they are estimated from (totals scaled up; min, max and percentiles those of the sample)."""
        lengths = self.lengths()
        seq = sorted(n for n, _ in lengths)
        scale = len(self.examples) / len(lengths)

        def pct(p):
            return seq[min(len(seq) - 1, int(p * len(seq)))]

        return {
            "examples": len(self.examples),
            "records": self.n_records,
            "dropped": self.n_dropped,
            "tokens": round(sum(seq) * scale),
            "trained_tokens": round(sum(a for _, a in lengths) * scale),
            "length_min": seq[0],
            "length_mean": round(statistics.fmean(seq), 1),
            "length_p50": pct(0.5),
            "length_p95": pct(0.95),
            "length_max": seq[-1],
            "sampled": len(lengths) if scale > 1 else 0,
        }


def _opened_images(label: str):
    """A `with_transform` function: each row's image references -> RGB PIL images (none: an empty list)."""

    def transform(batch: dict) -> dict:
        opened = [
            [image_refs.open_image(ref, f"{label}: image {ref[:60]!r}") for ref in refs or []]
            for refs in batch["images"]
        ]
        return {**batch, "images": opened}

    return transform


def _n_tokens(tok, messages, generation_prompt=False, **template_kwargs) -> int:
    """Tokens of a chat (a processor's: its text, each image counted as its unexpanded placeholder)."""
    tok = vision.tokenizer_of(tok)
    if isinstance(messages, str):  # a raw-text prompt (prompt_completion data for an RL stage)
        return len(tok(messages)["input_ids"])
    return len(
        tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True, **template_kwargs
        )["input_ids"]
    )


def _shape(examples: list[dict], fmt: str, stage: str, template_kwargs: dict | None = None) -> list[dict]:
    """Examples of format `fmt` -> what `stage` trains on. The preference trainers render each
    example with its `chat_template_kwargs` (TRL reads them per example); the RL stages take them
    from their TRL config (or PPO from its own rendering)."""
    if stage in RL_STAGES:
        return [prompt_only(e) for e in examples]
    if stage == "kto" and fmt in PAIR_FORMATS:
        examples = unpair(examples)
    if template_kwargs:
        examples = [{**e, "chat_template_kwargs": dict(template_kwargs)} for e in examples]
    return examples


def _converted(name: str, cfg: DataSection, stage: str, field_name: str, tmp: Path):
    """One source read and converted row by row into `tmp` (JSON per example):
    (path, format, source, records, notes)."""
    src, records, fmt, columns = open_source(name, cfg, stage, field_name)
    path = tmp / f"{field_name}.json.arrow"
    n, bad, n_bad, _ = _write_examples(records, fmt, columns, cfg, src.label(), path)
    if n == 0:
        raise DataError(
            f"{src.label()}: empty dataset (no records)" + (f"; {n_bad} bad rows skipped" if n_bad else "")
        )
    notes = []
    if n_bad:
        notes.append(f"{src.label()}: {n_bad} bad records skipped (data.skip_bad_rows), first: " + "; ".join(bad))
    return path, fmt, src, n, notes


class _OneTypePerField:
    """A column holds one type: a field (a prompt's extra `answer`, say) that is text in one record
    and a number in another is a one-line error naming both records, not an Arrow traceback."""

    def __init__(self):
        self.seen: dict[str, tuple[str, str]] = {}

    @staticmethod
    def _kind(value) -> str:
        if isinstance(value, bool):
            return "a boolean"
        if isinstance(value, (int, float)):
            return "a number"
        return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)

    def __call__(self, example: dict, where: str) -> None:
        for field_name, value in example.items():
            if value is None:
                continue
            kind = self._kind(value)
            first = self.seen.setdefault(field_name, (kind, where))
            if first[0] != kind:
                raise DataError(
                    f"{where}: field {field_name!r}: {kind} here, but {first[0]} at {first[1]}; "
                    "a field holds one type in every record"
                )


def _to_arrow(json_path: Path, route, fmt: str, stage: str, out: dict[str, Path], template_kwargs=None) -> dict:
    """The converted examples, shaped for `stage` and routed by record number (`route(n)` names the
    output, or None to drop), as Arrow tables of real columns, a batch at a time. Two passes: the
    first unifies each output's schema over all rows (rows differ in their keys: a message with a
    `name`, a prompt with extra fields), the second writes every batch in it."""
    import datasets
    import pyarrow as pa

    def shaped_batches(check=None):
        with pa.memory_map(str(json_path)) as source:
            for batch in pa.ipc.open_stream(source):
                routed: dict[str, list[dict]] = {}
                columns = ("example", "record", "where")
                for text, n, where in zip(*(batch.column(c).to_pylist() for c in columns)):
                    name = route(n)
                    if name is not None:
                        example = json.loads(text)
                        if check:
                            check(example, where)
                        routed.setdefault(name, []).append(example)
                yield {name: _shape(rows, fmt, stage, template_kwargs) for name, rows in routed.items()}

    schemas: dict[str, list] = {name: [] for name in out}
    for routed in shaped_batches(_OneTypePerField()):
        for name, rows in routed.items():
            schemas[name].append(pa.Table.from_pylist(rows).schema)
    unified = {name: pa.unify_schemas(s, promote_options="permissive") for name, s in schemas.items() if s}
    writers = {}
    try:
        for name, schema in unified.items():
            writers[name] = pa.ipc.new_stream(pa.OSFile(str(out[name]), "wb"), schema)
        for routed in shaped_batches():
            for name, rows in routed.items():
                writers[name].write_table(pa.Table.from_pylist(rows, schema=unified[name]))
    finally:
        for writer in writers.values():
            writer.close()
    return {name: datasets.Dataset.from_file(str(out[name])) for name in unified}


def load(cfg: DataSection, tok, stage: str, seed: int = 42, template_kwargs: dict | None = None) -> PreparedData:
    """The stage's train (and eval) examples; `template_kwargs`: the model's chat_template_kwargs,
    which TRL then renders every example with (and the statistics count with)."""
    tmp = data_cache.private_dir()
    kwargs = dict(template_kwargs or {})
    path, fmt, src, n, notes = _converted(cfg.train, cfg, stage, "data.train", tmp)
    label = src.label()
    eval_split = None
    if cfg.eval:
        eval_path, eval_fmt, eval_src, n_eval, eval_notes = _converted(cfg.eval, cfg, stage, "data.eval", tmp)
        notes += eval_notes
        eval_out = {"eval": tmp / "eval.arrow"}
        [table] = _to_arrow(eval_path, lambda _: "eval", eval_fmt, stage, eval_out, kwargs).values()
        eval_split = ExampleSplit(eval_src.label(), table, n_eval, tok, template_kwargs=kwargs)
        tables = _to_arrow(path, lambda _: "train", fmt, stage, {"train": tmp / "train.arrow"}, kwargs)
    elif cfg.eval_ratio:
        held = heldout_indices(n, cfg.eval_ratio, seed)  # records, before KTO unpairs them: a pair stays whole
        out = {"train": tmp / "train.arrow", "eval": tmp / "eval.arrow"}
        tables = _to_arrow(path, lambda i: "eval" if i in held else "train", fmt, stage, out, kwargs)
        held_label = f"{label} (held out {cfg.eval_ratio:g})"
        eval_split = ExampleSplit(held_label, tables["eval"], len(held), tok, template_kwargs=kwargs)
        n -= len(held)
    else:
        tables = _to_arrow(path, lambda _: "train", fmt, stage, {"train": tmp / "train.arrow"}, kwargs)
    log.debug("%s: %s examples in %s", label, f"{len(tables['train']):,}", tmp)
    train = ExampleSplit(label, tables["train"], n, tok, template_kwargs=kwargs)
    return PreparedData(train=train, eval=eval_split, format=fmt, language=src.language, notes=notes)
