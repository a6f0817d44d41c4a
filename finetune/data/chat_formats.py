"""Chat, completion and text record formats -> one of three canonical examples, and the field
readers every format (these and finetune.data.preference's) is built from:

- chat: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], "tools"?: [...]}`;
  an assistant turn may carry `reasoning_content` (from `reasoning_content`, `reasoning`, `thinking`,
  or `<think>...</think>` at the start of its content) and `tool_calls`
  (`[{"id", "type": "function", "function": {"name", "arguments": dict}}]`); `tools` is the OpenAI
  list of function schemas. LLaMA-Factory's sharegpt tool roles (`function_call`, `observation`) map
  to these.
- completion: `{"prompt": str, "completion": str}` (plain text, no chat template)
- text: `{"text": str}` (continued pre-training: every token is trained)

`alpaca` and `sharegpt` become chat examples; `prompt_completion` with message lists too.
Errors name the record (`where`) and the field. The registry of every format is finetune.data.formats.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from finetune.data import images as image_refs
from finetune.data.sources import Record
from finetune.errors import DataError

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MESSAGE_ROLES = ("system", "user", "assistant")
CHAT_ROLES = (*MESSAGE_ROLES, "tool")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
DEFAULT_REASONING_TAGS = ("<think>", "</think>")

# LLaMA-Factory's sharegpt `tags`, accepted in data.columns by every format with message lists: the
# key of a message's role and content, and the role values (a value maps to the role named here).
ROLE_TAGS = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
TAGS = ("role_tag", "content_tag", *ROLE_TAGS)

# The fields of each format (the names `data.columns` can remap).
FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history", "reasoning", "tools", "images"),
    "sharegpt": ("conversations", "from", "value", "system", "tools", "images", *TAGS),
    "messages": ("messages", "role", "content", "tools", "images", *TAGS),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


class _Fields:
    """Reads a record's fields through the recipe's column mapping, with located errors."""

    def __init__(self, record: Record, columns: dict[str, str], reasoning_tags=DEFAULT_REASONING_TAGS):
        self.record, self.columns, self.reasoning_tags = record, columns, tuple(reasoning_tags)
        self.fmt = ""
        self.images: list[str] = []  # image references of content parts, in order (finetune.data.images)

    def name(self, field: str) -> str:
        return self.columns.get(field, field)

    def error(self, field: str, problem: str) -> DataError:
        return DataError(f"{self.record.where}: field '{self.name(field)}': {problem}")

    def get(self, field: str, required: bool = True) -> Any:
        value = self.record.data.get(self.name(field))
        if value is None and required:
            raise self.error(field, "missing")
        return value

    def tagged(self, role_key: str, content_key: str, roles: dict[str, str]) -> tuple[str, str, dict[str, str]]:
        """The message keys and role values of a message list, after data.columns' tags (ROLE_TAGS):
        a tag adds its value to the roles (besides the format's own and sharegpt's)."""
        if not any(t in self.columns for t in TAGS):
            return role_key, content_key, roles
        roles = {**roles, **SHAREGPT_ROLES}
        for tag, role in ROLE_TAGS.items():
            if tag in self.columns:
                roles[self.columns[tag]] = role
        return self.columns.get("role_tag", role_key), self.columns.get("content_tag", content_key), roles

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
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise f.error(field, "every assistant turn has weight 0 (nothing to learn)")
    calls: list[dict] = []  # the calls of the last assistant turn that made some, not yet answered
    n_calls = 0
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise f.error(field, f"turn {i}: a system message may only come first")
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise f.error(field, f"turn {i}: empty assistant content")
        if m["role"] == "assistant":
            calls = []
            for call in m.get("tool_calls") or []:
                n_calls += 1
                call.setdefault("id", f"call{n_calls:05d}")  # 9 characters: what the strictest templates take
                calls.append(call)
        elif m["role"] == "tool":
            if not calls:
                raise f.error(field, f"turn {i}: a tool result with no tool call before it")
            call = calls.pop(0)
            m.setdefault("tool_call_id", call["id"])
            m.setdefault("name", call["function"]["name"])
        else:
            calls = []
    first = 1 if messages[0]["role"] == "system" else 0
    if first < len(messages) and messages[first]["role"] != "user":
        raise f.error(field, f"turn {first}: the conversation must start with a user turn")
    return messages


def _tool_call(f: _Fields, field: str, where: str, call) -> dict:
    """An OpenAI tool call (or a bare {"name", "arguments"}) with its arguments parsed to a dict."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError as e:
            raise f.error(field, f"{where}: the tool call is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(call, dict):
        raise f.error(field, f"{where}: a tool call must be an object with 'name' and 'arguments'")
    fn = call.get("function", call)
    name, arguments = (fn.get("name"), fn.get("arguments", {})) if isinstance(fn, dict) else (None, None)
    if not isinstance(name, str) or not name.strip():
        raise f.error(field, f"{where}: a tool call needs a function name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise f.error(
                field, f"{where}: tool call {name!r}: arguments are not valid JSON ({e.msg} at char {e.pos})"
            ) from None
    if not isinstance(arguments, dict):
        raise f.error(field, f"{where}: tool call {name!r}: arguments must be a JSON object")
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call.get("id"):
        out["id"] = str(call["id"])
    return out


def split_inline_reasoning(content: str, tags) -> tuple[str, str]:
    """(reasoning, answer) of an answer that starts with `<think>...</think>`; ("", content) otherwise."""
    open_tag, close_tag = tags
    stripped = content.lstrip()
    if stripped.startswith(open_tag) and close_tag in stripped:
        reasoning, answer = stripped[len(open_tag) :].split(close_tag, 1)
        return reasoning.strip("\n"), answer.lstrip("\n")
    return "", content


def _message(f: _Fields, field: str, i: int, role: str, turn: dict, content, source_role=None) -> dict:
    """One canonical chat message from a turn of any chat format."""
    where = f"turn {i}"
    reasoning = next((turn[k] for k in REASONING_KEYS if turn.get(k)), None)
    if reasoning is not None and role != "assistant":
        raise f.error(field, f"{where}: reasoning on a {role} turn (only assistant turns carry reasoning)")
    if reasoning is not None and not isinstance(reasoning, str):
        raise f.error(field, f"{where}: reasoning must be a string")
    if source_role == "function_call":  # LLaMA-Factory: the turn's value is the call (or a list of calls)
        calls = content
        if isinstance(calls, str):
            try:
                calls = json.loads(calls)
            except json.JSONDecodeError as e:
                raise f.error(
                    field, f"{where}: the function call is not valid JSON ({e.msg} at char {e.pos})"
                ) from None
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": "", "tool_calls": [_tool_call(f, field, where, c) for c in calls]}
    tool_calls = turn.get("tool_calls")
    if content is None and role == "assistant" and tool_calls:
        content = ""
    if isinstance(content, list):  # content parts: text and images (OpenAI / Hugging Face)
        n = len(f.images)
        content = image_refs.parts_of_content(
            content, f.images, f.record.root, f"{f.record.where}: field '{f.name(field)}' {where}"
        )
        if role != "user" and len(f.images) > n:
            raise f.error(field, f"{where}: an image in a {role} turn (images go in user turns)")
        if role != "user":
            content = image_refs.text_of(content)
        elif not any(p["type"] == "image" for p in content):
            content = image_refs.text_of(content)
    if not isinstance(content, (str, list)):
        raise f.error(field, f"{where}: the content must be a string")
    message = {"role": role, "content": content}
    if role == "assistant":
        from_key = reasoning is not None
        if reasoning is None:
            reasoning, content = split_inline_reasoning(content, f.reasoning_tags)
            message["content"] = content
        _check_reasoning(f, field, where, reasoning, content, from_key)
        if reasoning:
            message["reasoning_content"] = reasoning
        if tool_calls:
            if not isinstance(tool_calls, list):
                raise f.error(field, f"{where}: tool_calls must be a list")
            message["tool_calls"] = [
                _tool_call(f, field, f"{where} tool call {j}", c) for j, c in enumerate(tool_calls)
            ]
    elif tool_calls:
        raise f.error(field, f"{where}: tool_calls on a {role} turn (only assistant turns make tool calls)")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if turn.get(key):
                message[key] = str(turn[key])
    weight = turn.get("weight")
    if weight is not None:  # OpenAI's fine-tuning format: 0 = context only, 1 = trained
        if role != "assistant":
            raise f.error(field, f"{where}: 'weight' on a {role} turn (only assistant turns are trained)")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise f.error(field, f"{where}: 'weight' must be 0 (not trained) or 1 (trained), got {weight!r}")
        if weight == 0:
            message["weight"] = 0
    return message


def _check_reasoning(f: _Fields, field: str, where: str, reasoning: str, answer: str, from_key: bool) -> None:
    """An assistant turn's reasoning is one block: a reasoning key (`reasoning_content`, ...) or one
    `<think>...</think>` (data.reasoning_tags) at the start of its content. A tag anywhere else (nested,
    unclosed, stray, or inline think next to a reasoning key) would be trained as text: an error."""
    open_tag, close_tag = f.reasoning_tags
    if from_key and answer.lstrip().startswith(open_tag):
        raise f.error(
            field, f"{where}: reasoning given twice: a reasoning key and an inline {open_tag} block (keep one)"
        )
    for part, name in ((reasoning, "reasoning"), (answer, "answer")):
        for tag in (open_tag, close_tag):
            if tag in part:
                problem = (
                    f"an unclosed {open_tag} (no {close_tag})"
                    if name == "answer" and tag == open_tag and close_tag not in part
                    else f"a {'nested' if name == 'reasoning' else 'stray'} {tag} in the {name}"
                )
                raise f.error(
                    field, f"{where}: {problem}; reasoning is one {open_tag}...{close_tag} block at the answer's start"
                )


def _tools(f: _Fields) -> list[dict] | None:
    """The record's tool list (a list or a JSON string of one), as OpenAI function schemas."""
    tools = f.get("tools", required=False)
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise f.error("tools", f"not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise f.error("tools", "expected a list of function schemas")
    out = []
    for t in tools:
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise f.error("tools", "each tool needs a function name")
        out.append({"type": "function", "function": fn})
    return out


def _chat(messages: list[dict], f: _Fields, field: str) -> dict:
    example = {"messages": _check_chat(messages, f, field)}
    tools = _tools(f) if "tools" in FIELDS.get(f.fmt, ()) else None
    if tools:
        example["tools"] = tools
    column = f.get("images", required=False) if "images" in FIELDS.get(f.fmt, ()) else None
    if f.images:
        if column:
            raise f.error("images", "images given both in content parts and in an images column (keep one)")
        example["images"] = list(f.images)
    elif column is not None:
        example = image_refs.with_placeholders(example, column, f.record.root, f.record.where, f.name("images"))
    return example


def _turns(f: _Fields, field: str, role_key: str, content_key: str, roles: dict[str, str], value=None) -> list[dict]:
    """The turns of `field` (or of `value`, a part of it) as canonical messages."""
    turns = f.get(field) if value is None else value
    if not isinstance(turns, list) or not turns:
        raise f.error(field, "expected a non-empty list of turns")
    role_key, content_key, roles = f.tagged(role_key, content_key, roles)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise f.error(field, f"turn {i}: expected an object with '{role_key}' and '{content_key}'")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise f.error(field, f"turn {i}: unknown role {role!r} (expected one of {', '.join(roles)})")
        source = "function_call" if "function_call" in (role, roles[role]) else role
        if not isinstance(content, (str, list)) and not (source == "function_call" or turn.get("tool_calls")):
            raise f.error(field, f"turn {i}: '{content_key}' must be a string or a list of parts")
        canonical = "assistant" if source == "function_call" else roles[role]
        messages.append(_message(f, field, i, canonical, turn, content, source_role=source))
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
    answer = _message(
        f,
        "output",
        len(messages) + 1,
        "assistant",
        {"reasoning": f.text("reasoning", required=False)},
        f.text("output"),
    )
    messages += [{"role": "user", "content": user}, answer]
    return _chat(messages, f, "output")


def sharegpt(f: _Fields) -> dict:
    messages = _turns(f, "conversations", f.name("from"), f.name("value"), SHAREGPT_ROLES)
    system = f.text("system", required=False)
    if system and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return _chat(messages, f, "conversations")


def messages(f: _Fields) -> dict:
    msgs = _turns(f, "messages", f.name("role"), f.name("content"), {r: r for r in CHAT_ROLES})
    return _chat(msgs, f, "messages")


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
