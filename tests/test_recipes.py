"""Every shipped recipe parses, validates, and opens with the command that runs it."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from finetune import config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAIN_RECIPES = sorted(
    p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.parts and "pipelines" not in p.parts
)
PIPELINES = sorted((RECIPES / "pipelines").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def test_there_are_recipes():
    names = {str(p.relative_to(RECIPES)) for p in TRAIN_RECIPES}
    assert {"tiny/sft_lora.yaml", "tiny/sft_qlora.yaml", "tiny/sft_dora.yaml"} <= names
    assert {"cpu_ddp.yaml", "fsdp.yaml", "deepspeed_zero3.yaml", "multi_node.yaml"} <= {
        p.name for p in ACCELERATE_CONFIGS
    }


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates_and_opens_with_its_command(path):
    recipe = config.load(path)
    assert recipe.stage in config.STAGES
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(RECIPES.parent)
    assert first.startswith("# finetune train ") or first.startswith("# accelerate launch "), first
    assert first.endswith(str(rel)), f"{rel}: first line runs another file: {first}"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_valid_and_opens_with_its_command(path):
    cfg = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
    assert cfg.num_processes >= 1
    first = path.read_text().splitlines()[0]
    assert "accelerate launch" in first and f"recipes/accelerate/{path.name}" in first


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_validates_every_stage_and_opens_with_its_command(path, monkeypatch):
    from finetune import pipeline

    monkeypatch.chdir(RECIPES.parent)  # its recipe paths are relative to the repository root
    pipe = pipeline.load(path)
    assert len(pipe.stages) >= 2 and pipe.stages[0].recipe.stage == "sft"
    assert path.read_text().splitlines()[0] == f"# finetune pipeline {path.relative_to(RECIPES.parent)}"
