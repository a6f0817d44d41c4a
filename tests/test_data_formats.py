"""Record formats -> canonical examples, every file reader, column mapping, the registry,
eval splits, max_samples, data.system and format guessing (finetune.data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from finetune import data
from finetune.config import STAGE_FORMATS, DataSection
from finetune.data import formats, sources
from finetune.data.encode import IGNORE
from finetune.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((REPO / "data" / "datasets.yaml").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- writers


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows, delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {
    "json": write_json,
    "jsonl": write_jsonl,
    "csv": write_csv,
    "tsv": lambda p, rows: write_csv(p, rows, "\t"),
    "parquet": write_parquet,
}


def examples(path: Path, fmt: str | None = None, **kw) -> list[dict]:
    out, _, _ = data.read_examples(str(path), DataSection(train=str(path), format=fmt, **kw))
    return out


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


# ----------------------------------------------------------------------------- alpaca

# Flat alpaca records (strings only), so every reader can hold them.
ALPACA_FLAT = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "把这句话翻译成英文。", "input": "你好", "output": "Hello"},
    {"instruction": "Say hi.", "input": "   ", "output": "Hi!"},  # whitespace-only input is no input
]
ALPACA_FLAT_EXPECTED = [
    {"messages": [u("Add 2 and 3."), a("5")]},
    {"messages": [u("Translate to French.\nGood morning"), a("Bonjour")]},
    {"messages": [u("把这句话翻译成英文。\n你好"), a("Hello")]},
    {"messages": [u("Say hi."), a("Hi!")]},
]


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_alpaca_through_every_reader(tmp_path, suffix):
    path = WRITERS[suffix](tmp_path / f"alpaca.{suffix}", ALPACA_FLAT)
    assert examples(path, "alpaca") == ALPACA_FLAT_EXPECTED
    assert examples(path) == ALPACA_FLAT_EXPECTED  # guessed from the columns


def test_alpaca_system_and_history(tmp_path):
    rows = [
        {
            "instruction": "And 3 + 3?",
            "input": "",
            "output": "6",
            "system": "You are a calculator.",
            "history": [["1 + 1?", "2"], ["2 + 2?", "4"]],
        },
        {
            "instruction": "它吃什么？",
            "input": "",
            "output": "老虎主要吃鹿。",
            "history": [["给我讲讲老虎。", "老虎是大猫。"]],
        },
        {"instruction": "Name a colour.", "input": "one word", "output": "Blue", "system": "Be brief."},
        {"instruction": "Hi", "output": "Hello", "system": "  ", "history": []},  # blank system, no history
    ]
    expected = [
        {"messages": [s("You are a calculator."), u("1 + 1?"), a("2"), u("2 + 2?"), a("4"), u("And 3 + 3?"), a("6")]},
        {"messages": [u("给我讲讲老虎。"), a("老虎是大猫。"), u("它吃什么？"), a("老虎主要吃鹿。")]},
        {"messages": [s("Be brief."), u("Name a colour.\none word"), a("Blue")]},
        {"messages": [u("Hi"), a("Hello")]},
    ]
    assert examples(write_json(tmp_path / "a.json", rows), "alpaca") == expected
    # Parquet holds the nested history (and nulls for the absent fields) too.
    assert examples(write_parquet(tmp_path / "a.parquet", rows), "alpaca") == expected


def test_json_object_holding_the_records_and_jsonl_in_a_json_file(tmp_path):
    wrapped = write_json(tmp_path / "wrapped.json", {"version": 1, "data": ALPACA_FLAT})
    assert examples(wrapped, "alpaca") == ALPACA_FLAT_EXPECTED
    lines = write_jsonl(tmp_path / "lines.json", ALPACA_FLAT)  # JSON Lines under a .json name
    assert examples(lines, "alpaca") == ALPACA_FLAT_EXPECTED


# ----------------------------------------------------------------------------- sharegpt


def test_sharegpt_system_turn_and_multi_turn(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "你是助手。"},
                {"from": "human", "value": "你好"},
                {"from": "gpt", "value": "你好！"},
                {"from": "human", "value": "再见"},
                {"from": "gpt", "value": "再见！"},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "Q1"},
                {"from": "gpt", "value": "A1"},
                {"from": "user", "value": "Q2"},
                {"from": "assistant", "value": "A2"},
                {"from": "human", "value": "Q3"},
                {"from": "gpt", "value": "A3"},
            ]
        },
        # a `system` field becomes the first turn ...
        {"system": "Be kind.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        # ... but never a second system turn when the conversation has one
        {
            "system": "Ignored.",
            "conversations": [
                {"from": "system", "value": "Kept."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Yo"},
            ],
        },
    ]
    expected = [
        {"messages": [s("你是助手。"), u("你好"), a("你好！"), u("再见"), a("再见！")]},
        {"messages": [u("Q1"), a("A1"), u("Q2"), a("A2"), u("Q3"), a("A3")]},
        {"messages": [s("Be kind."), u("Hi"), a("Hello")]},
        {"messages": [s("Kept."), u("Hi"), a("Yo")]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert examples(path, "sharegpt") == expected
    assert examples(path) == expected  # guessed


# ----------------------------------------------------------------------------- messages


def test_messages(tmp_path):
    rows = [
        {"messages": [s("You are terse."), u("2+2?"), a("4")]},
        {"messages": [u("Hi"), a("Hello"), u("列出三种水果。"), a("苹果、香蕉和梨。")]},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    assert examples(path, "messages") == rows
    assert examples(path) == rows
    assert examples(write_parquet(tmp_path / "m.parquet", rows), "messages") == rows


# ----------------------------------------------------------------------------- prompt/completion


def test_prompt_completion_strings(tmp_path):
    rows = [
        {"prompt": "Q: What is the capital of Japan?\nA:", "completion": " Tokyo."},
        {"prompt": "", "completion": "A sentence with no prompt."},  # an empty prompt is allowed
        {"prompt": "天空是", "completion": "蓝色的。"},
    ]
    for writer, name in ((write_jsonl, "pc.jsonl"), (write_csv, "pc.csv")):
        path = writer(tmp_path / name, rows)
        assert examples(path, "prompt_completion") == rows
        assert examples(path) == rows


def test_prompt_completion_conversational(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
        },
        {
            "prompt": [
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"},
            ],
            "completion": [{"role": "assistant", "content": "A2"}],
        },
    ]
    expected = [
        {"messages": [s("Be brief."), u("Hi"), a("Hello")]},
        {"messages": [u("Q1"), a("A1"), u("Q2"), a("A2")]},
    ]
    assert examples(write_json(tmp_path / "pc.json", rows), "prompt_completion") == expected
    assert examples(write_jsonl(tmp_path / "pc.jsonl", rows)) == expected


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_text(tmp_path, suffix):
    rows = [
        {"text": "The sun is a star."},
        {"text": "运动对身体很有好处。"},
        {"text": "Line one.\nLine two, with a comma."},
    ]
    path = WRITERS[suffix](tmp_path / f"t.{suffix}", rows)
    assert examples(path, "text") == rows
    assert examples(path) == rows


# ----------------------------------------------------------------------------- column mapping


def test_columns_map_alpaca_fields(tmp_path):
    rows = [
        {"question": "Add 2 and 3.", "context": "", "answer": "5", "persona": "Be exact."},
        {"question": "Translate.", "context": "Good morning", "answer": "Bonjour", "persona": ""},
    ]
    path = write_csv(tmp_path / "qa.csv", rows)
    got = examples(
        path,
        "alpaca",
        columns={"instruction": "question", "input": "context", "output": "answer", "system": "persona"},
    )
    assert got == [
        {"messages": [s("Be exact."), u("Add 2 and 3."), a("5")]},
        {"messages": [u("Translate.\nGood morning"), a("Bonjour")]},
    ]


def test_columns_map_sharegpt_and_messages_fields(tmp_path):
    rows = [{"dialog": [{"speaker": "human", "text": "Hi"}, {"speaker": "gpt", "text": "Hello"}], "sys": "Be kind."}]
    path = write_jsonl(tmp_path / "sg.jsonl", rows)
    cols = {"conversations": "dialog", "from": "speaker", "value": "text", "system": "sys"}
    assert examples(path, "sharegpt", columns=cols) == [{"messages": [s("Be kind."), u("Hi"), a("Hello")]}]

    rows = [{"chat": [{"who": "user", "says": "Hi"}, {"who": "assistant", "says": "Hello"}]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    cols = {"messages": "chat", "role": "who", "content": "says"}
    assert examples(path, "messages", columns=cols) == [{"messages": [u("Hi"), a("Hello")]}]


def test_columns_error_names_the_mapped_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q", "reply": "A"}])
    with pytest.raises(DataError) as e:
        examples(path, "alpaca", columns={"instruction": "question", "output": "answer"})
    assert str(e.value) == f"{path}:1: field 'answer': missing"
    with pytest.raises(DataError, match=r"data\.columns: 'answer' is not a field of format alpaca"):
        examples(path, "alpaca", columns={"answer": "reply"})


def test_registry_columns_and_format_apply(tmp_path):
    rows = [{"q": "What is 1+1?", "a": "2"}]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    reg = tmp_path / "reg.yaml"
    reg.write_text(
        yaml.safe_dump(
            {
                "my_qa": {
                    "path": "qa.jsonl",
                    "format": "alpaca",
                    "language": "en",
                    "columns": {"instruction": "q", "output": "a"},
                }
            }
        ),
        encoding="utf-8",
    )
    got, fmt, src = data.read_examples("my_qa", DataSection(train="my_qa", registry=str(reg)))
    assert (fmt, src.language, src.path) == ("alpaca", "en", (tmp_path / "qa.jsonl").resolve())
    assert got == [{"messages": [u("What is 1+1?"), a("2")]}]


# ----------------------------------------------------------------------------- registry


def test_registry_names_resolve_to_the_shipped_files():
    local = {name: e for name, e in SHIPPED.items() if "path" in e}
    assert {
        "alpaca_en_demo",
        "alpaca_zh_demo",
        "sharegpt_demo",
        "messages_demo",
        "prompt_completion_demo",
        "text_demo",
    } <= set(local)
    for name, entry in local.items():
        src = sources.locate(name)
        assert src.path == (REPO / "data" / entry["path"]).resolve()
        assert (src.format, src.language) == (entry["format"], entry["language"])


def test_unknown_registry_name_suggests_the_closest():
    with pytest.raises(DataError) as e:
        sources.locate("alpaca_en_dem")
    assert "data.train: 'alpaca_en_dem' is not a file nor a dataset in" in str(e.value)
    assert "did you mean 'alpaca_en_demo'?" in str(e.value)


def _file_rows(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "name", sorted(n for n, e in SHIPPED.items() if "path" in e and e["format"] in STAGE_FORMATS["sft"])
)
def test_every_demo_set_loads(name, tiny_tokenizer):
    entry = SHIPPED[name]
    n_rows = len(_file_rows(REPO / "data" / entry["path"]))
    tok = tiny_tokenizer
    if name in ("tools_demo", "sharegpt_tools_demo"):  # the tiny template has no tool support: the recipe's has
        import copy

        tok = copy.deepcopy(tiny_tokenizer)
        recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "sft_tools.yaml").read_text(encoding="utf-8"))
        tok.chat_template = recipe["model"]["chat_template"]
    if name.startswith("vision_"):  # images: the tiny vision-language model's processor (tiny-llama's tokenizer)
        from finetune import loading
        from finetune.config import ModelSection

        tok = loading.load_processor(ModelSection(name_or_path="tiny-vlm"))
    prepared = data.load(DataSection(train=name), tok, max_length=1024)
    assert prepared.format == entry["format"]
    assert prepared.language == entry["language"]
    assert prepared.eval is None and prepared.notes == []
    split = prepared.train
    assert (split.n_records, len(split.encoded), split.n_truncated, split.n_dropped) == (n_rows, n_rows, 0, 0)
    for e in split.encoded:
        assert len(e.labels) == len(e.input_ids) > 0
        assert 0 < e.n_trained <= len(e.input_ids)
        assert all(label in (IGNORE, tid) for tid, label in zip(e.input_ids, e.labels))
        assert e.input_ids[-1] == tiny_tokenizer.eos_token_id and e.labels[-1] == tiny_tokenizer.eos_token_id
        if entry["format"] == "text":
            assert e.labels == e.input_ids
        else:
            assert e.labels[0] == IGNORE  # the prompt side is never trained


# ----------------------------------------------------------------------------- eval split, max_samples


def _numbered(n: int) -> list[dict]:
    return [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i}"} for i in range(n)]


def test_eval_split_by_ratio_sizes_and_disjoint(tmp_path, tiny_tokenizer):
    path = write_json(tmp_path / "n.json", _numbered(20))
    cfg = DataSection(train=str(path), eval_ratio=0.25)
    prepared = data.load(cfg, tiny_tokenizer, max_length=256, seed=7)
    full = data.load(DataSection(train=str(path)), tiny_tokenizer, max_length=256)
    train_ids = [tuple(e.input_ids) for e in prepared.train.encoded]
    eval_ids = [tuple(e.input_ids) for e in prepared.eval.encoded]
    assert (len(train_ids), len(eval_ids)) == (15, 5)
    assert (prepared.train.n_records, prepared.eval.n_records) == (15, 5)
    assert not set(train_ids) & set(eval_ids)
    assert sorted(train_ids + eval_ids) == sorted(tuple(e.input_ids) for e in full.train.encoded)
    # the same seed holds out the same examples; the split is not simply the last rows
    again = data.load(cfg, tiny_tokenizer, max_length=256, seed=7)
    assert [tuple(e.input_ids) for e in again.eval.encoded] == eval_ids
    assert eval_ids != [tuple(e.input_ids) for e in full.train.encoded[-5:]]
    # a tiny ratio still holds out one example
    assert len(data.load(DataSection(train=str(path), eval_ratio=0.01), tiny_tokenizer, 256).eval.encoded) == 1


def test_eval_split_leaving_nothing_to_train_is_an_error(tmp_path, tiny_tokenizer):
    path = write_json(tmp_path / "one.json", _numbered(1))
    with pytest.raises(DataError, match=r"data\.eval_ratio: 0\.5 of 1 examples leaves nothing to train on"):
        data.load(DataSection(train=str(path), eval_ratio=0.5), tiny_tokenizer, 256)


def test_eval_split_by_file(tmp_path, tiny_tokenizer):
    train = write_json(tmp_path / "train.json", _numbered(6))
    # the eval file has a different (guessed) format than train's
    held = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"messages": [u("Repeat the number 99."), a("99")]}, {"messages": [u("Repeat the number 98."), a("98")]}],
    )
    prepared = data.load(DataSection(train=str(train), eval=str(held), max_samples=3), tiny_tokenizer, 256)
    assert (len(prepared.train.encoded), len(prepared.eval.encoded)) == (3, 2)  # max_samples is train only
    assert prepared.eval.source == str(held)
    decoded = [tiny_tokenizer.decode(e.input_ids) for e in prepared.eval.encoded]
    assert decoded == [
        tiny_tokenizer.apply_chat_template([u(f"Repeat the number {n}."), a(f"{n}")], tokenize=False) for n in (99, 98)
    ]


def test_max_samples_takes_the_first_records(tmp_path):
    path = write_json(tmp_path / "n.json", _numbered(10))
    got = examples(path, "alpaca", max_samples=4)
    assert got == [{"messages": [u(f"Repeat the number {i}."), a(f"{i}")]} for i in range(4)]
    assert len(examples(path, "alpaca", max_samples=100)) == 10


# ----------------------------------------------------------------------------- data.system


def test_data_system_is_the_default_system_prompt(tmp_path):
    rows = [{"messages": [u("Hi"), a("Hello")]}, {"messages": [s("Own prompt."), u("Hi"), a("Hello")]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    assert examples(path, system="Default prompt.") == [
        {"messages": [s("Default prompt."), u("Hi"), a("Hello")]},
        {"messages": [s("Own prompt."), u("Hi"), a("Hello")]},  # an existing system message wins
    ]
    alpaca_path = write_json(tmp_path / "a.json", ALPACA_FLAT[:1])
    assert examples(alpaca_path, system="你是助手。") == [{"messages": [s("你是助手。"), u("Add 2 and 3."), a("5")]}]
    # completion and text examples have no system message to add
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q:", "completion": " A"}])
    assert examples(pc, system="Default prompt.") == [{"prompt": "Q:", "completion": " A"}]
    txt = write_jsonl(tmp_path / "t.jsonl", [{"text": "Plain."}])
    assert examples(txt, system="Default prompt.") == [{"text": "Plain."}]


# ----------------------------------------------------------------------------- format guessing


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"instruction": "I", "input": "", "output": "O"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "sharegpt"),
        ({"messages": [u("Q"), a("A")]}, "messages"),
        ({"prompt": "P", "completion": "C"}, "prompt_completion"),
        ({"text": "T"}, "text"),
    ],
)
def test_format_is_guessed_for_a_plain_file(tmp_path, tiny_tokenizer, record, fmt):
    assert formats.guess_format(record) == fmt
    path = write_jsonl(tmp_path / "plain.jsonl", [record])
    prepared = data.load(DataSection(train=str(path)), tiny_tokenizer, 256)
    assert prepared.format == fmt
    assert len(prepared.train.encoded) == 1


def test_unguessable_format_names_the_record_and_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Q", "reply": "A"}])
    with pytest.raises(DataError) as e:
        examples(path)
    assert str(e.value) == f"{path}:1: cannot tell the format from its fields ['question', 'reply']; set data.format"


def test_declared_format_beats_the_registry_and_the_guess(tmp_path):
    # a record with both `text` and `prompt`/`completion`: the guess says prompt_completion ...
    path = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "P", "completion": "C", "text": "T"}])
    assert examples(path) == [{"prompt": "P", "completion": "C"}]
    # ... data.format decides
    assert examples(path, "text") == [{"text": "T"}]


def test_field_errors_name_the_record_in_every_reader(tmp_path):
    rows = [{"instruction": "Hi", "input": "", "output": "Hello"}, {"instruction": "Bye", "input": "", "output": None}]
    for suffix, where, problem in (
        ("json", "record 1", "missing"),
        ("jsonl", ":2", "missing"),
        ("parquet", "record 1", "missing"),
        ("csv", ":3", "empty"),
    ):
        path = WRITERS[suffix](tmp_path / f"bad.{suffix}", rows)
        with pytest.raises(DataError) as e:
            examples(path, "alpaca")
        sep = "" if where.startswith(":") else " "
        assert str(e.value) == f"{path}{sep}{where}: field 'output': {problem}", suffix


def test_hub_dataset_code_path_loads_a_local_dataset_dir(tmp_path, tiny_tokenizer):
    """Hub ids go through `datasets.load_dataset`; offline it is exercised with a local dir."""
    import json

    from finetune.config import DataSection
    from finetune.data import load, sources

    folder = tmp_path / "org_dataset"
    folder.mkdir()
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w}."} for w in ("one", "two", "three")]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = sources.locate(str(folder))
    assert src.hub == str(folder) and src.path is None
    prepared = load(DataSection(train=str(folder), format="alpaca"), tiny_tokenizer, max_length=64)
    assert prepared.train.n_records == 3
    assert "[train] record 2" in sources.read(src)[2].where
