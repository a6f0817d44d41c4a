"""Data at scale: a bad row deep in a big file is named before anything is written; skipped bad
rows are counted, never silent; a streamed dataset trains and stops at train.max_steps."""

from __future__ import annotations

import json

import pytest
import yaml
from _support import memo_recipe, write_jsonl

from finetune import cli, config, data, loading
from finetune.config import DataSection
from finetune.data import cache
from finetune.errors import RecipeError

BAD_LINE = 150_001


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_DATA_CACHE", str(tmp_path / "data-cache"))
    return tmp_path / "data-cache"


def test_a_bad_row_deep_in_a_big_file_is_named_before_any_output(tmp_path, cache_dir, tiny_path, capsys):
    path = tmp_path / "big.jsonl"
    good = '{"instruction": "Say %d.", "input": "", "output": "%d"}\n'
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(good % (i, i) for i in range(1, BAD_LINE))
        f.write('{"instruction": "Say nothing.", "input": ""}\n')  # no output field
        f.writelines(good % (i, i) for i in range(BAD_LINE + 1, 200_001))
    recipe = tmp_path / "recipe.yaml"
    text = yaml.safe_load(memo_recipe(tmp_path, steps=2))
    text["model"]["name_or_path"] = tiny_path
    text["data"] = {"train": str(path), "format": "alpaca"}
    recipe.write_text(yaml.safe_dump(text))
    assert cli.main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"finetune: error: {path}:{BAD_LINE}: field 'output': missing"
    assert not (tmp_path / "out").exists()
    assert cache.entries() == []  # no cache entry either


def test_skipped_bad_rows_are_counted_and_named(tmp_path, cache_dir, tiny_tokenizer):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(10)]
    rows[3] = {"instruction": "Say 3.", "input": ""}
    rows[7] = {"instruction": "Say 7.", "input": "", "output": 7}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataSection(train=str(path), format="alpaca")
    with pytest.raises(data.DataError, match=f"{path}:4: field 'output': missing"):
        data.load(cfg, tiny_tokenizer, 64)
    cfg.skip_bad_rows = True
    prepared = data.load(cfg, tiny_tokenizer, 64)
    assert (prepared.train.n_records, len(prepared.train.encoded)) == (8, 8)
    assert prepared.notes == [
        (
            f"{path}: 2 bad records skipped (data.skip_bad_rows), first: "
            f"{path}:4: field 'output': missing; {path}:8: field 'output': expected a string, got int"
        )
    ]


def test_streaming_needs_max_steps(tmp_path):
    text = yaml.safe_load(memo_recipe(tmp_path, steps=2))
    text["data"]["streaming"] = True
    text["train"]["max_steps"] = -1
    text["train"]["num_train_epochs"] = 1
    with pytest.raises(RecipeError, match=r"data\.streaming: a stream has no known length; set train\.max_steps"):
        config.load(text=yaml.safe_dump(text))


def test_streamed_data_trains_and_stops_at_max_steps(tmp_path, cache_dir, tiny_path):
    from finetune.stages import sft

    text = yaml.safe_load(memo_recipe(tmp_path, steps=5))
    text["model"]["name_or_path"] = tiny_path
    text["data"]["streaming"] = True
    text["train"]["per_device_train_batch_size"] = 3  # 4 chats: the stream is re-read for later steps
    recipe = config.load(text=yaml.safe_dump(text))
    prepared = data.load(recipe.data, loading.load_tokenizer(recipe.model), recipe.train["max_length"])
    first = next(iter(prepared.train.dataset()))
    assert (
        first["input_ids"] == prepared.train.encoded[0].input_ids
        and first["labels"] == prepared.train.encoded[0].labels
    )
    out = sft.run(recipe)
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 5 and len(losses) == 5
    assert losses[-1] < losses[0]
    assert cache.entries() == []  # a stream is not cached


def test_a_chat_ending_after_its_last_answer_trains_nothing_from_that_turn_and_the_plan_says_so(
    tmp_path, cache_dir, tiny_tokenizer
):
    chats = [
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And?"},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": m} for m in chats])
    prepared = data.load(DataSection(train=str(path), format="messages"), tiny_tokenizer, 256)
    first, second = prepared.train.encoded
    assert (first.input_ids, first.labels) == (second.input_ids, second.labels)  # the trailing turn left out
    assert any(f"1 conversation ends with a turn after the last answer (first: {path}:1)" in n for n in prepared.notes)
