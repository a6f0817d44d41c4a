"""Data a user brings (issues 20.5 and 22.5-7): huge records, malformed lines, non-UTF-8 files, bad
reasoning tags, OpenAI's `weight`, LLaMA-Factory's dataset_info.json, and `data preview RECIPE`."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
from itertools import groupby
from pathlib import Path

import pytest
import yaml

from finetune import cli, data
from finetune.config import DataSection
from finetune.data import formats, sources
from finetune.data.encode import IGNORE, EncodeOptions, encode, encode_many
from finetune.data.sources import Record
from finetune.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_runs(tok, enc) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    out = []
    for trained, run in groupby(zip(enc.input_ids, enc.labels), key=lambda p: p[1] != IGNORE):
        if trained:
            out.append(tok.decode([t for t, _ in run]))
    return out


def chat(*turns, **extra) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {
        "messages": [
            {"role": r, "content": t} if isinstance(t, str) else {"role": r, **t} for r, t in zip(roles, turns)
        ],
        **extra,
    }


# ----------------------------------------------------------------------------- huge records (20.5)

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from finetune import data
    from finetune.config import DataSection

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    path = Path(sys.argv[2])
    big = "The quick brown fox jumps over the lazy dog. 狐狸跳过了懒狗。 " * (20 * 1024 * 1024 // 60)
    rows = [
        {"messages": [{"role": "user", "content": "Summarise:\\n" + big}, {"role": "assistant", "content": "A fox."}]},
        {"messages": [{"role": "user", "content": "Write a lot."}, {"role": "assistant", "content": big}]},
    ]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\\n" for row in rows), encoding="utf-8")
    del big, rows
    data.load(DataSection(train="tiny-warmup.jsonl", cache="off"), tok, 64)  # imports and first-use costs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepared = data.load(DataSection(train=str(path), cache="off"), tok, 64)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = prepared.train.stats()
    print(json.dumps({"growth_mb": (after - before) / 1024, "size_mb": path.stat().st_size / 2**20, **s}))
    """
)


def test_a_20_mb_record_costs_memory_bounded_by_max_length(tmp_path, tiny_path):
    """Before: the record was tokenized whole and then truncated (5 MB: 3.2 GB peak, 42 s)."""
    write_jsonl(tmp_path / "tiny-warmup.jsonl", [chat("Hi", "Hello.")])
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, str(script), tiny_path, str(tmp_path / "huge.jsonl")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["size_mb"] > 38  # two records of 20 MB (Chinese is 3 bytes a character)
    assert (result["records"], result["examples"], result["dropped"]) == (2, 1, 1)  # the first has no answer left
    assert result["truncated"] == 2 and result["length_max"] == 64
    assert result["growth_mb"] < 400, result  # the record's own bytes, a few times; not its tokens


def _examples():
    long = "Lorem ipsum dolor sit amet, 天地玄黄，宇宙洪荒。 " * 3000  # ~100k characters
    return [
        chat("Summarise:\n" + long, "Short."),
        chat("Hi", long),
        chat("Hi", "Hello.", "Write a lot.", long, "Thanks", "You are welcome."),
        chat({"content": "Think first."}, {"content": "Done.", "reasoning_content": long}),
        {"text": long},
        {"prompt": long, "completion": "x"},
        {"prompt": "Q: ", "completion": long},
    ]


@pytest.mark.parametrize("train_on", ["all_turns", "last_turn"])
def test_cutting_a_huge_record_before_tokenizing_gives_the_same_sequences(tiny_tokenizer, train_on):
    options = EncodeOptions(train_on=train_on)
    examples = _examples()
    cut = encode_many(tiny_tokenizer, examples, 64, options=options)
    whole = encode_many(tiny_tokenizer, examples, None, options=options)
    for n, (a, b) in enumerate(zip(cut, whole)):
        b = [e for e in b if e.n_trained]  # as training keeps them: a sequence with nothing trained is dropped
        a = [e for e in a if e.n_trained]
        assert [e.input_ids for e in a] == [e.input_ids[:64] for e in b][: len(a)], n
        assert [e.labels for e in a] == [e.labels[:64] for e in b][: len(a)], n
        assert all(e.truncated for e in a if len(e.input_ids) == 64)


# ----------------------------------------------------------------------------- skip_bad_rows (20.5)


def _with_bad_lines(tmp_path: Path) -> Path:
    good = [json.dumps(chat(f"Question {i}?", f"Answer {i}.")) for i in range(4)]
    lines = [good[0], '{"messages": [{"role": "user", "content": "cut off', good[1], "[1, 2]", good[2], good[3]]
    path = tmp_path / "bad_lines.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_json_lines_stop_the_run_unless_skip_bad_rows(tmp_path, tiny_tokenizer):
    path = _with_bad_lines(tmp_path)
    with pytest.raises(DataError, match=r"bad_lines.jsonl:2: malformed JSON"):
        data.load(DataSection(train=str(path), cache="off"), tiny_tokenizer, 64)
    prepared = data.load(DataSection(train=str(path), cache="off", skip_bad_rows=True), tiny_tokenizer, 64)
    assert prepared.train.n_records == 4
    [note] = [n for n in prepared.notes if "skip_bad_rows" in n]
    assert "2 bad records skipped" in note and "bad_lines.jsonl:2: malformed JSON" in note
    assert "bad_lines.jsonl:4: expected a JSON object, got list" in note


def test_skip_bad_rows_works_when_streaming_and_counts(tmp_path, tiny_tokenizer, caplog):
    path = _with_bad_lines(tmp_path)
    cfg = DataSection(train=str(path), streaming=True, skip_bad_rows=True)
    # the CLI stops the finetune logger propagating (an earlier in-process CLI test may have run): listen on it
    finetune_log = logging.getLogger("finetune")
    finetune_log.addHandler(caplog.handler)
    prepared = data.load(cfg, tiny_tokenizer, 64)
    assert prepared.train.n_records == 4
    assert any("2 bad records skipped among the first 6" in n for n in prepared.notes), prepared.notes
    rows = [row for _, row in zip(range(8), prepared.train.dataset())]  # the stream repeats: twice through
    answers = [
        tiny_tokenizer.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE]) for r in rows
    ]
    assert [a.replace("</s>", "").strip() for a in answers] == [f"Answer {i}." for i in range(4)] * 2
    finetune_log.removeHandler(caplog.handler)
    assert "bad_lines.jsonl:2: malformed JSON" in caplog.text  # the stream names what it skipped
    with pytest.raises(DataError, match=r"bad_lines.jsonl:2: malformed JSON"):
        data.load(DataSection(train=str(path), streaming=True), tiny_tokenizer, 64)


# ----------------------------------------------------------------------------- encoding hints (20.5)


def _decode_error(path: Path) -> str:
    with pytest.raises(DataError) as e:
        list(sources.iter_records(sources.Source("x", path=path)))
    return str(e.value)


def test_a_latin1_file_gets_no_unproven_encoding_hint(tmp_path):
    """Before: "it looks like cp1250", which reads "naïve" as "naďve"."""
    path = tmp_path / "latin1.jsonl"
    text = '{"instruction": "Define naïve.", "output": "Showing a lack of experience: naïve."}\n'
    path.write_bytes(text.encode("latin-1"))
    message = _decode_error(path)
    assert "looks like" not in message and "data.encoding=" not in message
    assert "'naïve' in cp1252" in message and "'naďve' in cp1250" in message
    rows = list(sources.iter_records(sources.Source("x", path=path), encoding="cp1252"))  # the reading it offers
    assert rows[0].data["instruction"] == "Define naïve."


@pytest.mark.parametrize(
    "encoding, text, hint",
    [
        ("gbk", "instruction,output\n你好吗,我很好，谢谢。\n", "data.encoding=gb18030"),
        ("big5", "instruction,output\n這是繁體中文的句子,我們用它來測試編碼。\n", "data.encoding=big5"),
    ],
)
def test_a_proven_encoding_is_named_and_the_hint_reads_the_file(tmp_path, encoding, text, hint):
    path = tmp_path / "cjk.csv"
    path.write_bytes(text.encode(encoding))
    message = _decode_error(path)
    assert hint in message
    rows = list(sources.iter_records(sources.Source("x", path=path), encoding=hint.split("=")[1]))
    assert rows[0].data == dict(zip(*[line.split(",") for line in text.strip().splitlines()]))


# ----------------------------------------------------------------------------- reasoning tags (20.5)


def _convert(row: dict, fmt: str = "messages") -> dict:
    return formats.convert([Record(row, "r.jsonl:7")], fmt, {})[0]


@pytest.mark.parametrize(
    "turn, expect",
    [
        ({"content": "<think>a <think>b</think> c</think>Answer."}, "turn 1: a nested <think> in the reasoning"),
        ({"content": "<think>I never close my reasoning. Answer."}, "turn 1: an unclosed <think> (no </think>)"),
        ({"content": "<think>ok</think>Answer.</think>"}, "turn 1: a stray </think> in the answer"),
        ({"content": "Answer. <think>late</think>"}, "turn 1: a stray <think> in the answer"),
        (
            {"content": "<think>inline</think>Answer.", "reasoning_content": "keyed"},
            "turn 1: reasoning given twice: a reasoning key and an inline <think> block",
        ),
        (
            {"content": "Answer.", "reasoning_content": "<think>keyed</think>"},
            "turn 1: a nested <think> in the reasoning",
        ),
    ],
)
def test_nested_unclosed_or_doubled_reasoning_is_one_line_naming_record_and_turn(turn, expect):
    with pytest.raises(DataError) as e:
        _convert(chat("Q?", turn))
    assert str(e.value).startswith("r.jsonl:7: field 'messages': " + expect), str(e.value)


def test_one_leading_think_block_is_still_reasoning():
    example = _convert(chat("Q?", {"content": "<think>\nstep 1\n</think>\n\nAnswer."}))
    assert example["messages"][1] == {"role": "assistant", "content": "Answer.", "reasoning_content": "step 1"}


def test_bad_reasoning_through_train_is_one_line_exit_2(tmp_path, capsys):
    rows = [chat("Q?", {"content": "<think>unclosed answer"})]
    train = write_jsonl(tmp_path / "r.jsonl", rows)
    recipe = _recipe(tmp_path, train=str(train))
    assert cli.main(["train", str(recipe), "train.max_steps=1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "r.jsonl:1: field 'messages': turn 1: an unclosed <think>" in err[0], err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- OpenAI weight (22.5)

WEIGHTED = chat(
    "What is 2+2?",
    {"content": "5.", "weight": 0},
    "That is wrong. What is 2+2?",
    {"content": "4.", "weight": 1},
    "And 3+3?",
    "6.",
)


def test_weight_0_turns_are_context_only_and_the_others_are_trained(tiny_tokenizer):
    example = _convert(copy.deepcopy(WEIGHTED))
    [enc] = encode(tiny_tokenizer, example)
    assert trained_runs(tiny_tokenizer, enc) == ["4.</s>", "6.</s>"]
    assert "5." in tiny_tokenizer.decode(enc.input_ids)  # still in the context
    last = encode(tiny_tokenizer, _convert(copy.deepcopy(WEIGHTED)), options=EncodeOptions(train_on="last_turn"))
    assert [trained_runs(tiny_tokenizer, e) for e in last] == [["6.</s>"]]
    only_weighted = chat("Q?", {"content": "Skip me.", "weight": 0}, "Again?", "Train me.")
    assert [trained_runs(tiny_tokenizer, e) for e in encode(tiny_tokenizer, _convert(only_weighted))] == [
        ["Train me.</s>"]
    ]


@pytest.mark.parametrize(
    "row, expect",
    [
        (chat("Q?", {"content": "A.", "weight": 2}), "turn 1: 'weight' must be 0 (not trained) or 1 (trained), got 2"),
        (chat("Q?", {"content": "A.", "weight": True}), "turn 1: 'weight' must be 0"),
        (chat({"content": "Q?", "weight": 1}, "A."), "turn 0: 'weight' on a user turn"),
        (chat("Q?", {"content": "A.", "weight": 0}), "every assistant turn has weight 0 (nothing to learn)"),
    ],
)
def test_bad_weights_are_one_line(row, expect):
    with pytest.raises(
        DataError, match="r.jsonl:7: field 'messages': " + expect.replace("(", r"\(").replace(")", r"\)")
    ):
        _convert(row)


def test_weight_in_the_plan_token_counts_and_in_preview(tmp_path, tiny_tokenizer, capsys):
    path = write_jsonl(tmp_path / "weighted.jsonl", [WEIGHTED])
    stats = data.load(DataSection(train=str(path), cache="off"), tiny_tokenizer, None).train.stats()
    [enc] = encode(tiny_tokenizer, _convert(copy.deepcopy(WEIGHTED)))
    assert (
        stats["trained_tokens"]
        == enc.n_trained
        == len(tiny_tokenizer("4.</s>6.</s>", add_special_tokens=False)["input_ids"])
    )
    recipe = _recipe(tmp_path, train=str(path))
    assert cli.main(["data", "preview", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"{enc.n_trained} trained" in out and "[[4.</s>]]" in out and "[[6.</s>]]" in out and "[[5." not in out
    assert cli.main(["train", str(recipe), "--dry-run"]) == 0
    assert f"{enc.n_trained} of {len(enc.input_ids)} tokens trained" in capsys.readouterr().out


# ----------------------------------------------------------------------------- LLaMA-Factory dataset_info (22.6)

# Entries as LLaMA-Factory's data/README.md and data/dataset_info.json write them.
DATASET_INFO = {
    "alpaca_demo": {
        "file_name": "alpaca.json",
        "columns": {
            "prompt": "instruction",
            "query": "input",
            "response": "output",
            "system": "system",
            "history": "history",
        },
    },
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    "openai_demo": {
        "file_name": "sub/openai.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    },
    "glaive_toolcall_demo": {
        "file_name": "glaive_toolcall.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    },
    "dpo_alpaca_demo": {
        "file_name": "dpo_alpaca.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
    },
    "dpo_sharegpt_demo": {
        "file_name": "dpo_sharegpt.json",
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
    "kto_alpaca_demo": {
        "file_name": "kto_alpaca.json",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"},
    },
    "kto_en_demo": {
        "file_name": "kto_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
}
GLAIVE_TOOLS = json.dumps(
    [
        {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
)
LF_FILES = {
    "alpaca.json": [
        {
            "instruction": "Translate",
            "input": "Good morning",
            "output": "早上好",
            "system": "Be brief.",
            "history": [["Hi", "Hello."]],
        }
    ],
    "c4_demo.jsonl": [{"text": "A document for pre-training."}],
    "sub/openai.json": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ]
        }
    ],
    "glaive_toolcall.json": [
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                {"from": "observation", "value": '{"sky": "sunny"}'},
                {"from": "gpt", "value": "Sunny in Paris."},
            ],
            "tools": GLAIVE_TOOLS,
        }
    ],
    "dpo_alpaca.json": [{"instruction": "2+2?", "input": "", "chosen": "4.", "rejected": "5."}],
    "dpo_sharegpt.json": [
        {
            "conversations": [{"from": "human", "value": "2+2?"}],
            "chosen": {"from": "gpt", "value": "4."},
            "rejected": {"from": "gpt", "value": "5."},
        }
    ],
    "kto_alpaca.json": [{"instruction": "2+2?", "input": "Be exact.", "output": "4.", "kto_tag": True}],
    "kto_en_demo.json": [
        {"messages": [{"content": "2+2?", "role": "user"}, {"content": "5.", "role": "assistant"}], "label": False}
    ],
}
LF_EXPECTED = {
    "alpaca_demo": (
        "alpaca",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Translate\nGood morning"},
                {"role": "assistant", "content": "早上好"},
            ]
        },
    ),
    "c4_demo": ("text", {"text": "A document for pre-training."}),
    "openai_demo": ("sharegpt", {"messages": LF_FILES["sub/openai.json"][0]["messages"]}),
    "glaive_toolcall_demo": (
        "sharegpt",
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                            "id": "call00001",
                        }
                    ],
                },
                {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": "call00001", "name": "get_weather"},
                {"role": "assistant", "content": "Sunny in Paris."},
            ],
            "tools": [{"type": "function", "function": json.loads(GLAIVE_TOOLS)[0]}],
        },
    ),
    "dpo_alpaca_demo": (
        "alpaca_preference",
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4."}],
            "rejected": [{"role": "assistant", "content": "5."}],
        },
    ),
    "dpo_sharegpt_demo": (
        "sharegpt_preference",
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4."}],
            "rejected": [{"role": "assistant", "content": "5."}],
        },
    ),
    "kto_alpaca_demo": (
        "kto",
        {
            "prompt": [{"role": "user", "content": "2+2?\nBe exact."}],
            "completion": [{"role": "assistant", "content": "4."}],
            "label": True,
        },
    ),
    "kto_en_demo": (
        "kto",
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "completion": [{"role": "assistant", "content": "5."}],
            "label": False,
        },
    ),
}


@pytest.fixture
def lf_dir(tmp_path) -> Path:
    d = tmp_path / "lf_data"
    for name, rows in LF_FILES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            write_jsonl(d / name, rows)
        else:
            (d / name).write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    (d / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2), encoding="utf-8")
    return d


@pytest.mark.parametrize("name", list(DATASET_INFO))
def test_llamafactory_dataset_info_entries_read_as_llamafactory_reads_them(lf_dir, tmp_path, monkeypatch, name):
    """Before: `my_sharegpt.file_name: unknown key`. Paths are relative to the dataset_info.json's folder."""
    monkeypatch.chdir(tmp_path)  # not the data folder
    cfg = DataSection(train=name, registry=str(lf_dir / "dataset_info.json"))
    examples, fmt, src = data.read_examples(name, cfg)
    assert (fmt, examples) == (LF_EXPECTED[name][0], [LF_EXPECTED[name][1]])
    assert src.path == (lf_dir / DATASET_INFO[name]["file_name"]).resolve()


def test_a_llamafactory_tools_entry_trains_the_calls_and_answers(lf_dir, tiny_tokenizer):
    template = yaml.safe_load((REPO / "recipes" / "tiny" / "sft_tools.yaml").read_text(encoding="utf-8"))["model"][
        "chat_template"
    ]
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = template
    cfg = DataSection(train="glaive_toolcall_demo", registry=str(lf_dir / "dataset_info.json"), cache="off")
    prepared = data.load(cfg, tok, None)
    [enc] = prepared.train.encoded
    assert trained_runs(tok, enc) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call></s>',
        "Sunny in Paris.</s>",
    ]


@pytest.mark.parametrize(
    "entry, expect",
    [
        ({"ms_hub_url": "AI-ModelScope/x"}, "bad.ms_hub_url: ModelScope datasets are not loaded"),
        ({"script_url": "my_script"}, "bad.script_url: dataset loading scripts are not run"),
        (
            {"file_name": "alpaca.json", "columns": {"images": "images"}},
            "bad.columns.images: multimodal data is not supported",
        ),
        (
            {"file_name": "alpaca.json", "num_samples": 10},
            "bad.num_samples: LLaMA-Factory samples randomly; use data.max_samples",
        ),
        (
            {"file_name": "alpaca.json", "formatting": "xml"},
            "bad.formatting: 'xml' is not one of alpaca, sharegpt, openai",
        ),
        ({"file_name": "alpaca.json", "colums": {}}, "bad.colums: unknown key; did you mean 'columns'?"),
        ({"file_name": "missing.json"}, "missing.json: file not found"),
        ({"file_name": "alpaca.json", "tags": {"role_tag": "role"}}, "bad.tags: tags are for sharegpt formatting"),
    ],
)
def test_what_we_cannot_load_from_dataset_info_is_one_line(lf_dir, entry, expect):
    info = json.loads((lf_dir / "dataset_info.json").read_text(encoding="utf-8"))
    (lf_dir / "dataset_info.json").write_text(json.dumps({**info, "bad": entry}), encoding="utf-8")
    with pytest.raises(DataError) as e:
        sources.locate("bad", registry=str(lf_dir / "dataset_info.json"))
    assert expect in str(e.value) and str(e.value).startswith(str(lf_dir / "dataset_info.json"))


def test_a_hf_hub_url_entry_is_a_hub_dataset(lf_dir):
    info = {"hub_demo": {"hf_hub_url": "llamafactory/demo", "ms_hub_url": "x/y", "split": "test"}}
    (lf_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    src = sources.locate("hub_demo", registry=str(lf_dir / "dataset_info.json"))
    assert (src.hub, src.split, src.format) == ("llamafactory/demo", "test", "alpaca")


# ----------------------------------------------------------------------------- data preview RECIPE (22.7)


def _recipe(d: Path, **data_keys) -> Path:
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": "tiny-llama"},
        "adapter": {"method": "lora"},
        "data": data_keys,
        "train": {"max_steps": 1, "bf16": False, "report_to": []},
        "output": {"dir": str(d / "out")},
    }
    path = d / "recipe.yaml"
    path.write_text(f"# finetune train {path}\n" + yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def _marked(out: str) -> list[str]:
    import re

    return re.findall(r"\[\[(.*?)\]\]", out.split("\n", 1)[1], re.S)


def test_preview_of_the_tools_recipe_uses_its_template_and_tools(capsys, tiny_path):
    assert cli.main(["data", "preview", str(REPO / "recipes" / "tiny" / "sft_tools.yaml"), "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "Tools: get_weather" in out  # the recipe's own template renders the record's tools
    assert _marked(out) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "北京"}}</tool_call></s>',
        "北京今天晴，10度。</s>",
    ]


def test_preview_of_a_gbk_csv_through_the_recipe_and_its_error_hint(tmp_path, capsys, tiny_path):
    csv_path = tmp_path / "zh.csv"
    csv_path.write_bytes("instruction,output\n你好吗,我很好，谢谢。\n".encode("gbk"))
    recipe = _recipe(tmp_path, train=str(csv_path))
    assert cli.main(["data", "preview", str(recipe)]) == 2
    err = capsys.readouterr().err
    hint = err.split("set ")[1].split(" ")[0]
    assert hint == "data.encoding=gb18030"
    assert cli.main(["data", "preview", str(recipe), hint]) == 0  # the hint works as preview's override
    assert _marked(capsys.readouterr().out) == ["我很好，谢谢。</s>"]
    assert cli.main(["data", "preview", str(csv_path), "--model", "tiny-llama", hint]) == 0  # and in the file form
    assert _marked(capsys.readouterr().out) == ["我很好，谢谢。</s>"]


def test_preview_of_a_column_mapped_csv_with_system_through_the_recipe(tmp_path, capsys, tiny_path):
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text(
        "question,answer\nWhat colour is the sky?,Blue.\nHow many legs has a cat?,Four.\n", encoding="utf-8"
    )
    recipe = _recipe(
        tmp_path,
        train=str(csv_path),
        format="alpaca",
        columns={"instruction": "question", "output": "answer"},
        system="Be brief.",
    )
    assert cli.main(["data", "preview", str(recipe), "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "<|system|>\nBe brief.\n<|user|>\nHow many legs has a cat?" in out and _marked(out) == ["Four.</s>"]
    assert cli.main(["data", "preview", str(recipe), "--index", "2"]) == 2
    assert "--index 2 is out of range (0..1)" in capsys.readouterr().err
    assert cli.main(["data", "preview", str(recipe), "--model", "other"]) == 2
    assert "--model: the recipe form takes its settings from the recipe; override them as model.name_or_path=" in (
        capsys.readouterr().err
    )


def test_preview_of_a_registry_recipe_with_weight_and_max_length(lf_dir, tmp_path, capsys, tiny_path):
    recipe = _recipe(tmp_path, train="openai_demo", registry=str(lf_dir / "dataset_info.json"))
    assert cli.main(["data", "preview", str(recipe), "train.max_length=12"]) == 0
    out = capsys.readouterr().out
    assert "12 tokens" in out and "(truncated)" in out


# ----------------------------------------------------------------------------- docs/data.md's examples (22.11)


def _doc_blocks(lang: str) -> list[str]:
    import re

    text = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    return [textwrap.dedent(b) for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


def test_the_data_docs_examples_work(tmp_path, tiny_tokenizer):
    chats, weighted = _doc_blocks("jsonl")
    path = tmp_path / "my_chats.jsonl"
    path.write_text(chats, encoding="utf-8")
    examples, fmt, _ = data.read_examples(str(path), DataSection(train=str(path)))
    assert fmt == "messages" and len(examples) == 2  # detected, no data.format
    [example] = [_convert(json.loads(weighted))]
    assert [trained_runs(tiny_tokenizer, e) for e in encode(tiny_tokenizer, example)] == [["4.</s>"]]

    recipe = yaml.safe_load(_doc_blocks("yaml")[0])
    from finetune import config

    assert config.load(text=yaml.safe_dump(recipe)).data.train == "data/my_chats.jsonl"

    [info] = [json.loads(b) for b in _doc_blocks("json")]
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    (tmp_path / "chats").mkdir()
    path.rename(tmp_path / "chats" / "openai.jsonl")
    sharegpt = {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        "system": "Be brief.",
    }
    (tmp_path / "my_sharegpt.json").write_text(json.dumps([sharegpt]), encoding="utf-8")
    for name in info:
        cfg = DataSection(train=name, registry=str(tmp_path / "dataset_info.json"))
        examples, fmt, _ = data.read_examples(name, cfg)
        assert fmt == "sharegpt" and examples[0]["messages"][-1]["role"] == "assistant"
