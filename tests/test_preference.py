"""Preference stages on the tiny model: they learn the demo data's toy preference (polite and
complete answers over rude, wrong or cut-off ones), on held-out pairs.

rm: pairwise accuracy >= 0.9 and the output scores as a plain transformers + peft model;
dpo: implicit-reward accuracy >= 0.9 and the margin rises; kto / orpo / simpo move the right way.
"""

from __future__ import annotations

import json

import pytest
import torch
from _support import REPO, Watcher, log_series, preference_recipe, write_jsonl

from finetune import chain, cli, config, loading
from finetune.stages import dpo, kto, orpo, rm, simpo

DEMO_ZH = REPO / "data" / "preference_zh_demo.jsonl"


def _results(out) -> dict:
    return json.loads((out / "all_results.json").read_text())


# ----------------------------------------------------------------------------- reward model


def test_reward_model_ranks_held_out_pairs(tiny_rm_dir):
    results = _results(tiny_rm_dir)
    assert results["eval_accuracy"] >= 0.9, results
    assert results["eval_margin"] > 1.0, results
    assert results["train_dropped_examples"] == 0 and results["eval_dropped_examples"] == 0
    losses = log_series(tiny_rm_dir, "loss")
    assert losses[-1] < 0.5 * losses[0], losses
    card = (tiny_rm_dir / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card
    assert f"pairwise accuracy (reward of chosen > rejected) on the eval split: {results['eval_accuracy']:.4g}" in card


def test_dry_run_counts_the_reward_models_parameters(tiny_rm_dir, tmp_path):
    plan = rm.plan(config.load(text=preference_recipe(tmp_path / "rm", "rm")))
    assert f"trainable parameters: {plan.trainable:,} of {plan.total:,}" in (tiny_rm_dir / "README.md").read_text()


def test_reward_model_loads_with_plain_transformers_and_peft(tiny_rm_dir):
    """The card's recipe (AutoModelForSequenceClassification + PeftModel, no finetune code) gives
    the same scores as finetune's merged scorer, and they rank unseen Chinese pairs too."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_path = json.loads((tiny_rm_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, pad_token_id=tok.pad_token_id)
    plain = PeftModel.from_pretrained(plain, tiny_rm_dir).eval()
    merged, merged_tok = loading.load_reward_model(tiny_rm_dir)

    rows = [json.loads(line) for line in DEMO_ZH.read_text(encoding="utf-8").splitlines()[:12]]
    texts = [tok.apply_chat_template(r[k], tokenize=False) for r in rows for k in ("chosen", "rejected")]
    with torch.no_grad():
        a = torch.cat([plain(**tok(t, add_special_tokens=False, return_tensors="pt")).logits[:, 0] for t in texts])
    from finetune.reward_scoring import score_conversations

    b = torch.tensor(score_conversations(merged, merged_tok, [r[k] for r in rows for k in ("chosen", "rejected")]))
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (a[0::2] > a[1::2]).float().mean() >= 0.9


def test_score_cli_writes_a_score_per_record(tiny_rm_dir, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", str(tiny_rm_dir), "--data", "preference_zh_demo", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 120 and [r["record"] for r in rows] == list(range(120))
    assert all(abs(r["margin"] - (r["chosen"] - r["rejected"])) < 1e-5 for r in rows)
    assert sum(r["margin"] > 0 for r in rows) >= 0.9 * len(rows)
    assert cli.main(["score", str(tiny_rm_dir), "--data", "kto_demo"]) == 0
    kto_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    good = [r["score"] for r in kto_rows if r["label"]]
    bad = [r["score"] for r in kto_rows if not r["label"]]
    assert len(good) + len(bad) == 100 and min(good) > max(bad)


def test_score_rejects_a_non_reward_dir_in_one_line(tiny_rm_dir, tmp_path, capsys):
    assert cli.main(["score", str(tmp_path), "--data", "preference_zh_demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an `rm` output dir" in err


def test_reward_trainer_drops_long_pairs_and_says_how_many(tmp_path, tiny_path):
    short = {"prompt": "What is 2 plus 3?", "chosen": "Sure! 2 plus 3 is 5. Hope this helps.", "rejected": "6."}
    long = {**short, "prompt": "What is 2 plus 3? " * 20}
    data = write_jsonl(tmp_path / "pairs.jsonl", [short, long, short | {"rejected": "Ask someone else."}, long])
    text = preference_recipe(
        tmp_path / "out",
        "rm",
        steps=2,
        data={"train": str(data), "eval_ratio": 0.0},
        train={"max_length": 64, "eval_strategy": "no"},
    )
    out = rm.run(config.load(text=text))
    assert _results(out)["train_dropped_examples"] == 2
    assert "training examples dropped as longer than train.max_length: 2" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------- DPO and friends


def test_dpo_learns_the_preference_on_held_out_pairs(tmp_path, tiny_path):
    out = dpo.run(config.load(text=preference_recipe(tmp_path / "dpo", "dpo", steps=30)))
    accuracy, margins = log_series(out, "eval_rewards/accuracies"), log_series(out, "eval_rewards/margins")
    assert accuracy[-1] >= 0.9, accuracy
    assert len(margins) >= 3 and margins[0] < margins[1] < margins[-1], margins
    train_margins = log_series(out, "rewards/margins")
    assert train_margins[0] == 0.0 and train_margins[-1] > 1.0  # starts at the reference (adapter off)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize(
    "stage, module, train, data",
    [
        ("kto", kto, {"beta": 0.1}, "kto_demo"),
        ("orpo", orpo, {"beta": 0.1}, "preference_en_demo"),
        ("simpo", simpo, {}, "preference_zh_demo"),
    ],
)
def test_reference_free_and_unpaired_objectives_move_the_right_way(tmp_path, tiny_path, stage, module, train, data):
    text = preference_recipe(
        tmp_path / stage, stage, steps=20, data={"train": data}, train={**train, "eval_steps": 20}
    )
    out = module.run(config.load(text=text))
    margins = log_series(out, "rewards/margins")
    assert margins[-1] > margins[0] + 0.1, margins
    assert log_series(out, "eval_rewards/margins")[-1] > 0
    if stage != "kto":  # kto logs no accuracy (its examples are unpaired)
        assert log_series(out, "eval_rewards/accuracies")[-1] >= 0.8


@pytest.mark.parametrize("stage, module, key", [("rm", rm, "eval_accuracy"), ("dpo", dpo, "eval_rewards/accuracies")])
def test_qlora_preference_stages_learn_on_a_4bit_base(tmp_path, tiny_path, tiny_tokenizer, stage, module, key):
    text = preference_recipe(tmp_path / stage, stage, steps=20, adapter={"method": "qlora"}, train={"eval_steps": 20})
    watcher = Watcher(tiny_tokenizer)
    out = module.run(config.load(text=text), callbacks=[watcher])
    assert _results(out)[key] >= 0.9, _results(out)
    unchanged = [n for n, p in watcher.before_trainable.items() if torch.equal(p, watcher.after[n])]
    moved_frozen = [n for n, p in watcher.before_frozen.items() if not torch.equal(p, watcher.after[n])]
    assert watcher.before_trainable and not unchanged and not moved_frozen, (unchanged[:3], moved_frozen[:3])
    names = " ".join(watcher.before_trainable)
    assert "lora_A" in names and "lora_B" in names and (("score" in names) == (stage == "rm"))
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == (
        "SEQ_CLS" if stage == "rm" else "CAUSAL_LM"
    )
    assert "4-bit nf4 base" in (out / "README.md").read_text()


def test_interrupted_dpo_run_resumes_to_the_same_losses(tmp_path, tiny_path):
    from test_resume import CrashAt

    def recipe(out):
        return config.load(
            text=preference_recipe(
                out,
                "dpo",
                steps=6,
                data={"max_samples": 24, "eval_ratio": 0.0},
                adapter={"dropout": 0.1},
                train={"save_steps": 2, "logging_steps": 1, "eval_strategy": "no"},
            )
        )

    reference = dpo.run(recipe(tmp_path / "reference"))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        dpo.run(recipe(out), callbacks=[CrashAt(5)])
    assert not out.exists() and (tmp_path / "resumed.incomplete" / "checkpoint-4").is_dir()
    dpo.run(recipe(out))
    expected, got = log_series(reference, "loss"), log_series(out, "loss")
    assert len(got) == len(expected) == 6 and got == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- chaining


def test_chained_stage_starts_from_the_merged_sft_model(tmp_path, tiny_path):
    """model.name_or_path = an SFT output dir: the next stage's base is SFT merged into its base
    (same logits as the SFT adapter on its base), cached and reused, so DPO's reference (the
    adapter disabled) is the SFT model."""
    from _support import memo_recipe
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.stages import sft

    sft_dir = sft.run(config.load(text=memo_recipe(tmp_path, steps=6)))
    merged = models_path(str(sft_dir))
    assert models_path(str(sft_dir)) == merged  # cached: merged once
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), sft_dir)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    assert torch.allclose(expected, got, atol=1e-4)

    text = preference_recipe(
        tmp_path / "dpo",
        "dpo",
        steps=2,
        model={"name_or_path": str(sft_dir)},
        train={"eval_strategy": "no"},
        data={"max_samples": 16, "eval_ratio": 0.0},
    )
    out = dpo.run(config.load(text=text))
    # the adapter config names the original model (not this machine's cache); base.json records the SFT parent
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_path
    assert chain.base_of(out) == merged
    # the base of the chained output is found again from its recipe when the cached copy is gone
    import shutil

    shutil.rmtree(merged)
    assert chain.base_of(out) == merged


def models_path(name: str) -> str:
    return loading.model_path(config.ModelSection(name_or_path=name))


def test_a_reward_dir_is_not_a_policy_to_train(tiny_rm_dir, tmp_path):
    from finetune.errors import RecipeError

    with pytest.raises(RecipeError, match="SEQ_CLS adapter"):
        models_path(str(tiny_rm_dir))
