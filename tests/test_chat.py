"""`finetune chat`: `--prompt` answers through the real CLI with what greedy generation gives; the
interactive loop keeps history, /reset clears it, /exit quits; an adapter dir runs on its base."""

from __future__ import annotations

import argparse
import builtins
from pathlib import Path

import torch
from _merge_support import lora, make_adapter
from _support import run_cli
from transformers import AutoModelForCausalLM

from finetune import chat, outputs


def greedy(model_dir, tok, messages, n):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_chat_prompt_answers_once_through_the_cli(tmp_path, tiny_path, tiny_tokenizer):
    r = run_cli(
        [
            "chat",
            tiny_path,
            "--prompt",
            "What colour is the sky?",
            "--system",
            "You are a helpful assistant.",
            "--max-new-tokens",
            "12",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What colour is the sky?"},
    ]
    expected = greedy(tiny_path, tiny_tokenizer, messages, 12)
    assert expected and r.stdout.strip() == expected
    assert "Traceback" not in r.stderr


def _args(model, **kw):
    defaults = dict(model=model, prompt=None, system=None, max_new_tokens=6, temperature=0.0, top_p=1.0, base=None)
    return argparse.Namespace(**{**defaults, **kw})


def test_interactive_chat_keeps_history_resets_and_exits(tmp_path, tiny_path, monkeypatch, capsys):
    adapter = make_adapter(tiny_path, tmp_path / "adapter", lora())
    seen = []
    real_answer = chat.Chat.answer

    def spy(self, text, stream=None):
        seen.append([m["content"] for m in self.messages()])
        return real_answer(self, text, stream)

    monkeypatch.setattr(chat.Chat, "answer", spy)
    lines = iter(["Hello", "How are you?", "/reset", "Again", "/exit", "never read"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert chat.run_cli(_args(str(adapter), system="Be brief.")) == 0
    assert len(seen) == 3 and seen[0] == ["Be brief."]
    assert len(seen[1]) == 3 and seen[1][1] == "Hello"  # system, first question, first answer
    assert seen[2] == ["Be brief."]  # /reset kept only the system prompt
    err = capsys.readouterr().err
    assert "lora adapter on" in err and "(history cleared)" in err


def test_chat_uses_the_recorded_system_prompt_and_accepts_tiny_names(tmp_path, tiny_path, monkeypatch, capsys):
    """An output dir's recipe.yaml `data.system` is the default system prompt (a merged model finds it
    through merge_report.json); --system replaces it; `tiny-llama` loads as `finetune eval` loads it."""
    import json

    import yaml

    adapter = make_adapter(tiny_path, tmp_path / "adapter", lora())
    (adapter / "recipe.yaml").write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "model": {"name_or_path": "tiny-llama"},
                "data": {"train": "x.jsonl", "system": "你是一个助手。"},
            },
            allow_unicode=True,
        ),
        encoding="utf-8",
    )
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "merge_report.json").write_text(json.dumps({"adapters": [str(adapter)]}))
    assert outputs.recorded_system_prompt(adapter) == outputs.recorded_system_prompt(merged) == "你是一个助手。"
    assert outputs.recorded_system_prompt(tiny_path) is None

    seen = []
    monkeypatch.setattr(chat.Chat, "answer", lambda self, text, stream=None: seen.append(self.messages()) or "")
    lines = iter(["Hello", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert chat.run_cli(_args(str(adapter))) == 0
    assert seen[0] == [{"role": "system", "content": "你是一个助手。"}]  # the history before "Hello"
    assert "system prompt (the one it was trained with" in capsys.readouterr().err
    assert chat.run_cli(_args(str(adapter), prompt="Hi", system="")) == 0 and seen[1] == []  # '' = no system prompt
    assert chat.run_cli(_args("tiny-llama", prompt="Hi", system="Be brief.")) == 0
    assert seen[2] == [{"role": "system", "content": "Be brief."}]

    # export's Modelfile carries the same default (Ollama sends SYSTEM when a request has no system message)
    from finetune import export

    export.export_gguf(str(adapter), str(tmp_path / "m.gguf"), "f32", ollama_file=True)
    assert 'SYSTEM """你是一个助手。"""' in (tmp_path / "Modelfile").read_text(encoding="utf-8")


def test_chat_line_editing_recalls_history_with_the_arrow_keys(tmp_path):
    """Through a real terminal (a pty): the up arrow brings back the previous line instead of inserting
    an escape code, and the history is kept for the next session."""
    import os
    import pty
    import subprocess
    import sys
    import time

    history = tmp_path / "history"
    code = (
        "from pathlib import Path; from finetune.chat import enable_line_editing; "
        f"enable_line_editing(Path({str(history)!r})); print(repr(input('a> '))); print(repr(input('b> ')))"
    )
    main, child = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=child, stdout=child, stderr=child, env=env)
    os.close(child)
    output = b""

    def read_until(marker: bytes):
        nonlocal output
        deadline = time.monotonic() + 60
        while marker not in output and time.monotonic() < deadline:
            try:
                output += os.read(main, 1024)
            except OSError:
                break

    read_until(b"a> ")
    os.write(main, "你好 world\r".encode())
    read_until(b"b> ")
    os.write(main, b"\x1b[A\r")  # up arrow, enter
    assert proc.wait(timeout=60) == 0
    read_until(b"never")
    os.close(main)
    text = output.decode("utf-8", "replace")
    assert text.count("'你好 world'") == 2, text
    assert history.read_text(encoding="utf-8").splitlines()[-1] == "你好 world"
