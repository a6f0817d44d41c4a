"""`finetune eval` end to end on the tiny model: a tuned adapter beats its base, a damaged model
fails the capability gate while the base against itself passes, the predictions-file mode,
the recipe `eval:` hook and the model card, reports with embedded plots, and bad input.

One short LoRA SFT (with an `eval:` section, so the after-training hook runs too) is shared by
the module; most commands run in-process through `finetune.cli.main` (one import of torch),
the gate's exit code once through a real subprocess."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from _support import MEMO_CHATS, REPO, memo_recipe, run_cli, write_jsonl

SUITE = REPO / "eval" / "suites" / "general.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_path):
    """HF_HOME in a temp dir (evaluate's caches), restored afterwards."""
    import os

    import evaluate

    from finetune.eval import modules

    hf = tmp_path_factory.mktemp("hf_home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME",)}
    os.environ["HF_HOME"] = str(hf)
    saved_cache, evaluate.config.HF_MODULES_CACHE = evaluate.config.HF_MODULES_CACHE, hf / "modules"
    if "modules" not in modules._chosen:
        modules.set_modules_dir(hf / "modules")
    yield hf
    evaluate.config.HF_MODULES_CACHE = saved_cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env) -> Path:
    """LoRA SFT memorising MEMO_CHATS, with an eval: section (generation on the memo task + suite)."""
    from finetune import config
    from finetune.stages import sft

    d = tmp_path_factory.mktemp("trained")
    text = memo_recipe(d, steps=40)
    raw = yaml.safe_load(text)
    raw["eval"] = {"data": str(d / "memo.jsonl"), "max_new_tokens": 16, "suite": str(SUITE)}
    return sft.run(config.load(text=yaml.safe_dump(raw)))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tiny_path) -> Path:
    """The tiny base with Gaussian noise (0.5 x each weight's std) added to every weight matrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("damaged")
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(out)
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    from finetune.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tuned_beats_base_on_rouge_l_and_the_card_shows_it(trained):
    rep = json.loads((trained / "eval" / "report.json").read_text())
    gen = rep["generation"]
    assert gen["tuned"]["n"] == len(MEMO_CHATS)
    assert gen["tuned"]["rougeL"] > gen["baseline"]["rougeL"] + 0.3, gen
    assert gen["tuned"]["bleu"] > gen["baseline"]["bleu"]
    card = (trained / "README.md").read_text()
    assert "## Evaluation" in card and f"| rougeL | {gen['tuned']['rougeL']:.4g} |" in card
    assert "Capability suite `general`" in card
    # predictions: prompt rendered with the chat template, reference = the last assistant turn
    rows = [json.loads(line) for line in (trained / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [c[-1]["content"] for c in MEMO_CHATS]
    assert all(r["prompt"].endswith("<|assistant|>\n") for r in rows)
    history = (trained.parent / "eval_history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["metrics"]["generation/rougeL"] == gen["tuned"]["rougeL"]


def test_report_html_embeds_its_images(trained):
    page = (trained / "eval" / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert {alt for alt, _ in images} == {"Training loss", "Baseline vs tuned"}  # one run: no trend yet
    assert "the trend appears from the second" in page
    for _, data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert 'src="http' not in page and "<script" not in page  # self-contained
    assert json.loads((trained / "eval" / "report.json").read_text())["plots"] == ["loss", "bars"]
    assert "<h2>Worst predictions</h2>" in page and "<h2>Best predictions</h2>" in page


def test_damaged_model_is_flagged_and_fails_the_gate(damaged, tiny_path, tmp_path, env):
    out = tmp_path / "gate"
    result = run_cli(
        [
            "eval",
            damaged,
            "--baseline",
            "tiny-llama",
            "--suite",
            SUITE,
            "--out",
            out,
            "--fail-on-regression",
            "--history",
            tmp_path / "h.jsonl",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "REGRESSION" in result.stdout
    rep = json.loads((out / "report.json").read_text())
    flagged = {(r["task"], r["metric"]) for r in rep["suite"]["rows"] if r["regression"]}
    assert {("heldout_en", "perplexity"), ("heldout_zh", "perplexity")} <= flagged
    assert rep["suite"]["regressions"] == len(flagged)


def test_base_against_itself_passes(tmp_path, capsys, env):
    history = tmp_path / "h.jsonl"
    for run in ("a", "b"):
        code, _, err = cli(
            capsys,
            "eval",
            "tiny-llama",
            "--baseline",
            "tiny-llama",
            "--suite",
            SUITE,
            "--out",
            tmp_path / run,
            "--fail-on-regression",
            "--history",
            history,
        )
        assert code == 0, err
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["suite"]["regressions"] == 0
    assert all(r["delta"] == 0 for r in rep["suite"]["rows"])
    assert len(history.read_text().splitlines()) == 2 and rep["history_runs"] == 2


def test_predictions_file_mode(tmp_path, capsys, env):
    from finetune.eval import scores

    preds = ["中国的首都是北京。", "The sky is blue today.", "A cat has four legs."]
    refs = ["中国的首都是北京。", "The sky is blue.", "A dog has four legs."]
    f = write_jsonl(
        tmp_path / "p.jsonl", [{"prediction": p, "reference": r, "id": i} for i, (p, r) in enumerate(zip(preds, refs))]
    )
    code, _, err = cli(capsys, "eval", "--predictions", f, "--out", tmp_path / "o", "--history", "none")
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    direct = scores.compute(preds, refs)
    assert {k: metrics[k] for k in direct} == direct and metrics["language"] == "zh"
    code, _, err = cli(
        capsys,
        "eval",
        "--predictions",
        f,
        "--out",
        tmp_path / "lf",
        "--metric-style",
        "llamafactory",
        "--history",
        "none",
    )
    assert code == 0, err
    assert (
        json.loads((tmp_path / "lf" / "metrics.json").read_text())["bleu-4"]
        == scores.llamafactory(preds, refs)["bleu-4"]
    )


def test_generation_from_a_registry_dataset(trained, tmp_path, capsys, env):
    from finetune.eval import scores

    code, _, err = cli(
        capsys,
        "eval",
        trained,
        "--data",
        "alpaca_zh_demo",
        "--max-samples",
        5,
        "--max-new-tokens",
        8,
        "--batch-size",
        2,
        "--out",
        tmp_path / "o",
        "--history",
        "none",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(set(r) == {"prompt", "prediction", "reference"} for r in rows)
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["language"] == "zh"  # from the registry
    direct = scores.compute([r["prediction"] for r in rows], [r["reference"] for r in rows], language="zh")
    assert {k: metrics[k] for k in direct} == direct


def test_batched_generation_equals_one_by_one(trained):
    from finetune import loading
    from finetune.eval import generation

    loaded = loading.load_for_eval(str(trained))
    prompts = [c[:1] for c in MEMO_CHATS] + [
        [{"role": "user", "content": "Tell me a long story about a cat, a dog and a bird."}]
    ]
    batched = generation.generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12, batch_size=5)
    assert batched == generation.generate_one_by_one(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12)
    assert batched[:4] == [c[1]["content"] for c in MEMO_CHATS]  # memorised, despite left padding


# ----------------------------------------------------------------------------- bad input


def _error(capsys, *argv) -> str:
    code, _, err = cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_predictions_missing_a_field_names_file_line_field(tmp_path, capsys):
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prediction": "a", "reference": "a"}, {"prediction": "b", "reference": "b"}, {"prediction": "c"}],
    )
    line = _error(capsys, "eval", "--predictions", f, "--out", tmp_path / "o")
    assert f"{f}:3: field 'reference': missing" in line
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.incomplete*"))


def test_empty_dataset(tmp_path, capsys):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    line = _error(capsys, "eval", "tiny-llama", "--data", f, "--out", tmp_path / "o")
    assert f"{f}: empty dataset" in line
    assert not (tmp_path / "o").exists()


def test_suite_with_an_unknown_task(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    (tmp_path / "t.txt").write_text("Some text.\n")
    suite.write_text(
        "name: s\ntasks:\n  - name: ppl\n    type: perplexity\n    data: t.txt\n"
        "  - name: quiz\n    type: multiple_choise\n    data: t.txt\n"
    )
    line = _error(capsys, "eval", "tiny-llama", "--suite", suite, "--out", tmp_path / "o")
    assert f"{suite}:7: tasks[1].type: unknown task type 'multiple_choise'" in line
    assert "did you mean 'multiple_choice'?" in line


def test_finished_output_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    f = write_jsonl(tmp_path / "p.jsonl", [{"prediction": "a", "reference": "a"}])
    line = _error(capsys, "eval", "--predictions", f, "--out", tmp_path / "o")
    assert "--out" in line and "not empty" in line
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"


def test_recipe_eval_section_is_validated(tmp_path):
    from finetune import config
    from finetune.errors import RecipeError

    text = memo_recipe(tmp_path)
    assert config.load(text=text).eval is None  # optional, absent by default
    with pytest.raises(RecipeError, match=r"eval\.metric_style.*'bleu'.*standard, llamafactory"):
        config.load(text=text, overrides=["eval.metric_style=bleu"])
    with pytest.raises(RecipeError, match=r"eval\.suite: nope\.yaml: file not found"):
        config.load(text=text, overrides=["eval.suite=nope.yaml"])
    with pytest.raises(RecipeError, match=r"eval\.max_samples: must be at least 1"):
        config.load(text=text, overrides=["eval.max_samples=0"])
    with pytest.raises(RecipeError, match=r"eval\.max_new_token.*did you mean 'max_new_tokens'"):
        config.load(text=text, overrides=["eval.max_new_token=3"])


def test_shipped_suites_parse():
    from finetune.eval import suite

    for path in sorted((REPO / "eval" / "suites").glob("*.yaml")):
        assert path.read_text().startswith("# finetune eval "), path  # opens with the command that runs it
        if "type: lm_eval" in path.read_text():
            pytest.importorskip("lm_eval")
        assert suite.load(path).tasks


def test_lm_eval_backend_runs_a_local_task_and_agrees_with_ours(tmp_path):
    """The harness's multiple_choice on our knowledge probes (a local custom task) gives the same
    acc / acc_norm as our native log-likelihood scorer, on the same model, in one finetune eval."""
    pytest.importorskip("lm_eval")
    import os
    import subprocess
    import sys

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = REPO / "eval" / "data" / "knowledge_en.jsonl"
    (tasks / "knowledge.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "ft_knowledge_en",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
            }
        )
    )
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "name": "both",
                "tasks": [
                    {"name": "ours", "type": "multiple_choice", "data": str(data)},
                    {
                        "name": "harness",
                        "type": "lm_eval",
                        "task": "ft_knowledge_en",
                        "include_path": "tasks",
                        "metrics": ["acc", "acc_norm"],
                    },
                ],
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune",
            "eval",
            "tiny-llama",
            "--suite",
            str(suite),
            "--out",
            str(tmp_path / "o"),
            "--history",
            "none",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = json.loads((tmp_path / "o" / "report.json").read_text())["suite"]["tuned"]
    assert tuned["harness"] == tuned["ours"], tuned


def test_after_training_scores_exactly_the_examples_training_held_out(tiny_path):
    """eval with data.eval_ratio: the hook's prompts are the examples data.load held out."""
    from finetune import config, data, loading
    from finetune.data.encode import encode
    from finetune.eval.hook import heldout_items

    recipe = config.load(REPO / "recipes" / "tiny" / "sft_lora_eval.yaml", ["eval.max_samples=null"])
    tok = loading.load_tokenizer(recipe.model)
    prepared = data.load(recipe.data, tok, recipe.train["max_length"], seed=recipe.train["seed"])
    items, label, language = heldout_items(recipe)
    assert len(items) == len(prepared.eval.encoded) > 1 and language == "en"
    for item, held in zip(items, prepared.eval.encoded):
        chat = item.prompt + [{"role": "assistant", "content": item.reference}]
        assert [e.input_ids for e in encode(tok, {"messages": chat}, recipe.train["max_length"])] == [held.input_ids]


def test_after_training_scores_the_split_the_stage_held_out_without_loading_the_data_again(tiny_path, monkeypatch):
    """The hook takes the stage's held-out split: data.load is not called again (no re-encoding)."""
    from finetune import config, data, loading
    from finetune.eval.hook import heldout_items

    recipe = config.load(REPO / "recipes" / "tiny" / "sft_lora_eval.yaml", ["eval.max_samples=null"])
    prepared = data.load(
        recipe.data, loading.load_tokenizer(recipe.model), recipe.train["max_length"], seed=recipe.train["seed"]
    )
    expected = heldout_items(recipe)

    def no_second_load(*args, **kwargs):
        raise AssertionError("data.load called again")

    monkeypatch.setattr(data, "load", no_second_load)
    items, label, _ = heldout_items(recipe, prepared.eval)
    assert items == expected[0] and len(items) == len(prepared.eval.encoded) > 1 and label == expected[1]
    with pytest.raises(AssertionError, match="called again"):
        heldout_items(recipe)  # without the split, the hook would load it


def test_eval_settings_do_not_block_resuming_an_interrupted_run(tmp_path):
    from finetune import config

    text = memo_recipe(tmp_path)
    plain = config.load(text=text)
    with_eval = config.load(text=text, overrides=[f"eval.suite={SUITE}", "eval.max_new_tokens=8"])
    assert with_eval.identity() == plain.identity()
    assert "\neval:\n" in with_eval.dump() and "\neval:\n" not in plain.dump()
