"""Data at scale: a bad row deep in a big file is named before anything is written; skipped bad
rows are counted, never silent; a streamed dataset trains and stops at train.max_steps, is dealt
to the ranks of a DDP run without encoding a record twice, and resumes to the uninterrupted run."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml
from _support import ddp_train, logged_losses, memo_recipe, write_jsonl

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


def test_each_rank_encodes_only_its_own_records_of_a_stream(tmp_path, monkeypatch, tiny_tokenizer):
    """What accelerate does with the stream under 2 processes (its prepare_data_loader, run here for
    each rank): rank r gets records r, r + 2, ... (with an odd count, rank 0 gets one more), and then
    its share again, without end."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from finetune.data import encode as encode_module

    chats = [[{"role": "user", "content": f"Q{n}?"}, {"role": "assistant", "content": f"A{n}."}] for n in range(7)]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": m} for m in chats])
    cfg = DataSection(train=str(path), format="messages", streaming=True)
    expected = data.load(DataSection(train=str(path), format="messages", cache="off"), tiny_tokenizer, 64)
    monkeypatch.setenv("WORLD_SIZE", "2")
    prepared = data.load(cfg, tiny_tokenizer, 64)
    encoded_lines, real = [], encode_module.encode_many

    def spy(tok, examples, *args, where=None, **kw):
        encoded_lines.extend(where)
        return real(tok, examples, *args, where=where, **kw)

    monkeypatch.setattr(encode_module, "encode_many", spy)
    for rank in (0, 1):
        encoded_lines.clear()
        loader = DataLoader(prepared.train.dataset(), batch_size=2, collate_fn=list)
        shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        mine = list(range(rank, 7, 2))
        rows = [(r["input_ids"], r["labels"]) for batch in itertools.islice(shard, 4) for r in batch]
        assert rows == [(expected.train.encoded[n].input_ids, expected.train.encoded[n].labels) for n in mine * 3][:8]
        assert encoded_lines[: len(mine)] == [f"{path}:{n + 1}" for n in mine]  # then it reads its share again


def test_streamed_two_process_ddp_trains_to_max_steps(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(memo_recipe(tmp_path, "lora", steps=6))
    ddp = ddp_train(
        recipe,
        tmp_path,
        f"output.dir={tmp_path / 'ddp'}",
        "data.streaming=true",
        "train.per_device_train_batch_size=2",
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    losses = logged_losses(tmp_path / "ddp")
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_an_interrupted_streamed_run_resumes_to_the_same_losses(tmp_path, cache_dir, tiny_path):
    from test_resume import CrashAt

    from finetune.stages import sft

    def recipe(out):
        text = yaml.safe_load(memo_recipe(tmp_path, steps=6, output={"dir": str(out)}))
        text["model"]["name_or_path"] = tiny_path
        text["data"]["streaming"] = True
        text["adapter"]["dropout"] = 0.1
        # 4 chats in batches of 3: the stream's batches repeat every 2 steps, so a resume from step 3
        # that did not skip the 3 consumed batches would train step 4 on step 1's batch
        text["train"].update(save_steps=3, per_device_train_batch_size=3)
        return config.load(text=yaml.safe_dump(text))

    reference = sft.run(recipe(tmp_path / "reference"))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sft.run(recipe(out), callbacks=[CrashAt(5)])
    assert [p.name for p in out.with_name("resumed.incomplete").glob("checkpoint-*")] == ["checkpoint-3"]
    sft.run(recipe(out))
    expected, got = logged_losses(reference), logged_losses(out)
    assert len(got) == len(expected) == 6
    assert got == pytest.approx(expected, abs=1e-6)
