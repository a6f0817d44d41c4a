"""`finetune pipeline`: stages chained by `${name}`, each in its own dir under output.dir; a re-run
skips the finished stages and trains the rest; a changed stage is not silently replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune import pipeline
from finetune.errors import OutputError, RecipeError

REPO = Path(__file__).resolve().parents[1]

PIPELINE = f"""\
output:
  dir: out
stages:
  sft:
    recipe: {REPO}/recipes/tiny/sft_lora.yaml
    data:
      eval_ratio: 0.0
    train:
      max_steps: 4
      per_device_train_batch_size: 4
  grpo:
    recipe: {REPO}/recipes/tiny/grpo_lora.yaml
    model:
      name_or_path: ${{sft}}
    train:
      max_steps: 2
      per_device_train_batch_size: 8
"""


def write(tmp_path: Path, text: str = PIPELINE) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    return path


def test_rerun_skips_finished_stages_and_trains_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path)
    # First run: the second stage fails (its reward model is missing) after the first has finished.
    with pytest.raises(RecipeError, match="not an `rm` output dir"):
        pipeline.run(pipeline.load(path, ["grpo.rewards.model=/nonexistent/rm"]))
    sft_dir = tmp_path / "out" / "sft"
    assert (sft_dir / "adapter_model.safetensors").is_file() and not (tmp_path / "out" / "grpo").exists()
    stamp = (sft_dir / "adapter_model.safetensors").stat().st_mtime_ns

    summary = pipeline.run(pipeline.load(path))
    assert {k: v["status"] for k, v in summary["stages"].items()} == {"sft": "skipped", "grpo": "trained"}
    grpo_recipe = (tmp_path / "out" / "grpo" / "recipe.yaml").read_text()
    assert f"name_or_path: {sft_dir}" in grpo_recipe  # ${sft} -> the sft stage's dir
    assert (sft_dir / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    pipe = pipeline.load(path)
    assert [line.split()[4] for line in pipeline.plan(pipe).splitlines()[1:]] == ["skip", "skip"]
    summary = pipeline.run(pipe)
    assert {v["status"] for v in summary["stages"].values()} == {"skipped"}
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text()) == summary

    # A changed first stage would retrain both: refused before anything trains, naming the change.
    assert "refused: pipeline stage sft" in pipeline.plan(pipeline.load(path, ["sft.train.max_steps=5"]))
    with pytest.raises(
        OutputError, match=r"sft: .* another recipe: train.max_steps: 4 -> 5\); set output.overwrite=true"
    ):
        pipeline.run(pipeline.load(path, ["sft.train.max_steps=5"]))
    assert (sft_dir / "adapter_model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "text, message",
    [
        (
            PIPELINE.replace("${sft}", "${stf}"),
            "pipe.yaml:11: stages.grpo: stage grpo: ${stf}: no earlier stage named 'stf'; did you mean 'sft'?",
        ),
        (PIPELINE.replace("  dir: out\n", ""), "pipe.yaml:1: output.dir: missing"),
        (
            PIPELINE.replace("    data:\n", "    dtaa:\n"),
            "pipe.yaml:4: stages.sft: stage sft: dtaa: unknown key; did you mean 'data'?",
        ),
        (
            PIPELINE.replace("max_steps: 2", "max_stepz: 2"),
            "stage grpo: override 'train.max_stepz=2': train.max_stepz: unknown key for GRPOConfig",
        ),
        (PIPELINE.replace("stages:", "stagez:"), "pipe.yaml:3: stagez: unknown key; did you mean 'stages'?"),
    ],
)
def test_bad_pipeline_is_a_one_line_error(tmp_path, text, message):
    with pytest.raises(RecipeError) as e:
        pipeline.load(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_overrides_reach_one_stage_or_every_stage(tmp_path):
    pipe = pipeline.load(
        write(tmp_path), ["output.dir=" + str(tmp_path / "elsewhere"), "grpo.train.max_steps=7", "train.seed=3"]
    )
    sft, grpo = pipe.stages
    assert grpo.recipe.train["max_steps"] == 7 and sft.recipe.train["max_steps"] == 4
    assert sft.recipe.train["seed"] == grpo.recipe.train["seed"] == 3
    assert sft.dir == tmp_path / "elsewhere" / "sft" and grpo.recipe.model.name_or_path == str(
        tmp_path / "elsewhere" / "sft"
    )
    with pytest.raises(RecipeError, match="override 'foo.bar=1': expected output.dir"):
        pipeline.load(write(tmp_path), ["foo.bar=1"])


def test_cli_dry_run_lists_the_stages_and_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    from finetune import cli

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path)
    assert cli.main(["pipeline", str(path), "sft.train.max_steps=3", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1:5] for line in lines[1:]] == [
        ["sft", "stage", "sft", "train"],
        ["grpo", "stage", "grpo", "train"],
    ]
    assert not (tmp_path / "out").exists()
    assert cli.main(["pipeline", str(path), "nope.x=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune: error: override 'nope.x=1': expected output.dir=") and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["dpo", "rlhf_ppo"])
def test_shipped_pipeline_runs_end_to_end_on_the_tiny_model(name, tmp_path, monkeypatch):
    """The shipped pipelines, 2 steps per stage: every stage chains and writes its output."""
    monkeypatch.chdir(REPO)  # their recipe paths are relative to the repository root
    pipe = pipeline.load(
        REPO / "recipes" / "pipelines" / f"{name}.yaml",
        [f"output.dir={tmp_path / name}", "train.max_steps=2", "train.report_to=[]"],
    )
    summary = pipeline.run(pipe)
    assert [s["status"] for s in summary["stages"].values()] == ["trained"] * len(pipe.stages)
    for stage in pipe.stages:
        assert (stage.dir / "adapter_model.safetensors").is_file() and (stage.dir / "README.md").is_file()
    if name == "dpo":  # a chained stage's output merges onto the SFT-merged base it trained on
        from finetune import merge

        report = merge.merge(str(pipe.stages[-1].dir), str(tmp_path / "merged"))
        assert report.max_delta <= 1e-4 and (tmp_path / "merged" / "config.json").is_file()
