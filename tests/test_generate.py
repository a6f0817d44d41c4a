"""finetune.generate: prompt tuning and P-tuning generate the same with and without the KV cache, on any
transformers version (peft 0.21.2's own path breaks on transformers 5.24), and equal peft's own generation
where peft's is right."""

from __future__ import annotations

import io

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.chat import _streamer
from finetune.generate import generate, peft_misses_the_cache, uses_prompt_embeddings

PEFT_CACHE_BUG = peft_misses_the_cache()

CONFIGS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=32),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", init_lora_weights=False),
}
PROMPTS = ["What colour is the sky?", "中国的首都是哪里？", "Hi"]


def _model(tiny_path, method):
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), CONFIGS[method]())
    if method != "lora":
        with torch.no_grad():  # virtual tokens that steer generation away from the base model's answer
            for p in model.prompt_encoder.parameters():
                p.normal_(0, 0.5)
    return model.eval()


def _greedy(tok):
    return dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_learning_generates_the_same_with_and_without_the_kv_cache(tiny_path, tiny_tokenizer, method):
    model, tok = _model(tiny_path, method), tiny_tokenizer
    assert uses_prompt_embeddings(model)
    base_answer = generate(model.get_base_model(), **tok(PROMPTS[:1], return_tensors="pt"), **_greedy(tok))
    for text in PROMPTS:
        enc = tok([text], return_tensors="pt")
        with torch.no_grad():
            cached = generate(model, **enc, **_greedy(tok), use_cache=True)
            uncached = generate(model, **enc, **_greedy(tok), use_cache=False)
        assert torch.equal(cached, uncached)
        assert torch.equal(cached[:, : enc["input_ids"].shape[1]], enc["input_ids"]), "the prompt comes first"
        if not PEFT_CACHE_BUG:  # peft's own uncached path is right on every version; its cached one is not on 5.24
            assert torch.equal(cached, model.generate(**enc, **_greedy(tok), use_cache=True))
        assert torch.equal(cached, model.generate(**enc, **_greedy(tok), use_cache=False))
    assert not torch.equal(cached, base_answer), "the virtual tokens had no effect: the test proves nothing"


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "lora"])
def test_left_padded_batches_answer_as_one_by_one(tiny_path, tiny_tokenizer, method):
    model, tok = _model(tiny_path, method), tiny_tokenizer
    tok = tok.__class__.from_pretrained(tiny_path, padding_side="left")
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = generate(model, **batch, **_greedy(tok))
    width = batch["input_ids"].shape[1]
    for row, text in enumerate(PROMPTS):
        enc = tok([text], return_tensors="pt")
        alone = generate(model, **enc, **_greedy(tok))[0, enc["input_ids"].shape[1] :].tolist()
        together_row = together[row, width:].tolist()
        assert together_row[: len(alone)] == alone, (method, text)
        assert all(t == tok.pad_token_id for t in together_row[len(alone) :])


def test_streaming_prints_exactly_the_answer(tiny_path, tiny_tokenizer):
    model, tok = _model(tiny_path, "prompt_tuning"), tiny_tokenizer
    enc = tok([PROMPTS[0]], return_tensors="pt")
    sink = io.StringIO()
    with torch.no_grad():
        out = generate(model, **enc, **_greedy(tok), streamer=_streamer(tok, sink))
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() and sink.getvalue().strip() == answer.strip()
