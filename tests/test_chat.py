"""`finetune chat`: `--prompt` answers through the real CLI with what greedy generation gives; the
interactive loop keeps history, /reset clears it, /exit quits; an adapter dir runs on its base."""

from __future__ import annotations

import argparse
import builtins

import torch
from transformers import AutoModelForCausalLM

from _merge_support import lora, make_adapter
from _support import run_cli
from finetune import chat


def greedy(model_dir, tok, messages, n):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_chat_prompt_answers_once_through_the_cli(tmp_path, tiny_path, tiny_tokenizer):
    r = run_cli(["chat", tiny_path, "--prompt", "What colour is the sky?", "--system", "You are a helpful assistant.",
                 "--max-new-tokens", "12"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What colour is the sky?"}]
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
