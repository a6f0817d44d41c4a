"""Preference, KTO and prompt record formats: every layout becomes TRL's conversational
examples; bad records are one-line errors naming file, record and field."""

from __future__ import annotations

import pytest
from _support import REPO, write_jsonl

from finetune import cli, config
from finetune.config import DataSection
from finetune.data import pairs
from finetune.data.formats import convert, guess_format
from finetune.data.sources import Record
from finetune.errors import DataError, RecipeError

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
PAIR = {"prompt": [U("Hi?")], "chosen": [A("Hello! Nice to meet you.")], "rejected": [A("Go away.")]}


def one(record: dict, fmt: str | None = None, **columns) -> dict:
    return convert([Record(record, "f.jsonl:7")], fmt or guess_format(record), columns)[0]


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"prompt": "Hi?", "chosen": "Hello! Nice to meet you.", "rejected": "Go away."}, "preference"),
        ({"prompt": [U("Hi?")], "chosen": [A("Hello! Nice to meet you.")], "rejected": [A("Go away.")]}, "preference"),
        ({"chosen": [U("Hi?"), A("Hello! Nice to meet you.")], "rejected": [U("Hi?"), A("Go away.")]}, "preference"),
        (
            {"instruction": "Hi?", "input": "", "chosen": "Hello! Nice to meet you.", "rejected": "Go away."},
            "alpaca_preference",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Hi?"}],
                "chosen": {"from": "gpt", "value": "Hello! Nice to meet you."},
                "rejected": {"from": "gpt", "value": "Go away."},
            },
            "sharegpt_preference",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Hi?"}],
                "chosen": "Hello! Nice to meet you.",
                "rejected": "Go away.",
            },
            "sharegpt_preference",
        ),
    ],
)
def test_every_pair_layout_gives_the_same_example(record, fmt):
    assert guess_format(record) == fmt
    assert one(record) == PAIR


def test_implicit_prompt_keeps_earlier_turns_and_system():
    chat = [{"role": "system", "content": "Be kind."}, U("2+2?"), A("4."), U("And 3+3?")]
    got = one({"chosen": chat + [A("Sure! 6.")], "rejected": chat + [A("7.")]})
    assert got == {"prompt": chat, "chosen": [A("Sure! 6.")], "rejected": [A("7.")]}


def test_alpaca_preference_builds_the_prompt_like_alpaca():
    got = one(
        {
            "instruction": "Add.",
            "input": "2+2",
            "system": "Be kind.",
            "history": [["Hi", "Hello"]],
            "chosen": "4",
            "rejected": "5",
        }
    )
    assert got["prompt"] == [{"role": "system", "content": "Be kind."}, U("Hi"), A("Hello"), U("Add.\n2+2")]


def test_columns_remap_preference_fields():
    got = one(
        {"question": "Hi?", "good": "Hello! Nice to meet you.", "bad": "Go away."},
        "preference",
        prompt="question",
        chosen="good",
        rejected="bad",
    )
    assert got == PAIR


def test_kto_labels_and_prompt_extras():
    assert one({"prompt": "Hi?", "completion": "Go away.", "label": "false"}, "kto") == {
        "prompt": [U("Hi?")],
        "completion": [A("Go away.")],
        "label": False,
    }  # CSV strings read as booleans
    assert one({"prompt": "2+2?", "answer": "4", "id": 3}, "prompt") == {"prompt": [U("2+2?")], "answer": "4", "id": 3}
    assert guess_format({"prompt": "2+2?", "answer": "4"}) == "prompt"
    assert guess_format({"prompt": "2+2?", "completion": "4"}) == "prompt_completion"


@pytest.mark.parametrize(
    "record, fmt, message",
    [
        ({"prompt": "Hi?", "rejected": "Go away."}, "preference", "field 'chosen': missing"),
        (
            {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
            "preference",
            "field 'rejected': identical to chosen",
        ),
        ({"chosen": [U("Hi?"), A("Same.")], "rejected": [U("Hi?"), A("Same.")]}, "preference", "identical to chosen"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "preference", "field 'prompt': empty prompt"),
        (
            {"prompt": [U("Hi?"), A("Hello")], "chosen": "a", "rejected": "b"},
            "preference",
            "must end with a user turn",
        ),
        ({"prompt": "Hi?", "chosen": "", "rejected": "b"}, "preference", "field 'chosen': empty answer"),
        ({"chosen": [U("Hi?"), A("a")], "rejected": [U("Yo?"), A("b")]}, "preference", "share no prompt"),
        ({"chosen": "a", "rejected": "b"}, "preference", "field 'prompt': missing"),
        ({"instruction": "", "chosen": "a", "rejected": "b"}, "alpaca_preference", "field 'instruction': empty"),
        ({"prompt": "Hi?", "completion": "Hello", "label": "maybe"}, "kto", "field 'label': expected true"),
    ],
)
def test_bad_records_name_the_record_and_field(record, fmt, message):
    with pytest.raises(DataError) as e:
        one(record, fmt)
    assert str(e.value).startswith("f.jsonl:7: field ") and message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "Hi?", "rejected": "Go away."}, "pairs.jsonl:3: field 'chosen': missing"),
        (
            {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."},
            "pairs.jsonl:3: field 'rejected': identical to chosen",
        ),
        ({"prompt": "", "chosen": "Hello.", "rejected": "Go away."}, "pairs.jsonl:3: field 'prompt': empty prompt"),
    ],
)
def test_cli_reports_a_bad_record_in_one_line_and_writes_nothing(tmp_path, capsys, tiny_path, bad, message):
    good = {"prompt": "Hi?", "chosen": "Hello! Nice to meet you.", "rejected": "Go away."}
    data = write_jsonl(tmp_path / "pairs.jsonl", [good, good | {"prompt": "Hey?"}, bad])
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(
        f"stage: dpo\nmodel: {{name_or_path: tiny-llama}}\ndata: {{train: {data}}}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    assert cli.main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("finetune: error: ") and f"/{message}" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.incomplete").exists()


def test_stage_and_format_must_fit():
    base = "model: {name_or_path: tiny-llama}\noutput: {dir: /tmp/never}\n"
    with pytest.raises(
        RecipeError, match="stage dpo takes preference, alpaca_preference, sharegpt_preference records, not alpaca"
    ):
        config.load(text="stage: dpo\ndata: {train: x.jsonl, format: alpaca}\n" + base)
    with pytest.raises(RecipeError, match="stage sft takes .* not preference"):
        config.load(text="stage: sft\ndata: {train: x.jsonl, format: preference}\n" + base)
    for stage, fmt in (
        ("kto", "preference"),
        ("kto", "kto"),
        ("rm", "sharegpt_preference"),
        ("simpo", "alpaca_preference"),
    ):
        config.load(text=f"stage: {stage}\ndata: {{train: x.jsonl, format: {fmt}}}\n" + base)


def test_registry_format_is_checked_against_the_stage(tiny_tokenizer):
    with pytest.raises(RecipeError, match="stage dpo takes .* not kto"):
        pairs.load(DataSection(train="kto_demo"), tiny_tokenizer, "dpo")


def test_kto_stage_unpairs_pairs_and_rl_stages_keep_prompts(tiny_tokenizer):
    cfg = DataSection(train="preference_en_demo", max_samples=10, eval_ratio=0.2)
    k = pairs.load(cfg, tiny_tokenizer, "kto")
    assert len(k.train.examples) == 16 and len(k.eval.examples) == 4  # held-out pairs stay whole, then unpair
    assert sum(e["label"] for e in k.train.examples) == 8
    p = pairs.load(cfg, tiny_tokenizer, "grpo")
    assert all(set(e) == {"prompt"} and e["prompt"][-1]["role"] == "user" for e in p.train.examples)
    stats = pairs.load(cfg, tiny_tokenizer, "dpo").train.stats()
    assert stats["examples"] == 8 and 0 < stats["trained_tokens"] < stats["tokens"]


def test_statistics_of_a_big_split_are_estimated_from_a_sample_and_computed_once(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(pairs, "STATS_SAMPLE", 10)
    short = {"prompt": [U("Hi?")], "chosen": [A("Yes.")], "rejected": [A("No.")]}
    rendered, real = [], pairs._n_tokens
    monkeypatch.setattr(pairs, "_n_tokens", lambda *a, **k: rendered.append(1) or real(*a, **k))
    split = pairs.ExampleSplit("s", [short] * 40, 40, tiny_tokenizer)
    stats = split.stats()
    assert len(rendered) == 30  # 10 sampled pairs: prompt, chosen, rejected
    exact = pairs.ExampleSplit("s", [short] * 10, 10, tiny_tokenizer).stats()
    assert stats["sampled"] == 10 and exact["sampled"] == 0
    assert (stats["tokens"], stats["trained_tokens"]) == (4 * exact["tokens"], 4 * exact["trained_tokens"])
    assert split.stats() == stats and len(rendered) == 60  # the second split's 30; this one's are kept


def test_pairs_are_memory_mapped_and_rows_that_differ_in_their_fields_share_one_schema(
    tmp_path, tiny_tokenizer, monkeypatch
):
    import finetune.data

    monkeypatch.setattr(finetune.data, "WRITE_BATCH", 2)  # several Arrow batches from a few records
    rows = [dict(PAIR, prompt=[U(f"Hi {n}?")]) for n in range(4)] + [{"prompt": "Bye?", "chosen": "Bye!"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs\.jsonl:5: .*rejected"):
        pairs.load(DataSection(train=str(path), format="preference"), tiny_tokenizer, "dpo")
    prepared = pairs.load(DataSection(train=str(path), format="preference", skip_bad_rows=True), tiny_tokenizer, "dpo")
    assert any("1 bad records skipped" in n and "pairs.jsonl:5" in n for n in prepared.notes)
    dataset = prepared.train.dataset()
    assert dataset.cache_files and len(dataset) == 4  # memory-mapped Arrow, not a list in memory
    expected = [one(r, "preference") for r in rows[:4]]
    assert list(prepared.train.examples) == expected and prepared.train.examples[1:3] == expected[1:3]
    kto = pairs.load(DataSection(train=str(path), format="preference", skip_bad_rows=True), tiny_tokenizer, "kto")
    assert len(kto.train.examples) == 8 and sum(e["label"] for e in kto.train.examples) == 4

    # prompts keep their records' other fields: one only the last batch has is a column, null before
    prompts = [{"prompt": "Q1?"}, {"prompt": "Q2?"}, {"prompt": "Q3?", "answer": "42"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    rl = pairs.load(DataSection(train=str(path), format="prompt"), tiny_tokenizer, "grpo")
    assert rl.train.dataset()["answer"] == [None, None, "42"]
    assert [e.get("answer") for e in rl.train.examples] == [None, None, "42"] and "answer" not in rl.train.examples[0]

    write_jsonl(path, prompts + [{"prompt": "Q4?", "answer": 42}])  # text in one record, a number in another
    with pytest.raises(
        DataError, match=r"prompts\.jsonl:4: field 'answer': a number here, but text at .*prompts\.jsonl:3"
    ):
        pairs.load(DataSection(train=str(path), format="prompt"), tiny_tokenizer, "grpo")


def test_the_models_chat_template_kwargs_reach_every_stage(tmp_path, tiny_tokenizer):
    """model.chat_template_kwargs render the preference examples in TRL (a per-example column its
    trainers read), the RL stages' prompts (their TRL config), and the plan's token counts."""
    import copy

    import yaml
    from trl import apply_chat_template

    from finetune.stages.common import trl_args

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% if mood is defined %}({{ mood }}) {% endif %}"
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    kwargs = {"mood": "cheerful"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR] * 3)
    cfg = DataSection(train=str(path), format="preference")
    plain = pairs.load(cfg, tok, "dpo")
    moody = pairs.load(cfg, tok, "dpo", template_kwargs=kwargs)
    row = moody.train.dataset()[0]
    assert row["chat_template_kwargs"] == kwargs
    rendered = apply_chat_template(row, tok)["prompt"]
    assert rendered == tok.apply_chat_template(PAIR["prompt"], add_generation_prompt=True, tokenize=False, **kwargs)
    assert rendered.startswith("(cheerful) ") and "chat_template_kwargs" not in plain.train.dataset().column_names
    assert moody.train.stats()["tokens"] > plain.train.stats()["tokens"]
    assert (
        "chat_template_kwargs" not in pairs.load(cfg, tok, "grpo", template_kwargs=kwargs).train.dataset().column_names
    )

    for stage in ("grpo", "rloo", "dpo"):
        recipe = yaml.safe_load((REPO / f"recipes/tiny/{stage}_lora.yaml").read_text())
        recipe["model"]["chat_template_kwargs"] = kwargs
        args = trl_args(config.load(text=yaml.safe_dump(recipe)), tmp_path / stage)
        assert getattr(args, "chat_template_kwargs", kwargs) == kwargs  # DPO's config has no such field


def test_dry_run_plans_a_preference_stage(tmp_path, capsys, tiny_path):
    assert (
        cli.main(["train", str(REPO / "recipes/tiny/dpo_lora.yaml"), f"output.dir={tmp_path / 'out'}", "--dry-run"])
        == 0
    )
    plan = capsys.readouterr().out
    assert "stage          dpo" in plan and "128 examples from 128 records" in plan
    assert not (tmp_path / "out").exists()


def test_preview_marks_the_answers_as_trl_trains_them(tiny_tokenizer):
    from finetune.data.preview import preview

    text = preview("preference_zh_demo", tiny_tokenizer, index=1)
    assert "chosen: " in text and "rejected: " in text
    assert "[[好的！8乘以6等于48。希望对你有帮助。</s>]]" in text and "[[58。</s>]]" in text
    assert (
        text.count("[[") == 3
    )  # the header, then only the answers: the prompt (user turn, generation prompt) is not trained
    kto_text = preview("kto_demo", tiny_tokenizer, index=0)
    assert "completion (undesirable): " in kto_text and kto_text.count("[[") == 2


@pytest.mark.parametrize(
    "name, stage, n",
    [
        ("preference_en_demo", "dpo", 160),
        ("preference_zh_demo", "rm", 120),
        ("kto_demo", "kto", 100),
        ("preference_zh_demo", "kto", 240),
    ],
)
def test_preference_demo_sets_load_for_their_stages(tiny_tokenizer, name, stage, n):
    prepared = pairs.load(DataSection(train=name), tiny_tokenizer, stage)
    assert len(prepared.train.examples) == n and prepared.eval is None


def test_sft_refuses_preference_data_in_one_line(tiny_tokenizer):
    from finetune import data

    with pytest.raises(RecipeError, match="preference_en_demo.jsonl: data.format: stage sft takes .* not preference"):
        data.load(DataSection(train="preference_en_demo"), tiny_tokenizer, max_length=64)


def test_dpo_loss_type_takes_one_name_or_a_list():
    base = "stage: dpo\nmodel: {name_or_path: tiny-llama}\ndata: {train: x.jsonl}\noutput: {dir: /tmp/never}\n"
    assert config.load(text=base, overrides=["train.loss_type=ipo"]).train["loss_type"] == ["ipo"]
    assert config.load(text=base, overrides=["train.loss_type=[sigmoid,bco_pair]"]).train["loss_type"] == [
        "sigmoid",
        "bco_pair",
    ]
    assert config.load(text=base).train["learning_rate"] == 5e-5  # a LoRA learning rate, not TRL's 1e-6
