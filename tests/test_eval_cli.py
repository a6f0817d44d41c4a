"""`finetune eval` as a user runs it, several command lines in one batch subprocess (tests/_cli_batch.py):
reasoning is split off before scoring (by <think> or the run's recorded data.reasoning_tags) and kept in
predictions.jsonl; the standalone gate prints its labelled table and verdict; evaluating on the run's own
training data says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _support import MEMO_CHATS, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _memo_copy(memo_lora_dir, dest: Path, **data) -> Path:
    """A copy of the memorising adapter whose recipe.yaml records other data.* values."""
    shutil.copytree(memo_lora_dir, dest)
    recipe = yaml.safe_load((dest / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["data"].update(data)
    (dest / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def evals(tmp_path_factory, memo_lora_dir):
    root = tmp_path_factory.mktemp("eval_cli")
    predictions = write_jsonl(
        root / "predictions.jsonl",
        [
            {"prediction": "<think>\n5+6=11\n</think>\n\n答案是11。", "reference": "答案是11。"},
            {"prediction": "答案是12。", "reference": "答案是12。"},
            {"prediction": "<think>\n还在想", "reference": "答案是13。"},  # reasoning cut off by the length limit
        ],
    )
    # the memorised answers are "The sky is blue." and "A cat has four legs.": with the run's recorded tags
    # ("The", "is") the first opens with "reasoning" (" sky "), and its answer is "blue."
    tagged = _memo_copy(memo_lora_dir, root / "tagged", reasoning_tags=["The", "is"])
    data = write_jsonl(
        root / "qa.jsonl",
        [
            {"messages": [MEMO_CHATS[0][0], {"role": "assistant", "content": "blue."}]},
            {"messages": MEMO_CHATS[1]},
        ],
    )
    trained_on = yaml.safe_load((Path(memo_lora_dir) / "recipe.yaml").read_text(encoding="utf-8"))["data"]["train"]
    (root / "t.txt").write_text("The sky is blue.\nA cat has four legs.\n", encoding="utf-8")
    (root / "suite.yaml").write_text(
        "name: tiny_gate\ntasks:\n  - name: ppl\n    type: perplexity\n    data: t.txt\n", encoding="utf-8"
    )
    common = ["--history", "none", "--max-new-tokens", "12"]
    cases = {
        "predictions": ["eval", "--predictions", predictions, "--out", root / "p", "--history", "none"],
        "recorded_tags": ["eval", tagged, "--data", data, "--out", root / "t", *common],
        "training_data": ["eval", memo_lora_dir, "--data", trained_on, "--max-samples", "1", "--out", root / "d"]
        + common,
        "suite": ["eval", memo_lora_dir, "--suite", root / "suite.yaml", "--baseline", "tiny-llama"]
        + ["--out", root / "s", "--history", "none"],
    }
    spec = [{"name": k, "cwd": str(root), "argv": [str(a) for a in v]} for k, v in cases.items()]
    (root / "cases.json").write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_cli_batch.py"), str(root / "cases.json"), str(root / "results.json")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads((root / "results.json").read_text(encoding="utf-8"))


def _ok(results, name) -> dict:
    r = results[name]
    assert r["returncode"] == 0, r["stderr"][-3000:]
    return r


def test_reasoning_is_split_off_before_scoring_a_predictions_file(evals):
    root, results = evals
    r = _ok(results, "predictions")
    metrics = json.loads((root / "p" / "metrics.json").read_text(encoding="utf-8"))
    # answers 1 and 2 equal their references; the third never closed its reasoning: an empty answer
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["scored"] == {
        "what": "answer",
        "reasoning_tags": ["<think>", "</think>"],
        "with_reasoning": 2,
        "unfinished_reasoning": 1,
    }
    report = (root / "p" / "report.md").read_text(encoding="utf-8")
    assert "Scored: the answer after </think>" in report and "1 never closed" in report
    assert "Scored: the answer after </think>" in r["stdout"]


def test_the_runs_recorded_reasoning_tags_decide_what_is_scored(evals):
    root, results = evals
    _ok(results, "recorded_tags")
    metrics = json.loads((root / "t" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["exact_match"] == 1.0 and metrics["scored"]["reasoning_tags"] == ["The", "is"]
    rows = [json.loads(line) for line in (root / "t" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    # the text as generated stays; the reasoning and the scored answer are beside it
    assert rows[0]["prediction"] == "The sky is blue."
    assert rows[0]["reasoning"].strip() == "sky" and rows[0]["answer"] == "blue."
    assert "answer" not in rows[1] and rows[1]["prediction"] == "A cat has four legs."
    html = (root / "t" / "report.html").read_text(encoding="utf-8")
    assert "Scored: the answer after is; the reasoning in The…is of 1 of 2 predictions" in html


def test_evaluating_on_the_training_data_says_so(evals):
    root, results = evals
    r = _ok(results, "training_data")
    assert "is the data" in r["stderr"] and "was trained on (data.train)" in r["stderr"]
    report = json.loads((root / "d" / "report.json").read_text(encoding="utf-8"))
    assert "was trained on (data.train)" in report["generation"]["note"]
    assert "was trained on" in (root / "d" / "report.md").read_text(encoding="utf-8")
    assert "note" not in json.loads((root / "t" / "report.json").read_text(encoding="utf-8"))["generation"]


def test_the_standalone_gate_prints_labels_tolerance_and_verdict(evals):
    root, results = evals
    out = _ok(results, "suite")["stdout"]
    head = next(line for line in out.splitlines() if line.startswith("task"))
    assert head.split() == ["task", "metric", "baseline", "tuned", "delta", "tolerance", "verdict"]
    row = next(line for line in out.splitlines() if line.startswith("ppl"))
    assert "10% rel." in row and row.split()[-1] in ("ok", "REGRESSION")
    assert any(line.startswith("suite tiny_gate: ") for line in out.splitlines())
