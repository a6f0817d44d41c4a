"""Exact label masks with released chat templates (tests/fixtures/templates, from llama.cpp's collection).

The templates render with the tiny tokenizer (its vocabulary, the template replaced): the masks are
about which characters of the rendered text are trained, which is what these tests check. For every
trained assistant turn, the untrained tokens before it are exactly its inference prompt,
`apply_chat_template(history, add_generation_prompt=True)` tokenized; its trained tokens hold its
answer, tool calls and reasoning, and nothing of the prompt side."""

from __future__ import annotations

import copy
import json
from itertools import groupby
from pathlib import Path

import pytest
from jinja2 import TemplateError

from finetune.data.encode import IGNORE, EncodeOptions, encode, fold_system, template_messages
from finetune.errors import DataError

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "tests" / "fixtures" / "templates"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TEXT = {
    "en": {
        "system": "You are a helpful assistant.",
        "q1": "What colour is the sky?",
        "a1": "The sky is blue.",
        "r1": "Sunlight scatters; blue scatters most.",
        "q2": "What is the weather in Paris?",
        "a2": "It is sunny, 21 degrees.",
        "r2": "I should call the weather tool.",
        "city": "Paris",
    },
    "zh": {
        "system": "你是一个乐于助人的助手。",
        "q1": "天空是什么颜色的？",
        "a1": "天空是蓝色的。",
        "r1": "阳光散射，蓝光散射最多。",
        "q2": "北京的天气怎么样？",
        "a2": "北京今天晴，21度。",
        "r2": "我应该调用天气工具。",
        "city": "北京",
    },
}


def conversation(lang: str, reasoning: bool = False, tools: bool = False) -> list[dict]:
    t = TEXT[lang]
    msgs = [
        {"role": "system", "content": t["system"]},
        {"role": "user", "content": t["q1"]},
        {"role": "assistant", "content": t["a1"]},
        {"role": "user", "content": t["q2"]},
    ]
    if reasoning:
        msgs[2]["reasoning_content"] = t["r1"]
    if tools:
        msgs.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "id": "call00001",
                        "function": {"name": "get_weather", "arguments": {"city": t["city"]}},
                    }
                ],
            }
        )
        msgs.append(
            {
                "role": "tool",
                "content": '{"sky": "sunny", "celsius": 21}',
                "tool_call_id": "call00001",
                "name": "get_weather",
            }
        )
    msgs.append({"role": "assistant", "content": t["a2"]})
    if reasoning:
        msgs[-1]["reasoning_content"] = t["r2"]
    return msgs


def with_template(tok, name: str):
    tok = copy.deepcopy(tok)
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


def assert_exact(tok, msgs, tools, sequences, options: EncodeOptions) -> list[int]:
    """Every trained run is one assistant turn, after exactly its inference prompt; returns the turns."""

    def prompt_ids(history):
        return list(
            tok.apply_chat_template(
                template_messages(history),
                tools=tools,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                **options.chat_template_kwargs,
            )["input_ids"]
        )

    try:
        prompt_ids(msgs[:2])
    except TemplateError:  # a template with no system role: encode folded it into the first user turn
        msgs = fold_system(msgs)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    prompts = {k: prompt_ids(msgs[:k]) for k in turns}
    trained = []
    for enc in sequences:
        assert len(enc.labels) == len(enc.input_ids)
        for is_trained, group in groupby(range(len(enc.labels)), key=lambda i: enc.labels[i] != IGNORE):
            group = list(group)
            if not is_trained:
                continue
            start = group[0]
            [k] = [k for k in turns if prompts[k] == enc.input_ids[:start]]  # the untrained prefix is its prompt
            assert [enc.labels[i] for i in group] == [enc.input_ids[i] for i in group]
            text = tok.decode([enc.input_ids[i] for i in group], skip_special_tokens=False)
            turn = msgs[k]
            assert turn["content"].strip() in text
            for call in turn.get("tool_calls", []):
                assert call["function"]["name"] in text and call["function"]["arguments"]["city"] in text
            if turn.get("reasoning_content"):
                assert turn["reasoning_content"] in text
            for m in msgs[:k]:  # nothing of the prompt side: system, user, tool results
                if m["role"] != "assistant":
                    assert m["content"] not in text
            assert not any(t["function"]["description"] in text for t in tools or [])
            trained.append(k)
    assert sorted(trained) == (turns if options.train_on == "all_turns" else turns[-1:])
    return trained


CASES = [
    # (template, variant, chat_template_kwargs, sequences per record)
    ("Qwen-Qwen3-0.6B", "plain", {}, 2),  # the last turn gets an empty think block, earlier ones not
    ("Qwen-Qwen3-0.6B", "reasoning", {}, 2),  # earlier turns' reasoning dropped
    ("Qwen-Qwen3-0.6B", "tools", {}, 3),
    ("Qwen3.5-4B", "reasoning", {}, 2),  # the generation prompt opens <think>
    ("Qwen-QwQ-32B", "plain", {}, 2),  # the generation prompt pre-fills an empty think block
    ("Qwen-QwQ-32B", "reasoning", {"enable_thinking": True}, 2),  # no reasoning key: written inline
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "reasoning", {}, 2),  # drops reasoning; opens <think>
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "reasoning", {"enable_thinking": True}, 2),
    ("google-gemma-2-2b-it", "plain", {}, 1),  # no system role: folded into the first user turn
    ("google-gemma-4-31B-it", "plain", {}, 2),
    ("openai-gpt-oss-120b", "reasoning", {}, 2),
    ("meta-llama-Llama-3.1-8B-Instruct", "tools", {}, 1),
    ("meta-llama-Llama-3.2-3B-Instruct", "plain", {}, 1),
    ("mistralai-Mistral-Nemo-Instruct-2407", "tools", {}, 3),  # system prompt in the last user turn
    ("Qwen-Qwen2.5-7B-Instruct", "tools", {}, 1),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "tools", {}, 1),
    ("HuggingFaceTB-SmolLM3-3B", "plain", {}, 1),
    ("GLM-4.6", "reasoning", {}, 2),
    ("glm_4_5", "reasoning", {}, 2),  # GLM-4.5 as llama.cpp ships it
    ("glm_4_5", "tools", {}, 1),
    ("GLM-4.7-Flash", "reasoning", {}, 2),
    ("microsoft-Phi-3.5-mini-instruct", "plain", {}, 2),
    # a tool result renders differently once an answer follows: the answer is trained after the
    # prompt as inference renders it, which every earlier turn's prompt + completion starts
    ("Bielik-11B-v3.0-Instruct", "tools", {}, 1),
]


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("name, variant, kwargs, n_sequences", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_exact_masks_with_real_templates(tiny_tokenizer, name, variant, kwargs, n_sequences, lang):
    tok = with_template(tiny_tokenizer, name)
    msgs = conversation(lang, reasoning=variant == "reasoning", tools=variant == "tools")
    tools = TOOLS if variant == "tools" else None
    options = EncodeOptions(chat_template_kwargs=kwargs)
    example = {"messages": msgs, **({"tools": tools} if tools else {})}
    sequences = encode(tok, example, options=options)
    assert len(sequences) == n_sequences
    assert_exact(tok, msgs, tools, sequences, options)
    last = encode(tok, example, options=EncodeOptions(chat_template_kwargs=kwargs, train_on="last_turn"))
    assert len(last) == 1
    assert_exact(tok, msgs, tools, last, EncodeOptions(chat_template_kwargs=kwargs, train_on="last_turn"))
    assert last[0].input_ids == sequences[-1].input_ids[: len(last[0].input_ids)]


def test_every_vendored_template_gives_exact_masks_or_a_clean_error(tiny_tokenizer):
    """The plain two-turn chat with a system prompt, in en and zh, through every vendored template."""
    outcomes = {}
    for path in sorted(TEMPLATES.glob("*.jinja")):
        tok = with_template(tiny_tokenizer, path.stem)
        for lang in ("en", "zh"):
            msgs = conversation(lang)
            try:
                sequences = encode(tok, {"messages": msgs})
            except DataError as e:
                outcomes[path.stem, lang] = str(e)
                continue
            assert_exact(tok, msgs, None, sequences, EncodeOptions())
            outcomes[path.stem, lang] = "exact"
    errors = {k: v for k, v in outcomes.items() if v != "exact"}
    # Only the templates written for tool use alone refuse a chat without tools, in the template's own words.
    assert {name for name, _ in errors} == {
        "CohereForAI-c4ai-command-r-plus-tool_use",
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
    }
    assert all("TypeError: 'NoneType' object is not iterable" in v and "\n" not in v for v in errors.values())


def test_thinking_off_with_reasoning_data_is_a_clean_error(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")  # thinking off unless enabled
    with pytest.raises(DataError, match="reasoning cannot be written.*enable_thinking"):
        encode(tok, {"messages": conversation("en", reasoning=True)})


def test_template_that_drops_reasoning_is_a_clean_error(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, "llama-cpp-rwkv-world")
    with pytest.raises(DataError, match="drops this turn's reasoning"):
        encode(tok, {"messages": conversation("zh", reasoning=True)})


def test_template_without_tool_support_is_a_clean_error(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, "microsoft-Phi-3.5-mini-instruct")
    with pytest.raises(DataError, match="does not render tool calls"):
        encode(tok, {"messages": conversation("en", tools=True), "tools": TOOLS})


def test_reasoning_without_template_support_is_written_in_think_tags(tiny_tokenizer):
    """Llama 3.1 has no reasoning support: the trained turn carries it inline in reasoning_tags; the
    history shows earlier turns as the template does at inference (without it)."""
    tok = with_template(tiny_tokenizer, "meta-llama-Llama-3.1-8B-Instruct")
    msgs = conversation("en", reasoning=True)
    options = EncodeOptions(reasoning_tags=("<reason>", "</reason>"))
    first, second = encode(tok, {"messages": msgs}, options=options)
    assert_exact(tok, msgs, None, [first, second], options)
    trained = [tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE]) for e in (first, second)]
    assert trained[1] == f"<reason>\n{msgs[4]['reasoning_content']}\n</reason>\n\n{msgs[4]['content']}<|eot_id|>"
    assert msgs[2]["reasoning_content"] not in tok.decode(second.input_ids)


def test_dry_run_plan_says_which_mode_each_dataset_got_and_why(tmp_path, capsys):
    from finetune import cli

    rows = [{"messages": conversation(lang)} for lang in ("en", "zh")]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    base = [
        "train",
        str(REPO / "recipes" / "tiny" / "sft_lora.yaml"),
        "--dry-run",
        f"data.train={data}",
        "data.eval_ratio=0",
        f"output.dir={tmp_path / 'out'}",
    ]
    assert cli.main([*base, f"model.chat_template={TEMPLATES / 'Qwen-Qwen3-0.6B.jinja'}"]) == 0
    plan = capsys.readouterr().out
    assert f"{data}: 4 sequences from 2 records, every assistant turn trained (data.train_on=all_turns)" in plan
    assert "first case: record 0: assistant turn 2 renders differently once later turns follow it" in plan
    assert (
        cli.main([*base, f"model.chat_template={TEMPLATES / 'Qwen-Qwen3-0.6B.jinja'}", "data.train_on=last_turn"]) == 0
    )
    assert (
        "one sequence per record, the last assistant turn of each record trained on its inference prompt"
        in capsys.readouterr().out
    )
    assert cli.main([*base, f"model.chat_template={TEMPLATES / 'google-gemma-2-2b-it.jinja'}"]) == 0
    assert (
        "system prompt folded into the first user turn (the chat template cannot render this conversation: "
        "TemplateError: System role not supported)" in capsys.readouterr().out
    )
