"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (the chat template in Go-template form),
stop parameters and SYSTEM.

The translation does not parse Jinja. It renders the model's own chat template on marker messages
and cuts the result into the pieces every turn-based template is made of (system / user / assistant
prefix and suffix, generation prompt, default system prompt), then re-renders other conversations
from those pieces and checks they equal the Jinja output. ChatML (Qwen), Llama-3, the tiny model's
and finetune's fallback template all pass; a template that is not of this shape (tool-use logic,
content-dependent branches) is refused with a one-line error instead of being translated wrongly.

Three things a Go text/template cannot mirror are checked, not assumed: a template that trims message
content (Jinja `| trim`: Go templates have no trim, and Ollama passes content as sent) is translated for
content without surrounding whitespace, and the Modelfile and the export say so (`TRIM_NOTE`); an
empty system message is a system turn (the TEMPLATE ranges over .Messages, where `{{ if .System }}`
would drop it); and the BOS that Ollama's runner prepends (the GGUF's add_bos_token) is left out of
the TEMPLATE.

Tools are cut the same way (`split_tools`): the tool list (a block before the conversation, one repeated
item per tool), an assistant turn's tool calls (a repeated item before or after its content) and a `tool`
message (prefix + content + suffix) are found by rendering marker tools, calls and results, and the items
are written with Ollama's fields (`.Tools`, `.ToolCalls`, `.Function.Name`, `json ...`). The result is
checked against the Jinja output on tool conversations; a template whose tool parts do not fit this shape
keeps a TEMPLATE without them, and the Modelfile and the export report say exactly what it drops
(`tools_note`). JSON (a tool definition, call arguments) is written by Ollama's `json`, which differs from
Jinja's `tojson` in its spacing and key order only (`JSON_NOTE`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from finetune.errors import FinetuneError

_S, _U1, _A1, _U2, _A2, _U3 = (
    "SYSTEMMARKERQ",
    "USERMARKERONE",
    "ASSISTANTMARKERONE",
    "USERMARKERTWO",
    "ASSISTANTMARKERTWO",
    "USERMARKERTHREE",
)


class TemplateError(FinetuneError):
    """The chat template cannot be expressed as an Ollama TEMPLATE."""


@dataclass
class Pieces:
    bos: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str
    default_system: str | None  # what the template inserts when there is no system message
    trims_content: bool = False  # the template strips whitespace around message content (Jinja `| trim`)
    tools: ToolPieces | None = None  # how it writes the tool list, tool calls and tool results (split_tools)

    def render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> str:
        """What the Go TEMPLATE writes (with Jinja's JSON), to check the pieces against the chat template."""
        out = self.bos
        t = self.tools
        if tools and t is not None and t.list_item is not None:
            out += t.list_prefix + t.list_sep.join(_fill(t.list_item, _tool_values(x)) for x in tools) + t.list_suffix
        system = next((m["content"] for m in messages if m["role"] == "system"), self.default_system)
        if system is not None:
            out += self.system_prefix + system + self.system_suffix
        for m in messages:
            if m["role"] == "user":
                out += self.user_prefix + m["content"] + self.user_suffix
            elif m["role"] == "assistant":
                body = m["content"]
                if m.get("tool_calls") and t is not None and t.call_item is not None:
                    calls = t.call_sep.join(_fill(t.call_item, _call_values(c)) for c in m["tool_calls"])
                    calls = t.call_prefix + calls + t.call_suffix
                    body = calls + body if t.calls_first else body + calls
                out += self.assistant_prefix + body + self.assistant_suffix
            elif m["role"] == "tool" and t is not None and t.result_prefix is not None:
                out += t.result_prefix + m["content"] + t.result_suffix
        return out + (self.generation if add_generation_prompt else "")


@dataclass
class ToolPieces:
    """The tool parts of a template. Items are lists of literal text and field names (`TOOL_FIELDS`,
    `CALL_FIELDS`); None where the template writes nothing of that kind."""

    list_prefix: str = ""
    list_item: list | None = None
    list_sep: str = ""
    list_suffix: str = ""
    call_prefix: str = ""
    call_item: list | None = None
    call_sep: str = ""
    call_suffix: str = ""
    calls_first: bool = True
    result_prefix: str | None = None
    result_suffix: str = ""

    @property
    def uses_json(self) -> bool:
        return any(isinstance(p, Field) and p.json for p in (self.list_item or []) + (self.call_item or []))


@dataclass(frozen=True)
class Field:
    name: str
    go: str  # the Go template expression
    json: bool = False  # written with Ollama's `json` (Jinja wrote `tojson`)


TOOL_FIELDS = (
    Field("tool_json", "{{ json $t }}", True),
    Field("function_json", "{{ json $t.Function }}", True),
    Field("parameters_json", "{{ json $t.Function.Parameters }}", True),
    Field("name", "{{ $t.Function.Name }}"),
    Field("description", "{{ $t.Function.Description }}"),
)
CALL_FIELDS = (
    Field(
        "function_json", '{"name": {{ json $c.Function.Name }}, "arguments": {{ json $c.Function.Arguments }}}', True
    ),
    Field("arguments_json", "{{ json $c.Function.Arguments }}", True),
    Field("name", "{{ $c.Function.Name }}"),
)


def _tojson(value) -> str:
    """Jinja's `tojson` in transformers' chat templates."""
    return json.dumps(value, ensure_ascii=False)


def _tool_values(tool: dict) -> dict[str, str]:
    fn = tool.get("function", tool)
    return {
        "tool_json": _tojson(tool),
        "function_json": _tojson(fn),
        "parameters_json": _tojson(fn.get("parameters", {})),
        "name": fn["name"],
        "description": fn.get("description", ""),
    }


def _call_values(call: dict) -> dict[str, str]:
    fn = call.get("function", call)
    return {
        "function_json": _tojson({"name": fn["name"], "arguments": fn.get("arguments", {})}),
        "arguments_json": _tojson(fn.get("arguments", {})),
        "name": fn["name"],
    }


def _fill(item: list, values: dict[str, str]) -> str:
    return "".join(values[p.name] if isinstance(p, Field) else p for p in item)


def _parts(text: str, values: dict[str, str], fields, markers) -> list | None:
    """`text` as literal pieces and fields (the longest field value first); None if a marker is left over."""
    for f in fields:
        value = values[f.name]
        if value and value in text:
            out: list = []
            for i, chunk in enumerate(text.split(value)):
                if i:
                    out.append(f)
                if chunk:
                    sub = _parts(chunk, values, fields, markers)
                    if sub is None:
                        return None
                    out += sub
            return out
    return None if any(m in text for m in markers) else [text]


def _render(tok, messages, gen: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _between(text: str, start: str, end: str | None) -> str:
    i = text.index(start) + len(start)
    return text[i:] if end is None else text[i : text.index(end, i)]


def split_template(tok) -> Pieces:
    """Cut the tokenizer's chat template into turn pieces; TemplateError if they do not reproduce it."""
    fail = TemplateError(
        "the chat template cannot be translated into an Ollama TEMPLATE (its turns are not plain "
        "prefix/suffix text); export without --ollama and write the Modelfile TEMPLATE by hand"
    )
    sys_chat = [
        {"role": "system", "content": _S},
        {"role": "user", "content": _U1},
        {"role": "assistant", "content": _A1},
        {"role": "user", "content": _U2},
    ]
    padded = [
        {"role": "system", "content": "  " + _S + " \n"},
        {"role": "user", "content": "\n " + _U1 + "  "},
        {"role": "assistant", "content": " " + _A1 + "\t\n"},
        {"role": "user", "content": _U2},
    ]
    try:
        spaced = _render(tok, padded, False)
    except Exception:  # noqa: BLE001 -- a template that refuses this chat is judged (and refused) below
        spaced = None
    trims = spaced is not None and any(
        m["content"] not in spaced and m["content"].strip() in spaced for m in padded[:3]
    )
    try:
        full = _render(tok, sys_chat, False)
        no_sys = _render(tok, sys_chat[1:], False)
        gen = _render(tok, sys_chat[1:], True)
        one = _render(tok, sys_chat[1:3], False)
        alone = _render(tok, sys_chat[1:2], False)
    except Exception as e:  # jinja errors, templates that raise on these roles
        raise TemplateError(f"the chat template does not render a plain system/user/assistant chat: {e}") from None
    try:
        if not gen.startswith(no_sys):
            raise fail
        generation = gen[len(no_sys) :]
        user_suffix = _between(no_sys, _U2, None)
        assistant_suffix = _between(one, _A1, None)
        user_then_assistant = _between(no_sys, _U1, _A1)
        assistant_then_user = _between(no_sys, _A1, _U2)
        if not (user_then_assistant.startswith(user_suffix) and assistant_then_user.startswith(assistant_suffix)):
            raise fail
        assistant_prefix = user_then_assistant[len(user_suffix) :]
        user_prefix = assistant_then_user[len(assistant_suffix) :]
        head = full[: full.index(_S)]
        system_then_user = _between(full, _S, _U1)
        if not system_then_user.endswith(user_prefix):
            raise fail
        system_suffix = system_then_user[: len(system_then_user) - len(user_prefix)]
        bos = tok.bos_token if tok.bos_token and head.startswith(tok.bos_token) else ""
        system_prefix = head[len(bos) :]
        start = alone[: alone.index(_U1)]  # bos + default system block + user prefix
        if not start.endswith(user_prefix) or not start.startswith(bos):
            raise fail
        default_block = start[len(bos) : len(start) - len(user_prefix)]
        default_system = None
        if default_block:
            if not (default_block.startswith(system_prefix) and default_block.endswith(system_suffix)):
                raise fail
            default_system = default_block[len(system_prefix) : len(default_block) - len(system_suffix)]
    except ValueError:  # a marker missing: the template drops or rewrites content
        raise fail from None
    pieces = Pieces(
        bos,
        system_prefix,
        system_suffix,
        user_prefix,
        user_suffix,
        assistant_prefix,
        assistant_suffix,
        generation,
        default_system,
        trims,
    )
    checks = [
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
                {"role": "user", "content": "Why?"},
            ],
            True,
        ),
        ([{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}], False),
        ([{"role": "user", "content": "Only a question"}], True),
        ([{"role": "system", "content": ""}, {"role": "user", "content": "Empty system"}], True),
    ]
    for messages, add in checks:
        if pieces.render(messages, add) != _render(tok, messages, add):
            raise fail
    return _with_tools(tok, pieces)


def _probe_tool(tag: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": f"TOOLNAME{tag}",
            "description": f"TOOLDESC{tag}",
            "parameters": {"type": "object", "properties": {f"TOOLPARAM{tag}": {"type": "string"}}},
        },
    }


def _probe_call(tag: str) -> dict:
    return {
        "type": "function",
        "function": {"name": f"CALLNAME{tag}", "arguments": {f"CALLKEY{tag}": f"CALLVAL{tag}"}},
    }


_TAGS = ("ALPHA", "BRAVO")
_RESULT_1, _RESULT_2 = "TOOLRESULTONE", "TOOLRESULTTWO"


def _repeat(one: str, two: str, marker: str):
    """Each (head, item, sep, tail) with one == head + item + tail and two == head + item + sep + item' + tail,
    item' being item for the second probe (markers ALPHA -> BRAVO); the tightest items around `marker` first."""
    k = one.find(marker)
    if k < 0:
        return
    prefix = len(_common_prefix(one, two))
    suffix = len(_common_prefix(one[::-1], two[::-1]))
    for i in range(k, -1, -1):
        for j in range(max(k + len(marker), len(one) - suffix), min(prefix, len(one)) + 1):
            head, item, tail = one[:i], one[i:j], one[j:]
            other = item.replace(_TAGS[0], _TAGS[1])
            rest = len(two) - len(head) - len(item) - len(other) - len(tail)
            if rest >= 0 and two.startswith(head + item) and two.endswith(other + tail):
                yield head, item, two[len(head) + len(item) : len(head) + len(item) + rest], tail


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _render_tools(tok, messages, gen: bool, tools=None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)


def tool_parts(tok) -> dict[str, bool]:
    """Which tool parts the chat template writes: a tool list, assistant tool calls, tool results."""
    user = [{"role": "user", "content": _U1}]
    call = {"role": "assistant", "content": "", "tool_calls": [_probe_call(_TAGS[0])]}
    out = {}
    for part, probe in (
        ("the tool list", lambda: _render_tools(tok, user, True, [_probe_tool(_TAGS[0])]) != _render(tok, user, True)),
        ("assistant tool calls", lambda: "CALLNAME" in _render_tools(tok, [*user, call], False)),
        ("tool results", lambda: _RESULT_1 in _render_tools(tok, [*user, call, _result(_RESULT_1)], False)),
    ):
        try:
            out[part] = bool(probe())
        except Exception:  # noqa: BLE001 -- a template that refuses the probe writes no such part
            out[part] = False
    return out


def _result(content: str) -> dict:
    return {"role": "tool", "content": content, "name": "CALLNAMEALPHA", "tool_call_id": "call_1"}


def split_tools(tok, p: Pieces, parts: dict[str, bool]) -> ToolPieces | None:
    """The tool pieces of a template (see the module doc), or None when they do not reproduce it."""
    t = ToolPieces()
    user = [{"role": "user", "content": _U1}]
    if parts["the tool list"]:
        one = _render_tools(tok, user, True, [_probe_tool(_TAGS[0])])
        two = _render_tools(tok, user, True, [_probe_tool(tag) for tag in _TAGS])
        plain = _render(tok, user, True)[len(p.bos) :]
        for head, item, sep, tail in _repeat(one, two, f"TOOLNAME{_TAGS[0]}"):
            parsed = _parts(item, _tool_values(_probe_tool(_TAGS[0])), TOOL_FIELDS, [_TAGS[0]])
            if parsed is not None and head.startswith(p.bos) and tail.endswith(plain):  # a block before the chat
                t.list_prefix, t.list_item, t.list_sep = head[len(p.bos) :], parsed, sep
                t.list_suffix = tail[: len(tail) - len(plain)]
                break
        else:
            return None
    if parts["assistant tool calls"]:

        def with_calls(n: int, content: str = _A1) -> str:
            turn = {"role": "assistant", "content": content, "tool_calls": [_probe_call(tag) for tag in _TAGS[:n]]}
            return _render_tools(tok, [*user, turn], False)

        plain = _render(tok, [*user, {"role": "assistant", "content": _A1}], False)
        pre, post = plain[: plain.index(_A1)], plain[plain.index(_A1) + len(_A1) :]
        for head, item, sep, tail in _repeat(with_calls(1), with_calls(2), f"CALLNAME{_TAGS[0]}"):
            parsed = _parts(item, _call_values(_probe_call(_TAGS[0])), CALL_FIELDS, [_TAGS[0]])
            first = _A1 in tail
            before, after = (pre, _A1 + post) if first else (pre + _A1, post)
            if parsed is not None and head.startswith(before) and tail.endswith(after):
                t.call_item, t.call_sep, t.calls_first = parsed, sep, first
                t.call_prefix, t.call_suffix = head[len(before) :], tail[: len(tail) - len(after)]
                break
        else:
            return None
    if parts["tool results"]:
        call = {"role": "assistant", "content": "", "tool_calls": [_probe_call(_TAGS[0])]}
        before = _render_tools(tok, [*user, call], False)
        after = _render_tools(tok, [*user, call, _result(_RESULT_1)], False)
        if not after.startswith(before) or _RESULT_1 not in after[len(before) :]:
            return None
        block = after[len(before) :]
        t.result_prefix, t.result_suffix = block.split(_RESULT_1, 1)
    return t


_TOOL_CHECKS = [
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "n": 2}}},
                ],
            },
            {"role": "tool", "content": "18 C", "name": "get_weather", "tool_call_id": "a"},
            {"role": "tool", "content": "9 C", "name": "get_weather", "tool_call_id": "b"},
            {"role": "assistant", "content": "Paris 18 C, Oslo 9 C."},
            {"role": "user", "content": "And Rome?"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "Time?"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": {}}}],
            },
            {"role": "tool", "content": "12:00", "name": "get_time", "tool_call_id": "c"},
        ],
        True,
    ),
]
_CHECK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": {}}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {"type": "object"}}},
]  # three: a list whose items are numbered or counted shows it only from the third


def _with_tools(tok, p: Pieces) -> Pieces:
    """`p` with its tool pieces when the template writes tools and they reproduce it on tool conversations."""
    parts = tool_parts(tok)
    if not any(parts.values()):
        return p
    tools = split_tools(tok, p, parts)
    if tools is None:
        return p
    candidate = dataclasses.replace(p, tools=tools)
    for messages, add in _TOOL_CHECKS:
        for offered in (_CHECK_TOOLS, _CHECK_TOOLS[:1], None):
            try:
                expected = _render_tools(tok, messages, add, offered)
            except Exception:  # noqa: BLE001 -- a template that refuses this conversation: not translatable
                return p
            if candidate.render(messages, add, offered) != expected:
                return p
    return candidate


def go_template(p: Pieces) -> str:
    """The pieces as an Ollama (Go text/template) TEMPLATE over .Messages, where Ollama keeps system messages:
    a system turn is written for every system message, empty ones included (`{{ if .System }}` would drop
    ""). No whitespace-trimming markers, so the literal text is kept byte for byte. A template that writes a
    system turn even with no system message (a default prompt, or an empty one as Llama-3.1's) writes it
    literally before a first message that is not a system one; the Modelfile's SYSTEM carries the default.
    Tool pieces (when the template has them) write .Tools before the conversation, an assistant's
    .ToolCalls and `tool` messages."""
    t = p.tools or ToolPieces()
    literals = [
        p.system_prefix,
        p.system_suffix,
        p.user_prefix,
        p.user_suffix,
        p.assistant_prefix,
        p.assistant_suffix,
        p.generation,
        p.default_system or "",
        t.list_prefix,
        t.list_sep,
        t.list_suffix,
        t.call_prefix,
        t.call_sep,
        t.call_suffix,
        t.result_prefix or "",
        t.result_suffix,
    ]
    literals += [x for x in (t.list_item or []) + (t.call_item or []) if isinstance(x, str)]
    for text in literals:
        if "{{" in text or '"""' in text:
            raise TemplateError(
                "the chat template's text contains '{{' or '\"\"\"', which an Ollama TEMPLATE cannot hold"
            )

    def item(parts: list) -> str:
        return "".join(x.go if isinstance(x, Field) else x for x in parts)

    head = ""
    if t.list_item is not None:
        head = (
            f"{{{{ if .Tools }}}}{t.list_prefix}{{{{ range $j, $t := .Tools }}}}"
            f"{{{{ if $j }}}}{t.list_sep}{{{{ end }}}}{item(t.list_item)}{{{{ end }}}}{t.list_suffix}{{{{ end }}}}"
        )
    default = ""
    if p.default_system is not None:
        default = (
            f'{{{{ if and (eq $i 0) (ne .Role "system") }}}}'
            f"{p.system_prefix}{p.default_system}{p.system_suffix}{{{{ end }}}}"
        )
    content = "{{ .Content }}"
    if t.call_item is not None:
        calls = (
            f"{{{{ if .ToolCalls }}}}{t.call_prefix}{{{{ range $j, $c := .ToolCalls }}}}"
            f"{{{{ if $j }}}}{t.call_sep}{{{{ end }}}}{item(t.call_item)}{{{{ end }}}}{t.call_suffix}{{{{ end }}}}"
        )
        content = calls + content if t.calls_first else content + calls
    result = ""
    if t.result_prefix is not None:
        result = f'{{{{ else if eq .Role "tool" }}}}{t.result_prefix}{{{{ .Content }}}}{t.result_suffix}'
    return (
        f"{head}{{{{ range $i, $_ := .Messages }}}}{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}"
        f"{default}"
        f'{{{{ if eq .Role "system" }}}}{p.system_prefix}{{{{ .Content }}}}{p.system_suffix}'
        f'{{{{ else if eq .Role "user" }}}}{p.user_prefix}{{{{ .Content }}}}{p.user_suffix}'
        f'{{{{ else if eq .Role "assistant" }}}}{p.assistant_prefix}{content}'
        f"{{{{ if not $last }}}}{p.assistant_suffix}{{{{ end }}}}"
        f"{result}{{{{ end }}}}"
        f'{{{{ if and $last (ne .Role "assistant") }}}}{p.generation}{{{{ end }}}}'
        "{{ end }}"
    )


def stops(p: Pieces) -> list[str]:
    """End of an assistant turn, and the start of the next user turn (so a model that runs on stops there)."""
    out = []
    for s in (p.assistant_suffix.strip(), p.user_prefix.strip().split("\n")[0].strip()):
        if s and s not in out:
            out.append(s)
    return out


TRIM_NOTE = (
    "the chat template strips the whitespace around message content (Jinja `| trim`), which a Go "
    "TEMPLATE cannot: Ollama renders a message with leading or trailing whitespace differently from "
    "training; send messages without it"
)
JSON_NOTE = (
    "tool definitions and tool-call arguments are written by Ollama's `json` (compact: no space after ',' and "
    "':', object keys sorted, <, > and & escaped as \\u003c, \\u003e, \\u0026), where training wrote them with "
    'Jinja\'s tojson (`{"city": "Paris"}`); the structure and the rest of the text are the same'
)


def tools_note(lost: list[str]) -> str:
    """The Modelfile's account of tool parts the TEMPLATE cannot write."""
    return (
        f"the chat template writes {', '.join(lost)}, which the Ollama TEMPLATE cannot reproduce (not plain "
        f"prefix/item/suffix text around them); the TEMPLATE leaves out {_consequences(lost)}"
    )


def _consequences(lost: list[str]) -> str:
    what = {
        "the tool list": "the tool list (requests with tools get no tool instructions)",
        "assistant tool calls": "the assistant's earlier tool calls",
        "tool results": "tool messages (tool results never reach the model)",
    }
    return "; ".join(what[x] for x in lost)


def notes(tok, p: Pieces) -> list[str]:
    """What the Modelfile TEMPLATE does differently from the chat template, one line each."""
    out = [TRIM_NOTE] if p.trims_content else []
    if p.tools is None:
        lost = [part for part, written in tool_parts(tok).items() if written]
        if lost:
            out.append(tools_note(lost))
    elif p.tools.uses_json:
        out.append(JSON_NOTE)
    return out


def renders_tools(tok) -> bool:
    """Whether the chat template writes any tool part (a tool list, tool calls, tool results)."""
    return any(tool_parts(tok).values())


def modelfile(gguf_name: str, tok, system: str | None = None) -> str:
    """The Modelfile text; FROM points at the GGUF beside it. Where the TEMPLATE differs from the chat template
    (`notes`), a `# note:` comment says how."""
    p = split_template(tok)
    lines = ["# ollama create NAME -f Modelfile  (written by finetune export --ollama)"]
    lines += [f"# note: {note}" for note in notes(tok, p)]
    ref = gguf_name if gguf_name.startswith(("./", "../", "/")) else f"./{gguf_name}"  # relative to the Modelfile
    lines += [f"FROM {ref}", f'TEMPLATE """{go_template(p)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops(p)]
    system = system if system is not None else p.default_system
    if system:
        if '"""' in system:
            raise TemplateError('--system: the system prompt cannot contain \'"""\'')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def modelfile_notes(text: str) -> list[str]:
    """The notes a Modelfile written by `modelfile` carries."""
    return [line[len("# note: ") :] for line in text.splitlines() if line.startswith("# note: ")]
