"""Reasoning and tool-call data: formats, labels, bad input (one line, exit 2, nothing written), and
the tiny recipes that teach a think-then-answer format and tool calls (greedy generations after
training follow them; before, they do not)."""

from __future__ import annotations

import copy
import json
import re
from itertools import groupby
from pathlib import Path

import pytest
import torch
import yaml

from finetune import cli, config
from finetune.data import formats
from finetune.data.encode import IGNORE, encode
from finetune.data.sources import Record

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
THINK = re.compile(r"^<think>\n[^<]+\n</think>\n\n[^<]+</s>$")
TOOL_CALL = re.compile(r"^<tool_call>(.*)</tool_call></s>$", re.DOTALL)


def canonical(fmt: str, row: dict, **kw) -> dict:
    [example] = formats.convert([Record(row, "r.jsonl:1")], fmt, {}, **kw)
    return example


def runs(tok, enc, trained: bool) -> list[str]:
    return [
        tok.decode([t for t, _ in g], skip_special_tokens=False)
        for is_trained, g in groupby(zip(enc.input_ids, enc.labels), key=lambda p: p[1] != IGNORE)
        if is_trained == trained
    ]


def demo_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- formats


def test_reasoning_keys_inline_think_and_columns_become_reasoning_content():
    expected = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."},
        ]
    }
    for turn in (
        {"reasoning_content": "Two and two.", "content": "4."},
        {"reasoning": "Two and two.", "content": "4."},
        {"thinking": "Two and two.", "content": "4."},
        {"content": "<think>\nTwo and two.\n</think>\n\n4."},
    ):
        row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", **turn}]}
        assert canonical("messages", row) == expected
    row = {
        "conversations": [
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4.", "reasoning": "Two and two."},
        ]
    }
    assert canonical("sharegpt", row) == expected
    row = {"instruction": "2+2?", "output": "4.", "reasoning": "Two and two."}
    assert canonical("alpaca", row) == expected
    row = {"instruction": "2+2?", "output": "<r>Two and two.</r>4."}  # data.reasoning_tags
    assert canonical("alpaca", row, reasoning_tags=("<r>", "</r>")) == expected


def test_llamafactory_tool_convention_equals_the_openai_form():
    openai_rows, sharegpt_rows = demo_rows("tools_demo.jsonl"), demo_rows("sharegpt_tools_demo.jsonl")
    a, b = canonical("messages", openai_rows[0]), canonical("sharegpt", sharegpt_rows[0])
    a["messages"][2]["content"] = b["messages"][2]["content"]  # the demo files' results differ in wording only
    assert a == b
    assert b["tools"][0] == {"type": "function", "function": json.loads(sharegpt_rows[0]["tools"])[0]}
    call = b["messages"][1]["tool_calls"][0]
    assert call == {
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        "id": "call00001",
    }
    assert b["messages"][2]["tool_call_id"] == "call00001" and b["messages"][2]["role"] == "tool"


def test_tool_calls_and_answers_are_trained_never_tool_results_or_the_tool_list(tiny_tokenizer):
    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "sft_tools.yaml").read_text(encoding="utf-8"))
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = recipe["model"]["chat_template"]
    for row in demo_rows("tools_demo.jsonl")[:2]:  # en, zh
        example = canonical("messages", row)
        [enc] = encode(tok, example)
        msgs = example["messages"]
        call = json.dumps(
            {"name": "get_weather", "arguments": msgs[1]["tool_calls"][0]["function"]["arguments"]}, ensure_ascii=False
        )
        assert runs(tok, enc, True) == [f"<tool_call>{call}</tool_call></s>", f"{msgs[3]['content']}</s>"]
        untrained = "".join(runs(tok, enc, False))
        assert (
            "Tools: get_weather" in untrained and f"<tool_response>{msgs[2]['content']}</tool_response>" in untrained
        )


# ----------------------------------------------------------------------------- bad input


def _bad_case(tmp_path: Path, rows: list[dict], **model) -> tuple[Path, Path]:
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": "tiny-llama", **model},
        "adapter": {"method": "lora"},
        "data": {"train": str(data), "format": "messages"},
        "train": {"max_steps": 1, "bf16": False, "report_to": []},
        "output": {"dir": str(out)},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path, out


GOOD = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
BAD = {
    "template raises": (
        [{"messages": GOOD + [{"role": "assistant", "content": "Sunny."}]}],
        {"chat_template": "{{ raise_exception('this model takes no ' + messages[0]['role'] + ' turns') }}"},
        "bad.jsonl:1: the chat template cannot render this conversation: "
        "TemplateError: this model takes no user turns",
    ),
    "invalid tool JSON": (
        [
            {
                "messages": GOOD
                + [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": '{"city": Paris}'}}],
                    }
                ]
            }
        ],
        {},
        "bad.jsonl:1: field 'messages': turn 1 tool call 0: tool call 'get_weather': arguments are not valid JSON",
    ),
    "tool result without a call": (
        [{"messages": GOOD + [{"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}],
        {},
        "bad.jsonl:1: field 'messages': turn 1: a tool result with no tool call before it",
    ),
    "reasoning on a user turn": (
        [{"messages": [{**GOOD[0], "reasoning_content": "hmm"}, {"role": "assistant", "content": "Sunny."}]}],
        {},
        "bad.jsonl:1: field 'messages': turn 0: reasoning on a user turn",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_reasoning_and_tool_data_is_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    rows, model, expect = BAD[case]
    recipe, out = _bad_case(tmp_path, rows, **model)
    assert cli.main(["train", str(recipe)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("finetune: error: ") and expect in err[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------- the tiny recipes learn


def _train(recipe_name: str, out: Path):
    from finetune.stages import sft

    return sft.run(config.load(REPO / "recipes" / "tiny" / recipe_name, [f"output.dir={out}"]))


def _greedy(model, tok, chats, tools=None) -> list[str]:
    answers = []
    for chat in chats:
        enc = tok.apply_chat_template(
            chat, tools=tools, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=80, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=False))
    return answers


@pytest.fixture(scope="module")
def base_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path).eval()


def test_reasoning_recipe_teaches_think_then_answer(tmp_path_factory, base_model, tiny_tokenizer):
    from finetune.loading import load_for_inference

    seen = {m["content"] for r in demo_rows("reasoning_demo.jsonl") for m in r["messages"] if m["role"] == "user"}
    held_out = ["What is 8 plus 9?", "What is 4 plus 5?", "7加9等于多少？", "6加2等于多少？"]
    assert not seen & set(held_out)
    chats = [[{"role": "user", "content": q}] for q in held_out]
    before = _greedy(base_model, tiny_tokenizer, chats)
    assert not any(THINK.match(a) for a in before), before
    model, tok, _ = load_for_inference(_train("sft_reasoning.yaml", tmp_path_factory.mktemp("reasoning") / "out"))
    after = _greedy(model.eval(), tok, chats)
    assert all(THINK.match(a) for a in after), after
    # `finetune chat` keeps the reasoning apart in its history, as the training data has it
    from finetune.chat import Chat

    chat = Chat(model, tok)
    reply = chat.answer(held_out[0])
    assert THINK.match(reply + "</s>") and chat.history[-1]["reasoning_content"] in reply
    assert "<think>" not in chat.history[-1]["content"] and chat.history[-1]["content"] in reply


def test_tools_recipe_teaches_a_parseable_tool_call_for_a_held_out_request(
    tmp_path_factory, base_model, tiny_tokenizer
):
    from finetune.loading import load_for_inference

    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "sft_tools.yaml").read_text(encoding="utf-8"))
    tools = demo_rows("tools_demo.jsonl")[0]["tools"]
    seen = {m["content"] for r in demo_rows("tools_demo.jsonl") for m in r["messages"] if m["role"] == "user"}
    held_out = ["What is the weather in Seoul?", "长沙的天气怎么样？"]
    assert not seen & set(held_out)
    chats = [[{"role": "user", "content": q}] for q in held_out]
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = recipe["model"]["chat_template"]
    before = _greedy(base_model, tok, chats, tools)
    assert not any(TOOL_CALL.match(a) for a in before), before
    model, tok, _ = load_for_inference(_train("sft_tools.yaml", tmp_path_factory.mktemp("tools") / "out"))
    after = _greedy(model.eval(), tok, chats, tools)
    assert all(TOOL_CALL.match(a) for a in after), after
    for answer in after:
        call = json.loads(TOOL_CALL.match(answer).group(1))  # a parseable call: name and a JSON object of arguments
        assert call["name"] == "get_weather" and set(call["arguments"]) == {"city"}, answer
