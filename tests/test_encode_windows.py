"""The encoder's fast boundary checks, with real tokenizers (tests/fixtures/vocab) and every vendored
chat template: checking only the text after the last added token before a turn's boundary (its
"window") gives exactly the ids, labels and notes that tokenizing every turn's whole prompt and
completion gives, while tokenizing far less text."""

from __future__ import annotations

from pathlib import Path

import pytest
from _support import real_vocab
from transformers import AutoTokenizer

from finetune.data import encode as encode_module
from finetune.data.encode import EncodeOptions, encode_many
from finetune.errors import DataError
from tests.test_real_templates import TEMPLATES, TOOLS, conversation

VOCAB = Path(__file__).parent / "fixtures" / "vocab"


@pytest.fixture(scope="module")
def real_tokenizers():
    return {
        # byte-level BPE behind a split regex, <|im_start|> / <|im_end|> ... as added tokens
        "qwen2": AutoTokenizer.from_pretrained(str(real_vocab("qwen2").parent), gguf_file="ggml-vocab-qwen2.gguf"),
        # SentencePiece-style: a "▁" prepended to every piece by the normalizer, byte fallback
        "phi-3": AutoTokenizer.from_pretrained(str(VOCAB / "phi-3-hf")),
    }


def examples() -> list[dict]:
    out = []
    for lang in ("en", "zh"):
        out.append({"messages": conversation(lang)})
        out.append({"messages": conversation(lang, reasoning=True)})
        out.append({"messages": conversation(lang, tools=True), "tools": TOOLS})
        long = conversation(lang)
        long += [{"role": "assistant", "content": "  Spaces, then\n\nlines.  "}, {"role": "user", "content": "ok?"}]
        long += [{"role": "assistant", "content": "Yes."}]
        out.append({"messages": long[1:]})  # no system prompt, three answers
    return out


def encoded_with(tok, checked: int, monkeypatch, seen: list[str] | None = None):
    """Every example through encode_many, the first `checked` sequences also checked in full."""
    monkeypatch.setattr(encode_module._Anchors, "CHECKED", checked)
    encode_module._Anchors._of.pop(tok, None)
    real = encode_module._tokenize

    def spy(tok, texts, offsets=False):
        if seen is not None and not offsets:
            seen.extend(texts)
        return real(tok, texts, offsets)

    monkeypatch.setattr(encode_module, "_tokenize", spy)
    out = []
    for example in examples():
        try:
            [sequences] = encode_many(tok, [example], options=EncodeOptions(chat_template_kwargs={}))
            out.append([(e.input_ids, e.labels, e.note) for e in sequences])
        except DataError as e:
            out.append(str(e))
    monkeypatch.setattr(encode_module, "_tokenize", real)
    return out


@pytest.mark.parametrize("tokenizer", ["qwen2", "phi-3"])
def test_window_checks_give_exactly_what_full_checks_give(real_tokenizers, tokenizer, monkeypatch):
    base = real_tokenizers[tokenizer]
    saved = {}
    for path in sorted(TEMPLATES.glob("*.jinja")):
        tok = base.__class__.__new__(base.__class__)
        tok.__dict__.update(base.__dict__)  # a shallow copy: the same backend, another template
        tok.chat_template = path.read_text(encoding="utf-8")
        window_text, full_text = [], []
        windows = encoded_with(tok, 0, monkeypatch, window_text)
        assert encode_module._Anchors.of(tok).ids, "a window disagreed with its full check"
        full = encoded_with(tok, 10**9, monkeypatch, full_text)
        assert windows == full, path.stem
        saved[path.stem] = sum(map(len, full_text)) - sum(map(len, window_text))
    # the windows tokenize less wherever the template writes the tokenizer's own added tokens, and
    # never more; (with phi-3's, every answer tokenizes differently alone: each turn is its own sequence)
    assert all(v >= 0 for v in saved.values())
    if tokenizer == "qwen2":
        assert saved["Qwen-Qwen2.5-7B-Instruct"] > 0


def test_a_window_that_disagrees_with_the_full_check_turns_windows_off(real_tokenizers, monkeypatch):
    tok = real_tokenizers["qwen2"]
    tok.chat_template = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    full = encoded_with(tok, 10**9, monkeypatch)
    real = encode_module._boundary_checks

    def wrong(*args):
        checks = real(*args)
        checks[0].text += "!"  # a window that cannot match: it would wrongly refuse the turn
        return checks

    monkeypatch.setattr(encode_module, "_boundary_checks", wrong)
    assert encoded_with(tok, 10**9, monkeypatch) == full  # checked in full: exact, and windows are off
    assert not encode_module._Anchors.of(tok).ids
    assert encoded_with(tok, 0, monkeypatch) == full  # a refused window is settled in full
