"""Online RL stages (ppo, grpo, rloo) learn on the tiny pre-trained model, their rule rewards score
what they say, and their outputs describe themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _support import ddp_train, log_series

from finetune import config, rewards
from finetune.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]
SYMBOLS = r"\d+ ?\+ ?\d+ ?= ?\d+"  # the tiny model writes "a plus b is c"; GRPO/RLOO teach "a + b = c"


def rl_recipe(stage: str, out: Path, **sections) -> config.Recipe:
    """The shipped tiny recipe of `stage` (recipes/tiny/<stage>_lora.yaml) into `out`, sections updated."""
    raw = yaml.safe_load((REPO / "recipes" / "tiny" / f"{stage}_lora.yaml").read_text())
    raw["output"]["dir"] = str(out)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config.load(text=yaml.safe_dump(raw))


def mean(xs) -> float:
    return sum(xs) / len(xs)


# ----------------------------------------------------------------------------- rule rewards


def test_rule_rewards_score_what_they_say():
    conv = [[{"role": "assistant", "content": "3 + 4 = 7."}], [{"role": "assistant", "content": "3 plus 4 is 7."}]]
    regex = rewards.rule_function({"type": "regex", "pattern": SYMBOLS})
    assert regex(completions=conv) == [1.0, 0.0]
    assert regex.__name__ == "regex"
    fmt = rewards.rule_function({"type": "format", "name": "think"})
    assert fmt(
        completions=[
            "<think>x</think> <answer>7</answer>",
            "<answer>7</answer>",
            "<think>x</think><answer>7</answer> more",
        ]
    ) == [1.0, 0.0, 0.0]
    assert fmt.__name__ == "think"
    words = rewards.rule_function({"type": "length", "target": 4})
    assert words(completions=["a b c d", "a b", "a b c d e f g h", ""]) == [1.0, 0.5, 0.0, 0.0]
    tokens = rewards.rule_function({"type": "length", "target": 2, "unit": "tokens"})
    assert tokens(completions=["x", "y"], completion_ids=[[5, 6], [5, 6, 7]]) == [1.0, 0.5]
    answer = rewards.rule_function({"type": "answer", "column": "solution"})
    assert answer(completions=conv, solution=["7", "8"]) == [1.0, 0.0]


def _rl_text(stage: str, rewards_section) -> str:
    return yaml.safe_dump(
        {
            "stage": stage,
            "model": {"name_or_path": "tiny-llama"},
            "data": {"train": "x.jsonl", "format": "prompt"},
            "rewards": rewards_section,
            "output": {"dir": "/tmp/unused"},
        }
    )


@pytest.mark.parametrize(
    "stage, section, message",
    [
        (
            "grpo",
            {"rules": [{"type": "regex", "pattern": "("}]},
            "rewards.rules[0].pattern: invalid regular expression",
        ),
        (
            "grpo",
            {"rules": [{"type": "lenght", "target": 3}]},
            "rewards.rules[0].type: 'lenght' is not one of regex, format, length, answer; did you mean 'length'?",
        ),
        (
            "grpo",
            {"rules": [{"type": "length", "target": 0}]},
            "rewards.rules[0].target: expected a positive whole number",
        ),
        (
            "grpo",
            {"rules": [{"type": "regex", "pattern": "a", "colour": 1}]},
            "rewards.rules[0].colour: unknown key for a regex reward",
        ),
        (
            "grpo",
            {"rules": [{"type": "regex", "pattern": "a"}, {"type": "regex", "pattern": "b"}]},
            "two rewards are named 'regex'",
        ),
        ("rloo", {}, "rewards: rloo needs rewards.model (an rm output dir) and/or rewards.rules"),
        ("ppo", {}, "rewards.model: ppo needs a reward model"),
        (
            "ppo",
            {"model": "rm", "rules": [{"type": "regex", "pattern": "a"}]},
            "rewards.rules: ppo scores with the reward model only",
        ),
        ("sft", {"model": "rm"}, "rewards: only the ppo, grpo, rloo stages use rewards"),
    ],
)
def test_bad_rewards_section_is_a_one_line_error_naming_the_line(stage, section, message):
    if stage == "sft":
        text = _rl_text("sft", section).replace("format: prompt", "format: messages")
    else:
        text = _rl_text(stage, section)
    with pytest.raises(RecipeError) as e:
        config.load(text=text)
    assert message in str(e.value)
    assert str(e.value).startswith("recipe:") and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- learning


def test_grpo_learns_the_rule_reward_and_writes_a_self_describing_output(tmp_path):
    from finetune.stages import grpo

    out = grpo.run(rl_recipe("grpo", tmp_path / "grpo", train={"max_steps": 16}))
    symbols = log_series(out, "rewards/symbols/mean")
    total = log_series(out, "reward")
    assert mean(symbols[:3]) < 0.15 and mean(symbols[-6:]) > 0.5, symbols  # measured 0.04 -> 0.76
    assert mean(total[-6:]) > mean(total[:3]) + 0.4, total  # measured 0.43 -> 1.10
    results = json.loads((out / "all_results.json").read_text())
    assert results["reward_last5"] > results["reward_first5"]
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "## Rewards" in card and "`symbols`: regex rule" in card and "prompts" in card
    assert config.load(out / "recipe.yaml").rewards.rules[0]["name"] == "symbols"
    # The saved adapter, on the plain base, writes what was rewarded; the base alone does not.
    base_rate, tuned_rate = (symbol_rate(out, adapter) for adapter in (False, True))
    assert base_rate < 0.15 and tuned_rate > 0.5, (base_rate, tuned_rate)  # measured 0.06 -> 0.91


def symbol_rate(out: Path, adapter: bool) -> float:
    """Fraction of 32 sampled answers to 4 demo prompts that write a sum as `a + b = c`."""
    import re

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import tiny

    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny.build_if_tiny("tiny-llama"))
    if adapter:
        model = PeftModel.from_pretrained(model, str(out))
    prompts = [
        [{"role": "user", "content": q}]
        for q in ("What is 13 times 12?", "What is 23 plus 85?", "What is 7 plus 9?", "What is 41 plus 3?")
    ]
    enc = tok.apply_chat_template(
        prompts * 8, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    torch.manual_seed(0)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=16, do_sample=True, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return mean([1.0 if re.search(SYMBOLS, t) else 0.0 for t in texts])


def test_rloo_learns_the_rule_reward(tmp_path):
    from finetune.stages import rloo

    out = rloo.run(rl_recipe("rloo", tmp_path / "rloo", train={"max_steps": 10}))
    symbols = log_series(out, "rewards/symbols/mean")
    assert mean(symbols[:2]) < 0.15 and mean(symbols[-4:]) > 0.5, symbols  # measured 0.0 -> 0.91


@pytest.mark.timeout(300)  # STACK_NOTES: one long PPO run once hung
def test_ppo_reward_rises_with_kl_and_entropy_logged(tmp_path, tiny_rm_dir, tiny_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.stages import ppo

    out = ppo.run(rl_recipe("ppo", tmp_path / "ppo", rewards={"model": str(tiny_rm_dir)}, train={"max_steps": 12}))
    scores = log_series(out, "objective/scores")
    kl = log_series(out, "objective/kl")
    assert len(scores) == len(kl) == len(log_series(out, "objective/entropy")) == 12  # every step
    assert mean(scores[-3:]) > mean(scores[:3]) + 1.0, scores  # measured -3.70 -> -1.20
    assert kl[0] == pytest.approx(0.0, abs=1e-3) and kl[-1] > 0.1, kl  # the policy moved away from its reference
    card = (out / "README.md").read_text()
    assert "experimental" in card and str(tiny_rm_dir) in card
    # The policy adapter loads on the plain base and changes its logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert (after - before).abs().max() > 1e-3


def test_grpo_sums_rule_and_reward_model_rewards_with_their_weights(tmp_path, tiny_rm_dir):
    from finetune.stages import grpo

    recipe = rl_recipe(
        "grpo",
        tmp_path / "grpo",
        rewards={"model": str(tiny_rm_dir), "model_weight": 0.5},
        train={"max_steps": 2, "per_device_train_batch_size": 8},
    )
    out = grpo.run(recipe)
    for step in [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "reward" in h]:
        weighted = (
            step["rewards/symbols/mean"] + 0.5 * step["rewards/length/mean"] + 0.5 * step["rewards/reward_model/mean"]
        )
        assert step["reward"] == pytest.approx(weighted, abs=1e-4)
        assert step["rewards/reward_model/std"] > 0  # the reward model tells the completions apart


def test_answer_rule_on_records_without_the_field_fails_before_writing(tmp_path):
    from _support import write_jsonl

    from finetune.errors import DataError
    from finetune.stages import grpo

    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "What is 2 plus 3?", "answer": "5"}, {"prompt": "What is 1 plus 6?"}]
    )
    recipe = rl_recipe(
        "grpo",
        tmp_path / "out",
        data={"train": str(data), "format": "prompt"},
        rewards={"rules": [{"type": "answer"}]},
    )
    with pytest.raises(
        DataError, match=r"prompts.jsonl: record 2: rewards.rules\[0\] \(an answer reward\) reads the field 'answer'"
    ):
        grpo.run(recipe)
    assert not list(tmp_path.glob("out*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ppo_runs_under_two_process_ddp(tmp_path, tiny_rm_dir):
    """TRL 1.12's PPOTrainer needs two fixes to run under DDP (finetune/stages/ppo.py)."""
    ddp = ddp_train(
        REPO / "recipes" / "tiny" / "ppo_lora.yaml",
        tmp_path,
        f"output.dir={tmp_path / 'ddp'}",
        f"rewards.model={tiny_rm_dir}",
        "train.max_steps=2",
        "train.per_device_train_batch_size=4",
        "train.response_length=8",
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stderr.count("finetune: done: output in") == 1
    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["episode"] == 2 * 4 * 2  # steps x per-device batch x processes
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()


def test_dry_run_plan_of_an_rl_stage_counts_prompts_not_trained_tokens(tmp_path):
    from finetune.stages import grpo

    text = grpo.plan(rl_recipe("grpo", tmp_path / "out")).render()
    assert "prompts only (answers are generated" in text and "tokens trained" not in text
    assert not (tmp_path / "out").exists()
