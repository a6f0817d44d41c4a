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
"""

from __future__ import annotations

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

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        out = self.bos
        system = next((m["content"] for m in messages if m["role"] == "system"), self.default_system)
        if system is not None:
            out += self.system_prefix + system + self.system_suffix
        for m in messages:
            if m["role"] == "user":
                out += self.user_prefix + m["content"] + self.user_suffix
            elif m["role"] == "assistant":
                out += self.assistant_prefix + m["content"] + self.assistant_suffix
        return out + (self.generation if add_generation_prompt else "")


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
    return pieces


def go_template(p: Pieces) -> str:
    """The pieces as an Ollama (Go text/template) TEMPLATE over .Messages, where Ollama keeps system messages:
    a system turn is written for every system message, empty ones included (`{{ if .System }}` would drop
    ""). No whitespace-trimming markers, so the literal text is kept byte for byte. A template that writes a
    system turn even with no system message (a default prompt, or an empty one as Llama-3.1's) writes it
    literally before a first message that is not a system one; the Modelfile's SYSTEM carries the default."""
    texts = (
        p.system_prefix,
        p.system_suffix,
        p.user_prefix,
        p.user_suffix,
        p.assistant_prefix,
        p.assistant_suffix,
        p.generation,
        p.default_system or "",
    )
    for text in texts:
        if "{{" in text or '"""' in text:
            raise TemplateError(
                "the chat template's text contains '{{' or '\"\"\"', which an Ollama TEMPLATE cannot hold"
            )
    default = ""
    if p.default_system is not None:
        default = (
            f'{{{{ if and (eq $i 0) (ne .Role "system") }}}}'
            f"{p.system_prefix}{p.default_system}{p.system_suffix}{{{{ end }}}}"
        )
    return (
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f"{default}"
        f'{{{{ if eq .Role "system" }}}}{p.system_prefix}{{{{ .Content }}}}{p.system_suffix}'
        f'{{{{ else if eq .Role "user" }}}}{p.user_prefix}{{{{ .Content }}}}{p.user_suffix}'
        f"{{{{ if $last }}}}{p.generation}{{{{ end }}}}"
        f'{{{{ else if eq .Role "assistant" }}}}{p.assistant_prefix}{{{{ .Content }}}}'
        f"{{{{ if not $last }}}}{p.assistant_suffix}{{{{ end }}}}"
        "{{ end }}{{ end }}"
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
TOOLS_NOTE = (
    "the chat template renders a tool list, which the Ollama TEMPLATE does not carry: "
    "requests with tools get no tool instructions"
)
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe_tool",
            "description": "A probe.",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]


def renders_tools(tok) -> bool:
    """Whether the chat template writes something for a `tools` list (which the translated TEMPLATE ignores)."""
    chat = [{"role": "user", "content": _U1}]
    try:
        with_tools = tok.apply_chat_template(chat, tools=_PROBE_TOOLS, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 -- a template that cannot take tools renders none
        return False
    return with_tools != _render(tok, chat, True)


def modelfile(gguf_name: str, tok, system: str | None = None) -> str:
    """The Modelfile text; FROM points at the GGUF beside it. A template with tool support gets a comment
    saying the TEMPLATE drops it (`TOOLS_NOTE`)."""
    p = split_template(tok)
    lines = ["# ollama create NAME -f Modelfile  (written by finetune export --ollama)"]
    if p.trims_content:
        lines.append(f"# note: {TRIM_NOTE}")
    if renders_tools(tok):
        lines.append(f"# note: {TOOLS_NOTE}")
    ref = gguf_name if gguf_name.startswith(("./", "../", "/")) else f"./{gguf_name}"  # relative to the Modelfile
    lines += [f"FROM {ref}", f'TEMPLATE """{go_template(p)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops(p)]
    system = system if system is not None else p.default_system
    if system:
        if '"""' in system:
            raise TemplateError('--system: the system prompt cannot contain \'"""\'')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
