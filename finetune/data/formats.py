"""Record formats -> one of three canonical examples:

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- completion: `{"prompt": str, "completion": str}` (plain text, no chat template)
- text: `{"text": str}` (continued pre-training: every token is trained)

`alpaca` and `sharegpt` become chat examples; `prompt_completion` with message lists too.
Errors name the record (`where`) and the field.
"""

from __future__ import annotations

from typing import Any, Callable

from finetune.data.sources import Record
from finetune.errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant")

# The fields of each format (the names `data.columns` can remap).
FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "from", "value", "system"),
    "messages": ("messages", "role", "content"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


class _Fields:
    """Reads a record's fields through the recipe's column mapping, with located errors."""

    def __init__(self, record: Record, columns: dict[str, str]):
        self.record, self.columns = record, columns

    def name(self, field: str) -> str:
        return self.columns.get(field, field)

    def error(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.record.where}: field '{self.name(field)}': {problem}")

    def get(self, field: str, required: bool = True) -> Any:
        value = self.record.data.get(self.name(field))
        if value is None and required:
            raise self.error(field, "missing")
        return value

    def text(self, field: str, required: bool = True, allow_empty: bool = False) -> str | None:
        value = self.get(field, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        if required and not allow_empty and not value.strip():
            raise self.error(field, "empty")
        return value


def _check_chat(messages: list[dict], f: _Fields, field: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise f.error(field, "the conversation has no assistant turn (nothing to learn)")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise f.error(field, f"turn {i}: a system message may only come first")
        if m["role"] == "assistant" and not m["content"].strip():
            raise f.error(field, f"turn {i}: empty assistant content")
    first = 1 if messages[0]["role"] == "system" else 0
    if first < len(messages) and messages[first]["role"] != "user":
        raise f.error(field, f"turn {first}: the conversation must start with a user turn")
    return messages


def _turns(f: _Fields, field: str, role_key: str, content_key: str, roles: dict[str, str], value=None) -> list[dict]:
    """The turns of `field` (or of `value`, a part of it) as role/content messages."""
    turns = f.get(field) if value is None else value
    if not isinstance(turns, list) or not turns:
        raise f.error(field, "expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise f.error(field, f"turn {i}: expected an object with '{role_key}' and '{content_key}'")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise f.error(field, f"turn {i}: unknown role {role!r} (expected one of {', '.join(roles)})")
        if not isinstance(content, str):
            raise f.error(field, f"turn {i}: '{content_key}' must be a string")
        messages.append({"role": roles[role], "content": content})
    return messages


def alpaca(f: _Fields) -> dict:
    instruction = f.text("instruction")
    extra = f.text("input", required=False)
    user = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    messages = []
    system = f.text("system", required=False)
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    history = f.get("history", required=False) or []
    if not isinstance(history, list):
        raise f.error("history", "expected a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise f.error("history", f"item {i}: expected a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": f.text("output")}]
    return {"messages": _check_chat(messages, f, "output")}


def sharegpt(f: _Fields) -> dict:
    messages = _turns(f, "conversations", f.name("from"), f.name("value"), SHAREGPT_ROLES)
    system = f.text("system", required=False)
    if system and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": _check_chat(messages, f, "conversations")}


def messages(f: _Fields) -> dict:
    msgs = _turns(f, "messages", f.name("role"), f.name("content"), {r: r for r in MESSAGE_ROLES})
    return {"messages": _check_chat(msgs, f, "messages")}


def prompt_completion(f: _Fields) -> dict:
    prompt, completion = f.get("prompt"), f.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
        msgs = _turns(f, "prompt", "role", "content", {r: r for r in MESSAGE_ROLES})
        msgs += _turns(f, "completion", "role", "content", {r: r for r in MESSAGE_ROLES})
        return {"messages": _check_chat(msgs, f, "completion")}
    return {"prompt": f.text("prompt", allow_empty=True), "completion": f.text("completion")}


def text(f: _Fields) -> dict:
    return {"text": f.text("text")}


CONVERTERS: dict[str, Callable[[_Fields], dict]] = {
    "alpaca": alpaca,
    "sharegpt": sharegpt,
    "messages": messages,
    "prompt_completion": prompt_completion,
    "text": text,
}


def guess_format(record: dict) -> str | None:
    """The format a record's columns suggest, for sources with no declared format."""
    keys = set(record)
    for fmt, needed in (
        *_preference.GUESSES,
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


def convert(records: list[Record], fmt: str, columns: dict[str, str] | None, system: str | None = None) -> list[dict]:
    columns = columns or {}
    unknown = [k for k in columns if k not in FIELDS[fmt]]
    if unknown:
        raise DataError(f"data.columns: {unknown[0]!r} is not a field of format {fmt} ({', '.join(FIELDS[fmt])})")
    convert_one = CONVERTERS[fmt]
    out = []
    for record in records:
        example = convert_one(_Fields(record, columns))
        if system and "messages" in example and example["messages"][0]["role"] != "system":
            example["messages"].insert(0, {"role": "system", "content": system})
        elif system and isinstance(example.get("prompt"), list) and example["prompt"][0]["role"] != "system":
            example["prompt"].insert(0, {"role": "system", "content": system})
        out.append(example)
    return out


# Preference, KTO and prompt-only formats (for the rm/dpo/kto/... and RL stages) build on the helpers above.
from finetune.data import preference as _preference  # noqa: E402

CONVERTERS.update(_preference.CONVERTERS)
FIELDS.update(_preference.FIELDS)
