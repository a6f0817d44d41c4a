"""Ollama parity with Go's real text/template: the Modelfile TEMPLATE that `finetune export --ollama` writes
is executed by a small Go program fed the data Ollama's template/template.go passes (collated .Messages,
.System, .Tools, func `json`), and the text and token ids (BOS prepended when the GGUF says add_bos_token,
as Ollama's runner does) must equal `apply_chat_template` on conversations with surrounding whitespace, an
empty system message, several turns, a tool list and Chinese. Needs `go` (apt-get install golang-go)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _support import missing_tool

from finetune import gguf_export, ollama
from finetune.loading import FALLBACK_CHAT_TEMPLATE

GO_SOURCE = Path(__file__).parent / "go" / "ollama_render"
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are Qwen.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_NO_DEFAULT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_UNTRIMMED = LLAMA3.replace(" | trim", "")
LLAMA31_UNTRIMMED = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n{{ sys }}<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CHATS = {
    "whitespace": [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "\n Hi there  "},
        {"role": "assistant", "content": " Hello. \n"},
        {"role": "user", "content": "What now?\t"},
    ],
    "empty_system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    "multi_turn": [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
        {"role": "assistant", "content": "Four"},
        {"role": "user", "content": "Five"},
    ],
    "tools": [{"role": "system", "content": "You may call tools."}, {"role": "user", "content": "Weather in Paris?"}],
    "chinese": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "天空为什么是蓝色的？"},
        {"role": "assistant", "content": "因为瑞利散射。"},
        {"role": "user", "content": "谢谢！"},
    ],
}


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """The Go renderer, built once per session (stdlib only: offline)."""
    if shutil.which("go") is None:
        missing_tool("the Go toolchain is missing: apt-get install golang-go (CI installs it)")
    tmp = tmp_path_factory.mktemp("go")
    env = {
        **os.environ,
        "GOCACHE": str(tmp / "cache"),
        "GOPATH": str(tmp / "gopath"),
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    binary = tmp / "ollama_render"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=GO_SOURCE, env=env, check=True, timeout=300)

    def render(cases: list[dict]) -> list[dict]:
        done = subprocess.run(
            [str(binary)], input=json.dumps(cases), capture_output=True, text=True, check=True, timeout=60
        )
        return json.loads(done.stdout)

    return render


def ollama_messages(pieces, messages):
    """What Ollama's chat handler passes the template: the Modelfile SYSTEM becomes a first system message
    when the request has none."""
    if pieces.default_system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": pieces.default_system}, *messages]
    return messages


@pytest.mark.parametrize(
    "template",
    [None, CHATML, CHATML_NO_DEFAULT, LLAMA3_UNTRIMMED, LLAMA31_UNTRIMMED, FALLBACK_CHAT_TEMPLATE],
    ids=["tiny", "chatml-default-system", "chatml", "llama3-untrimmed", "llama3.1-untrimmed", "finetune-fallback"],
)
def test_the_template_renders_in_go_as_the_chat_template(go_render, tiny_tokenizer, template):
    tok = copy.deepcopy(tiny_tokenizer)
    if template:
        tok.chat_template = template
    pieces = ollama.split_template(tok)
    go = ollama.go_template(pieces)
    add_bos = gguf_export.adds_bos(tok)
    cases = [
        {"template": go, "messages": ollama_messages(pieces, chat), "tools": TOOLS if name == "tools" else []}
        for name, chat in CHATS.items()
    ]
    results = go_render(cases)
    for (name, chat), result in zip(CHATS.items(), results):
        assert not result.get("error"), (name, result)
        kwargs = {"tools": TOOLS} if name == "tools" else {}
        expected = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
        bos = tok.bos_token if add_bos else ""
        assert bos + result["text"] == expected, name
        # token ids: Ollama's runner tokenizes the text and prepends BOS when add_bos_token says so
        ids = ([tok.bos_token_id] if add_bos else []) + tok(result["text"], add_special_tokens=False)["input_ids"]
        assert ids == tok(expected, add_special_tokens=False)["input_ids"], name


def test_no_extra_bos_when_the_template_writes_none(tmp_path, tiny_path, tiny_tokenizer):
    """Divergence (b): a template without BOS on a tokenizer that adds one (finetune's fallback template)
    trained without BOS, so the GGUF must not ask the runner for one; the tiny model's template writes it."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    assert tok.bos_token and not gguf_export.adds_bos(tok)
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_path, model_dir)
    tok.save_pretrained(str(model_dir))
    report = gguf_export.convert(model_dir, tmp_path / "m.gguf", "f16")
    meta, _ = gguf_export.read_gguf(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.add_bos_token"] is False and report.add_bos is False
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    assert gguf_export.adds_bos(tiny_tokenizer) == prompt.startswith(tiny_tokenizer.bos_token)


def test_a_trimming_template_is_translated_with_a_note(go_render, tiny_tokenizer):
    """Divergence (c): Llama-3's `| trim` has no Go text/template equivalent: the TEMPLATE matches on content
    without surrounding whitespace, differs on content with it, and the Modelfile says so."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = LLAMA3
    pieces = ollama.split_template(tok)
    assert pieces.trims_content and not ollama.split_template(_with(tiny_tokenizer, LLAMA3_UNTRIMMED)).trims_content
    assert f"# note: {ollama.TRIM_NOTE}" in ollama.modelfile("m.gguf", tok)
    go = ollama.go_template(pieces)
    names = ["multi_turn", "chinese", "whitespace"]
    results = go_render([{"template": go, "messages": CHATS[n], "tools": []} for n in names])
    bos = tok.bos_token if gguf_export.adds_bos(tok) else ""  # Ollama's runner adds it
    for name, result in zip(names, results):
        expected = tok.apply_chat_template(CHATS[name], tokenize=False, add_generation_prompt=True)
        assert (bos + result["text"] == expected) == (name != "whitespace"), name


def _with(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def test_an_empty_system_message_is_a_system_turn(go_render, tiny_tokenizer):
    """Divergence (d): `{{ if .System }}` is false for ""; the TEMPLATE writes the turn from .Messages."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML_NO_DEFAULT
    go = ollama.go_template(ollama.split_template(tok))
    [result] = go_render([{"template": go, "messages": CHATS["empty_system"], "tools": []}])
    assert result["text"].startswith("<|im_start|>system\n<|im_end|>\n")
    assert "if .System" not in go


def test_a_tool_template_it_cannot_translate_says_exactly_what_is_lost(tiny_tokenizer):
    """Tool parts that are not prefix/item/suffix text (here: a numbered tool list) keep a TEMPLATE without
    tools, and the Modelfile and the export report name each part it leaves out (here also the `tool` turns)."""
    tok = _with(
        tiny_tokenizer,
        "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ loop.index }}. {{ t.function.name }}\n"
        "{% endfor %}<|im_end|>\n{% endif %}" + CHATML_NO_DEFAULT,
    )
    assert ollama.renders_tools(tok) and ollama.split_template(tok).tools is None
    text = ollama.modelfile("m.gguf", tok)
    lost = ollama.tools_note(["the tool list", "tool results"])
    assert "requests with tools get no tool instructions" in lost and "tool results never reach the model" in lost
    assert ollama.modelfile_notes(text) == [lost] and f"# note: {lost}" in text
    assert ".Tools" not in text and ".ToolCalls" not in text
    no_tools = (
        "{% for m in messages %}{% if m.role != 'tool' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = _with(tiny_tokenizer, no_tools)
    assert not ollama.renders_tools(tok) and "note:" not in ollama.modelfile("m.gguf", tok)


SFT_TOOLS = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "sft_tools.yaml"
# ChatML with a tool list of one line per tool, calls after the content, results as their own turns
CHATML_TOOLS = (
    "{% if tools %}<|im_start|>tools\n{% for t in tools %}- {{ t.function.name }}: {{ t.function.description }}\n"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}\n<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALLS = [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}},
    {"type": "function", "function": {"name": "get_time", "arguments": {}}},
]
TOOL_CHATS = {
    "calls_and_results": [
        {"role": "system", "content": "You may call tools."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": CALLS},
        {"role": "tool", "content": "18 C", "tool_call_id": "1"},
        {"role": "tool", "content": "12:00", "tool_call_id": "2"},
    ],
    "answer_after_results": [
        {"role": "user", "content": "天气？"},
        {"role": "assistant", "content": "我查一下。", "tool_calls": CALLS[:1]},
        {"role": "tool", "content": "18 C"},
        {"role": "assistant", "content": "18 度。"},
        {"role": "user", "content": "谢谢"},
    ],
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": {}}}


def _go_json(text: str) -> str:
    """`text` with each call's arguments as Ollama's `json` writes them (compact, keys sorted): JSON_NOTE."""
    for call in CALLS:
        args = call["function"]["arguments"]
        text = text.replace(
            json.dumps(args, ensure_ascii=False), json.dumps(args, separators=(",", ":"), sort_keys=True)
        )
    return text


@pytest.mark.parametrize("family", ["sft_tools_recipe", "chatml_tools"])
def test_tool_calls_results_and_the_tool_list_render_in_go(go_render, tiny_tokenizer, family):
    """A tool-calling template's TEMPLATE writes .Tools, an assistant's .ToolCalls and `tool` messages as the chat
    template does; the one difference is the arguments' JSON, which the Modelfile states (JSON_NOTE)."""
    import yaml

    template = yaml.safe_load(SFT_TOOLS.read_text(encoding="utf-8"))["model"]["chat_template"]
    tok = _with(tiny_tokenizer, template if family == "sft_tools_recipe" else CHATML_TOOLS)
    pieces = ollama.split_template(tok)
    assert pieces.tools is not None
    go = ollama.go_template(pieces)
    assert ".ToolCalls" in go and ".Tools" in go and 'eq .Role "tool"' in go
    text = ollama.modelfile("m.gguf", tok)
    assert f"# note: {ollama.JSON_NOTE}" in text and "leaves out" not in text
    add_bos = gguf_export.adds_bos(tok)
    cases = [(name, chat, tools) for name, chat in TOOL_CHATS.items() for tools in ([*TOOLS, TIME_TOOL], [])]
    results = go_render([{"template": go, "messages": chat, "tools": tools} for _, chat, tools in cases])
    for (name, chat, tools), result in zip(cases, results):
        assert not result.get("error"), (name, result)
        expected = tok.apply_chat_template(chat, tools=tools or None, tokenize=False, add_generation_prompt=True)
        assert "18 C" in expected and "get_weather" in expected  # the results and calls are in the prompt
        assert (tok.bos_token if add_bos else "") + result["text"] == _go_json(expected), (name, len(tools))


def test_the_shipped_tools_recipe_ends_its_tool_list_with_a_newline(tiny_tokenizer):
    import yaml

    tok = _with(tiny_tokenizer, yaml.safe_load(SFT_TOOLS.read_text(encoding="utf-8"))["model"]["chat_template"])
    text = tok.apply_chat_template(CHATS["tools"], tools=[*TOOLS, TIME_TOOL], tokenize=False)
    assert "Tools: get_weather, get_time\n<|system|>\n" in text
