"""The registry of record formats: each format's converter and fields (`CONVERTERS`, `FIELDS`),
`guess_format` for sources that declare none, and `convert`.

The chat, completion and text formats live in finetune.data.chat_formats, the preference, KTO and
prompt-only formats (for the rm/dpo/kto/... and RL stages) in finetune.data.preference, which builds
on chat_formats' field readers; this module imports both, and neither imports it.
"""

from __future__ import annotations

from finetune.data import chat_formats, preference
from finetune.data.chat_formats import (  # noqa: F401  (DEFAULT_REASONING_TAGS, split_inline_reasoning: their former home)
    DEFAULT_REASONING_TAGS,
    _Fields,
    split_inline_reasoning,
)
from finetune.data.sources import Record
from finetune.errors import DataError

CONVERTERS = {**chat_formats.CONVERTERS, **preference.CONVERTERS}
FIELDS = {**chat_formats.FIELDS, **preference.FIELDS}


def guess_format(record: dict) -> str | None:
    """The format a record's columns suggest, for sources with no declared format."""
    keys = set(record)
    for fmt, needed in (
        *preference.GUESSES,
        ("alpaca", {"instruction", "output"}),
        ("sharegpt", {"conversations"}),
        ("messages", {"messages"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("text", {"text"}),
        ("prompt", {"prompt"}),  # prompts only (RL stages)
    ):
        if needed <= keys:
            return fmt
    return None


def convert(
    records: list[Record],
    fmt: str,
    columns: dict[str, str] | None,
    system: str | None = None,
    reasoning_tags=DEFAULT_REASONING_TAGS,
) -> list[dict]:
    columns = columns or {}
    unknown = [k for k in columns if k not in FIELDS[fmt]]
    if unknown:
        raise DataError(f"data.columns: {unknown[0]!r} is not a field of format {fmt} ({', '.join(FIELDS[fmt])})")
    convert_one = CONVERTERS[fmt]
    out = []
    for record in records:
        if record.error:  # a row the reader could not read (kept for data.skip_bad_rows)
            raise DataError(record.error)
        fields = _Fields(record, columns, reasoning_tags)
        fields.fmt = fmt
        example = convert_one(fields)
        if system and "messages" in example and example["messages"][0]["role"] != "system":
            example["messages"].insert(0, {"role": "system", "content": system})
        elif system and isinstance(example.get("prompt"), list) and example["prompt"][0]["role"] != "system":
            example["prompt"].insert(0, {"role": "system", "content": system})
        out.append(example)
    return out
