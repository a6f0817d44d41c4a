"""Recipe loading: typed overrides, defaults that replace TRL's CPU-hostile ones, and errors
that name the file, line and field with the closest valid key."""

import pytest

from finetune import config
from finetune.errors import RecipeError
from finetune.stages.common import trl_args

BASE = """\
stage: sft
model:
  name_or_path: tiny-llama
data:
  train: alpaca_en_demo
output:
  dir: /tmp/never-written
"""


def load(extra: str = "", overrides=()):
    return config.load(text=BASE + extra, overrides=list(overrides))


def test_overrides_are_typed_by_the_schema():
    r = load(
        overrides=[
            "train.learning_rate=1e-3",
            "adapter.r=4",
            "adapter.target_modules=[q_proj,v_proj]",
            "output.overwrite=true",
            "train.max_steps=7",
            "data.columns={instruction: question}",
        ]
    )
    assert r.train["learning_rate"] == pytest.approx(1e-3) and isinstance(r.train["learning_rate"], float)
    assert r.adapter.r == 4 and r.adapter.target_modules == ["q_proj", "v_proj"]
    assert r.output.overwrite is True and r.train["max_steps"] == 7
    assert r.data.columns == {"instruction": "question"}


def test_defaults_replace_trl_defaults_that_bite_on_cpu(monkeypatch):
    monkeypatch.setattr(config, "_cpu_native_bf16", lambda: False)
    r = load()
    args = trl_args(r, "/tmp/never-written")
    assert args.bf16 is False and args.fp16 is False  # TRL defaults bf16 on, even on a CPU without bf16
    assert args.activation_checkpointing is False
    assert args.loss_type == "nll"
    assert args.learning_rate == pytest.approx(2e-4)
    assert args.train_sampling_strategy == "group_by_length"
    assert args.ddp_find_unused_parameters is False


def test_bf16_is_the_default_where_the_cpu_has_bf16_arithmetic(monkeypatch):
    monkeypatch.setattr(config, "_cpu_native_bf16", lambda: True)
    assert load().train["bf16"] is True
    assert load(overrides=["train.bf16=false"]).train["bf16"] is False


def test_yaml_no_is_the_strategy_no():
    r = load("train:\n  save_strategy: no\n  eval_strategy: no\n")
    assert r.train["save_strategy"] == "no" and r.train["eval_strategy"] == "no"
    assert trl_args(r, "/tmp/x").save_strategy == "no"


def test_any_trl_field_passes_through_and_old_names_are_aliases():
    r = load("train:\n  gradient_checkpointing: true\n  weight_decay: 0.01\n")
    assert r.train["activation_checkpointing"] is True and "gradient_checkpointing" not in r.train
    assert trl_args(r, "/tmp/x").weight_decay == pytest.approx(0.01)


def test_dump_round_trips():
    r = load(overrides=["adapter.method=dora", "train.max_steps=3"])
    again = config.load(text=r.dump())
    assert again.to_dict() == r.to_dict()
    assert again.adapter.use_dora is True


@pytest.mark.parametrize(
    "extra, overrides, message",
    [
        (
            "train:\n  learnig_rate: 1\n",
            [],
            r"recipe:9: train\.learnig_rate: unknown key for SFTConfig; did you mean 'learning_rate'\?",
        ),
        ("adapter:\n  metod: lora\n", [], r"recipe:9: adapter\.metod: unknown key; did you mean 'method'\?"),
        (
            "adapter:\n  method: lorra\n",
            [],
            r"recipe:9: adapter\.method: 'lorra' is not one of lora, dora, qlora, .*; did you mean 'lora'\?",
        ),
        ("", ["train.max_steps=abc"], r"override 'train\.max_steps=abc': train\.max_steps: expected int, got 'abc'"),
        ("", ["adapter.r=0"], r"adapter\.r: must be at least 1"),
        ("", ["data.format=alpacca"], r"data\.format: 'alpacca' is not one of .*; did you mean 'alpaca'\?"),
        ("trian:\n  x: 1\n", [], r"recipe:8: trian: unknown section; did you mean 'train'\?"),
        ("train:\n  output_dir: /x\n", [], r"train\.output_dir: set by finetune from output\.dir"),
        (
            "",
            ["data.eval=x.jsonl", "data.eval_ratio=0.1"],
            r"data\.eval_ratio: give data\.eval or data\.eval_ratio, not both",
        ),
        ("", ["train.bf16=true", "train.fp16=true"], r"bf16 and fp16 are both on"),
        ("", ["trainmax_steps=3"], r"override 'trainmax_steps=3': trainmax_steps: unknown section"),
        (
            "",
            ["train.resume=/no/such/checkpoint"],
            r"train\.resume: '/no/such/checkpoint' is neither auto, never nor a checkpoint dir",
        ),
    ],
)
def test_errors_name_place_field_and_fix(extra, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load(extra, overrides)


def test_missing_required_key_and_file_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"missing required key 'model\.name_or_path'"):
        config.load(text="model: {}\ndata:\n  train: x\noutput:\n  dir: y\n")
    with pytest.raises(RecipeError, match=r"missing section 'data'"):
        config.load(text="model:\n  name_or_path: x\noutput:\n  dir: y\n")
    with pytest.raises(RecipeError, match=r"nope\.yaml: recipe file not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:\d+: invalid YAML"):
        config.load(bad)


def test_recipes_are_data_not_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text(BASE + "extra: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        config.load(evil)


def test_bad_model_references_name_the_field(tmp_path):
    from finetune import loading
    from finetune.config import ModelSection

    with pytest.raises(
        RecipeError, match=r"model\.name_or_path: unknown tiny model 'tiny-lama'.*did you mean 'tiny-llama'\?"
    ):
        loading.model_path(ModelSection(name_or_path="tiny-lama"))
    missing = tmp_path / "no-such-model"
    with pytest.raises(RecipeError, match=rf"model\.tokenizer: {missing}: no such directory"):
        loading.load_tokenizer(ModelSection(name_or_path="tiny-llama", tokenizer=str(missing)))
    assert loading.model_path(ModelSection(name_or_path="org/some-model")) == "org/some-model"


def test_one_defaults_table_and_where_each_value_came_from():
    """Defaults are filled before validation, from one table (common < stage < method), and the
    dry-run plan names the source of every effective value."""
    from finetune.stages.common import origin_lines

    r = load("adapter:\n  method: prompt_tuning\ntrain:\n  seed: 7\n", overrides=["train.max_steps=3"])
    o = r.origins
    assert (o["train.max_steps"], o["train.seed"], o["data.train"]) == ("override", "recipe", "recipe")
    assert o["train.learning_rate"] == "method default" and r.train["learning_rate"] == pytest.approx(3e-2)
    assert o["train.loss_type"] == "stage default" and o["train.lr_scheduler_type"] == "default"
    lines = "\n".join(origin_lines(r))
    assert "  override:       train.max_steps=3" in lines and "  method default: train.learning_rate=0.03" in lines
    # stage dpo: its own learning rate (the method table is for sft); a recipe without a stage says so
    dpo = config.load(text=BASE.replace("stage: sft", "stage: dpo").replace("alpaca_en_demo", "preference_en_demo"))
    assert dpo.origins["train.learning_rate"] == "stage default" and dpo.train["learning_rate"] == pytest.approx(5e-5)
    assert config.load(text=BASE.replace("stage: sft\n", "")).origins["stage"].startswith("default")
    # dora is lora with use_dora, set by the table (visible), not quietly after validation
    dora = load("adapter:\n  method: dora\n")
    assert dora.adapter.use_dora is True and dora.origins["adapter.use_dora"] == "method default"
    with pytest.raises(RecipeError, match="adapter.use_dora: method dora is LoRA with use_dora: true"):
        load("adapter:\n  method: dora\n  use_dora: false\n")
