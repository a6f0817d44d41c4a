"""The rough edges a new user hits (issue 14): the gate's exit status and verdict table, BOM and
non-UTF-8 data files, permissions, trackers, dry runs after a finished run, chat, the CLI's
messages. Mostly in-process and model-free; what needs a model uses the shared tiny one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from _support import memo_recipe

ROWS = "instruction,input,output\n你好，请介绍一下北京。,,北京是中国的首都。\n今天天气怎么样？,,今天天气很好。\n"


def cli(capsys, *argv) -> tuple[int, str, str]:
    from finetune.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report(regressions: int) -> dict:
    rows = [
        {
            "task": "heldout_en",
            "metric": "perplexity",
            "baseline": 59.98,
            "tuned": 81.3 if regressions else 55.0,
            "delta": 21.32 if regressions else -4.98,
            "tolerance": 0.1,
            "relative": True,
            "higher_is_better": False,
            "regression": bool(regressions),
        },
        {
            "task": "knowledge_en",
            "metric": "acc",
            "baseline": 0.5,
            "tuned": 0.5,
            "delta": 0.0,
            "tolerance": 0.05,
            "relative": False,
            "higher_is_better": True,
            "regression": False,
        },
    ]
    return {"model": "m", "suite": {"name": "general", "rows": rows, "regressions": regressions}}


# ----------------------------------------------------------------------------- 1. the gate


def test_verdict_table_aligns_every_row_and_says_the_verdict():
    from finetune.eval.report import verdict_table

    table = verdict_table(_report(1)).splitlines()
    assert table[0].split() == ["task", "metric", "baseline", "tuned", "delta", "tolerance", "verdict"]
    assert table[1].split() == ["heldout_en", "perplexity", "59.98", "81.3", "+21.32", "10%", "rel.", "REGRESSION"]
    assert table[1].index("81.3") == table[0].index("tuned")  # columns line up
    assert table[-1] == "suite general: 1 regression"
    assert verdict_table(_report(0)).splitlines()[-1] == "suite general: passed (no regression)"
    assert verdict_table({"model": "m"}) == ""


@pytest.mark.parametrize("fail_on_regression, regressions, code", [(True, 1, 1), (True, 0, 0), (False, 1, 0)])
def test_train_exits_1_on_a_regression_only_with_fail_on_regression(
    tmp_path, capsys, monkeypatch, fail_on_regression, regressions, code
):
    """The run's output is finished and kept; the exit status (and one line) says the gate failed."""
    from finetune.stages import sft

    out = tmp_path / "out"

    def fake_run(recipe):
        (out / "eval").mkdir(parents=True)
        (out / "eval" / "report.json").write_text(json.dumps(_report(regressions)))
        return out

    monkeypatch.setattr(sft, "run", fake_run)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({**yaml.safe_load(memo_recipe(tmp_path)), "eval": {"fail_on_regression": fail_on_regression}})
    )
    got, _, err = cli(capsys, "train", recipe)
    assert got == code, err
    if code:
        assert "error: eval.fail_on_regression: 1 regression (heldout_en perplexity)" in err
        assert str(out) in err and out.is_dir()


def test_the_verdict_table_is_printed_at_the_end_of_a_run(tmp_path, monkeypatch, caplog):
    import logging

    from finetune import config
    from finetune.eval import hook

    def fake_evaluate(recipe, cfg, output_dir, heldout=None):
        (output_dir / "eval").mkdir(parents=True)
        (output_dir / "eval" / "report.json").write_text(json.dumps(_report(1)))
        return "\n## Evaluation\n"

    monkeypatch.setattr(hook, "_evaluate", fake_evaluate)
    recipe = config.load(text=memo_recipe(tmp_path), overrides=["eval.suite=eval/suites/general.yaml"])
    logger = logging.getLogger("finetune")  # the CLI may have stopped it propagating (an earlier test's run)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="finetune"):
            hook.run(recipe, tmp_path / "out")
    finally:
        logger.removeHandler(caplog.handler)
    text = caplog.text
    assert (
        re.search(r"heldout_en +perplexity +59.98 +81.3 +\+21.32", text)
        and "REGRESSION" in text
        and "suite general: 1 regression" in text
    )


def test_fail_on_regression_fails_closed_when_eval_did_not_finish(tmp_path):
    from finetune import config
    from finetune.eval.hook import gate_failure

    recipe = config.load(text=memo_recipe(tmp_path), overrides=["eval.fail_on_regression=true"])
    assert "did not finish" in gate_failure(recipe, tmp_path / "nothing-here")
    assert gate_failure(config.load(text=memo_recipe(tmp_path)), tmp_path) is None  # no eval section


# ----------------------------------------------------------------------------- 2. encodings


def _read(path: Path, encoding=None):
    from finetune.data import sources

    return [r.data for r in sources.read(sources.Source(str(path), path=path), encoding)]


def test_utf8_bom_csv_and_json_read_as_plain_utf8(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the first column keeps its name."""
    (tmp_path / "plain.csv").write_text(ROWS, encoding="utf-8")
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + ROWS.encode())
    assert _read(tmp_path / "excel.csv") == _read(tmp_path / "plain.csv")
    assert _read(tmp_path / "excel.csv")[0]["instruction"] == "你好，请介绍一下北京。"
    record = {"instruction": "你好", "output": "你好！"}
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record], ensure_ascii=False).encode())
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(record, ensure_ascii=False).encode() + b"\n")
    assert _read(tmp_path / "a.json") == _read(tmp_path / "a.jsonl") == [record]


def test_gbk_csv_is_one_line_naming_file_line_and_encoding_and_data_encoding_reads_it(tmp_path, capsys):
    from finetune.errors import DataError

    gbk = tmp_path / "zh.csv"
    gbk.write_bytes(ROWS.encode("gbk"))
    with pytest.raises(DataError) as e:
        _read(gbk)
    assert str(e.value) == (
        f"{gbk}:2: byte 0xc4 is not UTF-8 text; it looks like gb18030 (GBK): "
        "set data.encoding=gb18030 or save the file as UTF-8"
    )
    assert _read(gbk, "gb18030") == _read(gbk, "gbk")
    assert _read(gbk, "gb18030")[1]["output"] == "今天天气很好。"
    # through the CLI: exit 2, one line, no traceback; then the recipe key fixes it
    recipe = tmp_path / "r.yaml"
    recipe.write_text(memo_recipe(tmp_path, data={"train": str(gbk), "format": "alpaca"}))
    code, _, err = cli(capsys, "train", recipe, "--dry-run")
    assert code == 2 and err.strip().splitlines() == [f"finetune: error: {e.value}"]
    code, out, err = cli(capsys, "train", recipe, "--dry-run", "data.encoding=gb18030")
    assert code == 0, err
    assert "2 examples from 2 records" in out
    code, _, err = cli(capsys, "train", recipe, "--dry-run", "data.encoding=klingon")
    assert code == 2 and "data.encoding: unknown encoding 'klingon'" in err


# ----------------------------------------------------------------------------- 4. permissions


@pytest.fixture
def umask():
    """Set a umask for one test and restore it."""
    import os

    saved = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(saved)


def _private_output(parent: Path) -> Path:
    """A finished dir as the libraries leave it: mkdtemp's 0700 dir, safetensors' 0600 file, a script."""
    import os
    import tempfile

    d = Path(tempfile.mkdtemp(dir=parent))
    (d / "sub").mkdir(mode=0o700)
    (d / "sub" / "model.safetensors").write_bytes(b"x")
    os.chmod(d / "sub" / "model.safetensors", 0o600)
    (d / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(d / "run.sh", 0o700)
    return d


@pytest.mark.parametrize(
    "mask, dirs, files, scripts",
    [(0o022, 0o755, 0o644, 0o755), (0o077, 0o700, 0o600, 0o700), (0o002, 0o775, 0o664, 0o775)],
)
def test_finished_outputs_follow_the_umask(tmp_path, umask, mask, dirs, files, scripts):
    import os

    from finetune.outputs import RunDir, replace_dir
    from finetune.staging import Staged

    umask(mask)

    def mode(p):
        return p.stat().st_mode & 0o777

    replace_dir(_private_output(tmp_path), tmp_path / "out")
    run = RunDir(tmp_path / "run")
    run.start("stage: sft\n")
    (run.work / "adapter_model.safetensors").write_bytes(b"x")
    os.chmod(run.work / "adapter_model.safetensors", 0o600)
    run.finish()
    with Staged(tmp_path / "model.gguf", overwrite=False, file=True) as tmp:
        (tmp / "model.gguf").write_bytes(b"GGUF")
        os.chmod(tmp / "model.gguf", 0o600)
    out = tmp_path / "out"
    assert [mode(p) for p in (out, out / "sub", out / "sub" / "model.safetensors", out / "run.sh")] == [
        dirs,
        dirs,
        files,
        scripts,
    ]
    assert mode(tmp_path / "run") == dirs and mode(tmp_path / "run" / "adapter_model.safetensors") == files
    assert mode(tmp_path / "model.gguf") == files


# ----------------------------------------------------------------------------- 6. trackers


def test_a_tracker_that_is_not_installed_fails_at_load_before_any_dir(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(memo_recipe(tmp_path))
    for argv in (["--dry-run"], []):
        code, _, err = cli(capsys, "train", recipe, *argv, "train.report_to=[wandb]")
        assert code == 2
        assert err.strip().splitlines() == [
            (
                "finetune: error: override 'train.report_to=[wandb]': train.report_to: "
                "wandb is not installed; `pip install wandb`, or remove it from train.report_to"
            )
        ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memo.jsonl", "r.yaml"]  # no out.incomplete
    code, _, err = cli(capsys, "train", recipe, "--dry-run", "train.report_to=[tensorbord]")
    assert code == 2 and "unknown tracker 'tensorbord'; did you mean 'tensorboard'?" in err


def test_the_recipe_docs_list_the_trackers():
    from _support import REPO

    readme = (REPO / "docs" / "recipes.md").read_text()
    for name in ("wandb", "mlflow", "trackio", "tensorboard"):
        assert f"| `{name}`" in readme and f"pip install {name}" in readme


# ----------------------------------------------------------------------------- 7. dry run after a finished run


def test_dry_run_after_a_finished_run_plans_and_notes_the_existing_output(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(memo_recipe(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text("stage: sft\n")
    code, plan, err = cli(capsys, "train", recipe, "--dry-run")
    assert code == 0, err
    assert "  steps          40 " in plan
    assert (
        f"  note           {out} already holds a finished run: a real run would refuse; "
        "set output.overwrite=true to replace it, or choose another output.dir"
    ) in plan
    code, plan, _ = cli(capsys, "train", recipe, "--dry-run", "output.overwrite=true")
    assert code == 0 and "a real run would replace it when it finishes" in plan
    code, _, err = cli(capsys, "train", recipe, "train.max_steps=1")  # a real run still refuses, before any work
    assert code == 2 and "exists and is not empty" in err
    (tmp_path / "out.incomplete" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out.incomplete" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    code, plan, _ = cli(capsys, "train", recipe, "--dry-run")
    assert "a real run resumes from checkpoint-3" in plan


# ----------------------------------------------------------------------------- 14. the CLI


def test_train_and_pipeline_without_a_file_say_what_to_give(capsys):
    code, _, err = cli(capsys, "train")
    assert code == 2
    assert err.splitlines()[0] == (
        "finetune train: give a recipe YAML file, e.g. finetune train "
        "recipes/tiny/sft_lora.yaml [section.key=value ...] [--dry-run]"
    )
    assert "recipes/tiny/sft_dora.yaml" in err.splitlines()[1] and "override" not in err
    code, _, err = cli(capsys, "pipeline")
    assert code == 2 and "recipes/pipelines/dpo.yaml" in err


@pytest.mark.parametrize(
    "override, hint",
    [
        ("max_steps=5", "max_steps: unknown section; did you mean 'train.max_steps'?"),
        ("learning_rat=1e-3", "learning_rat: unknown section; did you mean 'train.learning_rate'?"),
        ("dir=x", "dir: unknown section; did you mean 'output.dir'?"),
        ("adapter.rank=4", "adapter.rank: unknown key; did you mean 'r'?"),
        ("adapter.lora_rank=4", "adapter.lora_rank: unknown key; did you mean 'r'?"),
        ("adapter.lora_alpha=4", "adapter.lora_alpha: unknown key; did you mean 'alpha'?"),
    ],
)
def test_misplaced_and_foreign_keys_get_a_suggestion(tmp_path, override, hint):
    from finetune import config
    from finetune.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        config.load(text=memo_recipe(tmp_path), overrides=[override])
    assert str(e.value).startswith(f"override '{override}': {hint}")


def test_version_and_env_name_the_libraries(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit):
        cli(capsys, "--version")
    line = capsys.readouterr().out.strip()
    for lib in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        assert f"{lib} {metadata.version(lib)}" in line
    code, out, _ = cli(capsys, "env")
    rows = dict(line.split(None, 1) for line in out.splitlines() if len(line.split(None, 1)) == 2)
    assert code == 0 and rows["bitsandbytes"] == metadata.version("bitsandbytes")
    assert rows["CUDA"].startswith(("not available", "1", "2")) and "CPU features" in out
    assert out.count("\n") > 15 and "finetune cache" in out


def test_counts_agree_with_their_nouns():
    from finetune.errors import plural
    from finetune.eval.report import markdown

    assert [
        plural(1, "example"),
        plural(2, "run"),
        plural(1, "process", "processes"),
        plural(3, "process", "processes"),
    ] == ["1 example", "2 runs", "1 process", "3 processes"]
    text = markdown({**_report(1), "history_file": "h.jsonl", "history_runs": 1})
    assert "**1 regression**" in text and "(1 run)" in text


# ----------------------------------------------------------------------------- 9. the terminal during a run


def test_log_lines_are_plain_numbers():
    from finetune.stages.common import log_line

    assert log_line(
        {
            "loss": 5.0884,
            "grad_norm": 1.3531,
            "learning_rate": 2e-3,
            "num_tokens": 700.0,
            "epoch": 0.05556,
            "total_flos": 123.0,
        },
        1,
        12,
    ) == ("step 1/12  loss 5.088  grad_norm 1.353  learning_rate 0.002  num_tokens 700  epoch 0.05556")
    assert (
        log_line({"eval_loss": 17171.0, "eval_runtime": 0.3, "eval_samples_per_second": 45.0}, 12, 12)
        == "eval (step 12/12)  loss 1.717e+04"
    )
    assert log_line({"train_runtime": 5.04, "train_loss": 3.981}, 12, 12) == "train done  runtime 5.04  loss 3.981"


def test_a_piped_run_prints_a_summary_plain_lines_an_eval_curve_the_final_eval_loss_and_a_card(tmp_path, capsys):
    """stderr is not a terminal here (captured): no \\r or escape codes; with a held-out split the eval
    loss is logged during training (TensorBoard gets a curve), and the final one is printed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(memo_recipe(tmp_path, steps=10, data={"eval_ratio": 0.25}))
    code, _, err = cli(capsys, "train", recipe)
    assert code == 0, err
    assert "\r" not in err and "\x1b" not in err and "{'loss'" not in err
    lines = err.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("finetune: training: sft, lora r=16")))
    assert lines[start + 1].startswith("  parameters  ") and " trainable of " in lines[start + 1]
    assert lines[start + 2] == "  data        3 examples, 1 held out for eval; 10 steps of 4 (1 process)"
    assert lines[start + 3] == "  parallel    single process, batch 4 per device x 1 accumulation = 4 per step"
    assert (
        lines[start + 4]
        == f"  writing     {tmp_path / 'out.incomplete'} (renamed to {tmp_path / 'out'} when finished)"
    )
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # eval_steps 0.1 of 10 steps
    train_loss = next(h["train_loss"] for h in state["log_history"] if "train_loss" in h)
    assert f"finetune: final: train loss {train_loss:.4g}, eval loss {evals[-1]['eval_loss']:.4g}" in lines
    assert sum(line.startswith("eval (step 10/10)") for line in lines) == 1  # the end is evaluated once

    # 13. the card: metadata through huggingface_hub, no cache path, the file dataset and its languages,
    # metrics without runtime noise; a merged model keeps that provenance
    from huggingface_hub import ModelCard

    from finetune.merge import merge

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None  # tiny-llama is not a hub id (and never its cache path)
    assert card.data.datasets == ["memo.jsonl"] and card.data.language == ["en", "zh"]
    assert card.data.library_name == "peft" and "sft" in card.data.tags
    assert "| train_loss |" in card.text and "runtime" not in card.text and "per_second" not in card.text
    merge(str(tmp_path / "out"), str(tmp_path / "merged"))
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert merged.data.datasets == ["memo.jsonl"] and merged.data.language == ["en", "zh"]
    assert merged.data.base_model is None and "/tinycache" not in str(merged.data.to_dict())
    provenance = merged.text.split("## Provenance", 1)[1]
    for section in ("#### Data", "#### Hyper-parameters", "#### Final metrics", f"### From `{tmp_path / 'out'}`"):
        assert section in provenance, section
    assert f"{train_loss:.4g}" in provenance


def test_hub_ids_and_languages_for_cards(tmp_path):
    from finetune.card import detect_languages, hub_id

    assert hub_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct" and hub_id("gpt2") == "gpt2"
    assert hub_id("tiny-llama") is None and hub_id(str(tmp_path)) is None and hub_id("./local/model") is None
    assert detect_languages(["北京是中国的首都。", "今天天气很好。"]) == ["zh"]
    assert detect_languages(["The sky is blue.", "天空是蓝色的。"]) == ["en", "zh"]


# ----------------------------------------------------------------------------- 10. preview --tokens


def test_preview_tokens_show_text_not_byte_level_mojibake():
    """A byte-level BPE that never saw Chinese splits '你好' into byte tokens (spelt 'ä½ł' in its vocab):
    each token shows the text it stands for, a character's fragment shows its bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from finetune.data.preview import _token_bytes, token_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["hello world"] * 20 + ["我"],
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = tok("我 hello 你好")["input_ids"]
    shown = [token_text(tok, i) for i in ids]
    assert shown[0] == "'我'" and "'hello'" in shown
    assert "bytes e4 bd (part of a character)" in shown or "bytes e4 (part of a character)" in shown, shown
    assert not any("ä" in s for s in shown)
    assert b"".join(_token_bytes(tok.convert_ids_to_tokens(i)) or b"" for i in ids).decode() == "我 hello 你好"
    assert _token_bytes("<0xE4><0xBD>") == b"\xe4\xbd" and _token_bytes("▁hello") is None


# ----------------------------------------------------------------------------- 11. Ctrl-C


@pytest.mark.parametrize(
    "argv, says",
    [
        (
            ["eval", "tiny-llama", "--data", "x.jsonl", "--out", "o"],
            "nothing was written to --out; run it again (evaluation has no checkpoints)",
        ),
        (["train", "r.yaml"], "run the same command again to resume from the last checkpoint"),
        (["merge", "a", "--out", "o"], "nothing was written to --out"),
    ],
)
def test_ctrl_c_says_what_it_means_for_that_command(monkeypatch, capsys, argv, says):
    from finetune import cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, f"cmd_{argv[0]}", interrupted)
    code, _, err = cli(capsys, *argv)
    assert code == 130 and err.strip() == f"finetune: interrupted; {says}" + (
        " (train.save_steps apart)" if argv[0] == "train" else ""
    )


# ----------------------------------------------------------------------------- 8. progress


def test_generation_and_tiny_build_progress_print_a_line_every_tenth_when_piped(capsys):
    from finetune import tiny
    from finetune.eval import generation

    progress = generation._Progress(40)
    for _ in range(10):
        progress.update(4)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" answers")[0] for line in lines] == [f"finetune: generated {n}/40" for n in range(4, 41, 4)]
    assert all(line.endswith("answers/s)") for line in lines)
    quiet = generation._Progress(3)  # chat and probes: no noise
    quiet.update(3)
    build = tiny._Progress("tiny-llama", 300)
    for step in range(1, 301):
        build.update(step, 2.0)
    assert capsys.readouterr().err.count("\n") == 10
    assert tiny.BUILD_THREADS == 1


# ----------------------------------------------------------------------------- 12. report.html


def test_report_page_samples_panels_and_a_trend_only_from_two_comparable_runs(tmp_path):
    import base64

    from finetune.eval import report

    rows = _report(1)["suite"]["rows"]
    rep = {**_report(1), "history_file": "h.jsonl"}
    rep["suite"]["baseline"] = {"x": 1}
    predictions = [
        {"prompt": "<|user|>\nQ1\n<|assistant|>\n", "prediction": "Cats have four legs.", "reference": "Apples."},
        {"prompt": "<|user|>\nQ2\n<|assistant|>\n", "prediction": "The sky is blue.", "reference": "The sky is blue."},
        {"prompt": "<|user|>\n问\n<|assistant|>\n", "prediction": "北京是中国的首都。", "reference": "北京是首都。"},
    ]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    run = {"suite": "general", "data": None, "metrics": {"heldout_en/perplexity": 60.0}}
    other = {
        "suite": None,
        "data": "x.jsonl",
        "metrics": {"generation/bleu": 3.0},
    }  # measured otherwise: not in the trend
    report.write(tmp_path, rep, None, [other, run])
    page = (tmp_path / "report.html").read_text()
    assert "Gate: 1 regression" in page and "first run measured this way" in page and 'alt="History"' not in page
    worst = page.split("<h2>Worst predictions</h2>")[1].split("</table>")[0]
    best = page.split("<h2>Best predictions</h2>")[1].split("</table>")[0]
    assert "Cats have four legs." in worst and "The sky is blue." not in worst and "北京" not in worst
    assert "The sky is blue." in best and "Cats" not in best
    report.write(tmp_path, rep, None, [run, other, run])
    page = (tmp_path / "report.html").read_text()
    assert "2 runs measured the same way" in page
    images = dict(re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page))
    assert set(images) == {"Baseline vs tuned", "History"}
    assert report.comparable_runs([run, other, run], rep) == [run, run]
    # one panel per metric: the figure is as wide as its panels (4 to a row, 2.6 inches each at 90 dpi)
    import struct

    width = struct.unpack(">I", base64.b64decode(images["Baseline vs tuned"])[16:20])[0]
    assert width > len(rows) * 2.6 * 90 * 0.8


# ----------------------------------------------------------------------------- 16. README_zh.md


def test_chinese_readme_keeps_in_step_with_the_english_one():
    """Every command of the English CLI reference, every data format and every path it names exists in README_zh."""

    from _support import REPO

    from finetune.config import DATA_FORMATS

    en, zh = (REPO / "README.md").read_text(), (REPO / "README_zh.md").read_text()
    assert "[中文](README_zh.md)" in en and "[English](README.md)" in zh
    cli_reference = en.split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    commands = set(re.findall(r"^\| `finetune (\w+)", cli_reference, flags=re.MULTILINE))
    assert commands and all(f"`finetune {c}" in zh for c in commands), commands
    assert all(f"`{fmt}`" in zh for fmt in DATA_FORMATS)
    for path in re.findall(r"`((?:recipes|data|eval)/[\w./-]+\.(?:yaml|md))`", zh):
        assert (REPO / path).is_file(), path
    assert zh.splitlines()[0].startswith("# finetune") and "finetune train recipes/tiny/sft_lora.yaml" in zh
