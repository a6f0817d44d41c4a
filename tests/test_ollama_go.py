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


def test_a_template_with_tool_support_is_flagged(tiny_tokenizer):
    """The TEMPLATE carries no .Tools: a chat template that renders a tool list gets a note in the Modelfile."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}" + CHATML_NO_DEFAULT
    )
    assert ollama.renders_tools(tok)
    assert f"# note: {ollama.TOOLS_NOTE}" in ollama.modelfile("m.gguf", tok)
    tok.chat_template = CHATML_NO_DEFAULT
    assert not ollama.renders_tools(tok) and "note:" not in ollama.modelfile("m.gguf", tok)
