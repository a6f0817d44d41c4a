"""Exactly the answer tokens carry labels (finetune.data.encode), and truncation is counted."""

from __future__ import annotations

import copy
import json
from itertools import groupby

import pytest

from finetune import data
from finetune.config import DataSection
from finetune.data.encode import IGNORE, encode
from finetune.errors import DataError

EN_TURNS = [
    ("What colour is the sky?", "The sky is blue."),
    ("And at night?", "At night it is dark, with stars."),
    ("Thanks!", "You are welcome."),
]
ZH_TURNS = [
    ("天空是什么颜色的？", "天空是蓝色的。"),
    ("晚上呢？", "晚上天空是黑色的，有星星。"),
    ("谢谢！", "不客气。"),
]
SYSTEM = {"en": "You are a helpful assistant.", "zh": "你是一个乐于助人的助手。"}

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversation(lang: str, n_turns: int, system: bool) -> list[dict]:
    turns = (EN_TURNS if lang == "en" else ZH_TURNS)[:n_turns]
    msgs = [{"role": "system", "content": SYSTEM[lang]}] if system else []
    for q, ans in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
    return msgs


def trained_positions(labels) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE]


def runs(tok, ids, labels, trained: bool = True) -> list[str]:
    """Decoded text of each maximal run of trained (or untrained) tokens, in order."""
    out = []
    for is_trained, group in groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE):
        if is_trained == trained:
            out.append(tok.decode([tid for tid, _ in group], skip_special_tokens=False))
    return out


CASES = [(lang, n, sys_) for lang in ("en", "zh") for n in (2, 3) for sys_ in (False, True)]


@pytest.mark.parametrize(
    "lang, n_turns, system", CASES, ids=[f"{lang}-{n}turns-{'sys' if s else 'nosys'}" for lang, n, s in CASES]
)
def test_chat_mask_equals_generation_markers(tiny_tokenizer, lang, n_turns, system):
    tok = tiny_tokenizer
    msgs = conversation(lang, n_turns, system)
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    [enc] = encode(tok, {"messages": msgs})
    assert enc.input_ids == list(ref["input_ids"])
    assert len(enc.labels) == len(enc.input_ids)
    assert trained_positions(enc.labels) == [i for i, m in enumerate(ref["assistant_masks"]) if m]
    assert all(enc.labels[i] == enc.input_ids[i] for i in trained_positions(enc.labels))
    answers = [m["content"] + "</s>" for m in msgs if m["role"] == "assistant"]
    assert len(answers) == n_turns
    assert runs(tok, enc.input_ids, enc.labels) == answers
    trained_ids = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert tok.decode(trained_ids, skip_special_tokens=False) == "".join(answers)
    # nothing of the prompt side is trained: every user/system text is in an untrained run
    untrained = "".join(runs(tok, enc.input_ids, enc.labels, trained=False))
    for m in msgs:
        if m["role"] != "assistant":
            assert m["content"] in untrained
    assert "<|assistant|>" in untrained and "<|assistant|>" not in "".join(answers)


@pytest.mark.parametrize("lang, n_turns, system", [("en", 3, True), ("zh", 2, False)])
def test_chat_mask_without_generation_markers(tiny_tokenizer, lang, n_turns, system):
    """A ChatML-like template with no {% generation %} markers: the span of an assistant turn
    runs from after `<|im_start|>assistant\\n` through `<|im_end|>`: the answer and its
    end-of-turn marker, not the newline the template puts after it."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    msgs = conversation(lang, n_turns, system)
    [enc] = encode(tok, {"messages": msgs})
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert len(enc.labels) == len(enc.input_ids)
    answers = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert runs(tok, enc.input_ids, enc.labels) == answers
    untrained = runs(tok, enc.input_ids, enc.labels, trained=False)
    assert untrained[-1] == "\n"
    assert all(r.endswith("<|im_start|>assistant\n") for r in untrained[:-1])


def test_template_that_is_not_prefix_consistent_trains_each_turn_on_its_inference_prompt(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # renders earlier assistant turns differently from the last one (like templates that drop
    # the reasoning of past turns): the rendered prefix is not the start of the whole
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[A] {{ m['content'] }}\n"
        "{% else %}<{{ m['role'] }}> {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    msgs = conversation("en", 2, False)
    first, second = encode(tok, {"messages": msgs})  # one sequence per assistant turn
    assert first.note.startswith("assistant turn 1 renders differently")
    for enc, k in ((first, 1), (second, 3)):
        prompt = tok.apply_chat_template(msgs[:k], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        n = len(prompt)
        assert enc.input_ids[:n] == list(prompt) and set(enc.labels[:n]) == {IGNORE}
        assert runs(tok, enc.input_ids, enc.labels) == [msgs[k]["content"]]  # up to the newline that ends the turn


def test_prompt_completion_trains_completion_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    for prompt, completion in (("Q: What is the capital of Japan?\nA:", " Tokyo."), ("天空是", "蓝色的。")):
        [enc] = encode(tok, {"prompt": prompt, "completion": completion})
        assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
        assert len(enc.labels) == len(enc.input_ids)
        assert runs(tok, enc.input_ids, enc.labels) == [completion + "</s>"]
        assert runs(tok, enc.input_ids, enc.labels, trained=False) == ["<s>" + prompt]
    # a completion that already ends with EOS gets no second one
    [enc] = encode(tok, {"prompt": "Say hi:", "completion": " hi</s>"})
    assert runs(tok, enc.input_ids, enc.labels) == [" hi</s>"]


def test_text_trains_every_token_and_appends_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    for text in ("The sun is a star.", "运动对身体很有好处。"):
        [enc] = encode(tok, {"text": text})
        assert enc.labels == enc.input_ids
        assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
        assert tok.decode(enc.input_ids, skip_special_tokens=False) == "<s>" + text + "</s>"
    assert encode(tok, {"text": "Done.</s>"})[0].input_ids.count(tok.eos_token_id) == 1


# ----------------------------------------------------------------------------- truncation


def test_truncation_keeps_the_start(tiny_tokenizer):
    msgs = conversation("en", 3, True)
    [full] = encode(tiny_tokenizer, {"messages": msgs})
    n = len(full.input_ids) - 5
    [cut] = encode(tiny_tokenizer, {"messages": msgs}, max_length=n)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:n] and cut.labels == full.labels[:n]
    [same] = encode(tiny_tokenizer, {"messages": msgs}, max_length=len(full.input_ids))
    assert not same.truncated and same.input_ids == full.input_ids


def _record(question: str, answer: str) -> dict:
    return {"instruction": question, "input": "", "output": answer}


def test_truncated_and_dropped_records_are_counted(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    max_length = 48
    short = _record("Hi", "Hello")
    long_answer = _record("Tell me about the sun.", "The sun is a star. " * 20)  # answer starts early, is cut
    long_prompt = _record("Read this: " + "words and more words " * 20, "OK")  # answer starts past max_length
    path = tmp_path / "d.json"
    path.write_text(json.dumps([short, long_answer, long_prompt]), encoding="utf-8")

    prepared = data.load(DataSection(train=str(path)), tok, max_length=max_length)
    split = prepared.train
    assert (split.n_records, split.n_truncated, split.n_dropped, len(split.encoded)) == (3, 2, 1, 2)
    kept_short, kept_long = split.encoded
    assert not kept_short.truncated and kept_long.truncated
    assert len(kept_long.input_ids) == len(kept_long.labels) == max_length
    [full] = encode(
        tok,
        {
            "messages": [
                {"role": "user", "content": long_answer["instruction"]},
                {"role": "assistant", "content": long_answer["output"]},
            ]
        },
    )
    assert kept_long.input_ids == full.input_ids[:max_length] and kept_long.labels == full.labels[:max_length]
    assert kept_long.labels[-1] != IGNORE  # the cut answer is still trained up to the limit
    assert prepared.notes == [
        f"{path}: 2 of 3 records truncated to train.max_length={max_length}, 1 dropped (no answer token left)"
    ]
    assert prepared.modes[0].startswith(f"{path}: chat template prefix-consistent: one sequence per record")
    stats = split.stats()
    assert (stats["records"], stats["examples"], stats["truncated"], stats["dropped"], stats["length_max"]) == (
        3,
        2,
        2,
        1,
        max_length,
    )


def test_all_records_too_long_is_a_data_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "long.json"
    path.write_text(json.dumps([_record("Read this: " + "words " * 30, "OK")] * 2), encoding="utf-8")
    with pytest.raises(DataError) as e:
        data.load(DataSection(train=str(path)), tiny_tokenizer, max_length=8)
    assert str(e.value).startswith(f"{path}: all 2 records are longer than train.max_length=8")


def test_truncation_counts_stay_consistent_after_an_eval_split(tmp_path, tiny_tokenizer):
    """Held-out examples take their truncation count with them: the train split cannot report
    more truncated records than it has, and the eval split reports its own."""
    rows = [_record(f"Tell me fact number {i}.", f"Fact {i}: " + "the sun is a star. " * 10) for i in range(4)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    prepared = data.load(DataSection(train=str(path), eval_ratio=0.5), tiny_tokenizer, max_length=24)
    assert all(e.truncated for e in prepared.train.encoded + prepared.eval.encoded)
    assert (prepared.train.n_records, prepared.eval.n_records) == (2, 2)
    assert prepared.train.n_truncated == 2
    assert prepared.eval.n_truncated == 2
