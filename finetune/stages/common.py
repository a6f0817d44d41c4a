"""Glue shared by the training stages: the TRL config from a recipe, and the dry-run plan."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from finetune import adapters, models
from finetune.config import TRAIN_EXTRA_KEYS, Recipe, trl_config_class
from finetune.errors import RecipeError, plural
from finetune.rewards import RL_STAGES


def trl_args(recipe: Recipe, output_dir):
    """The stage's TRL config (SFTConfig, ...) from the recipe's effective `train` section."""
    kwargs = {k: v for k, v in recipe.train.items() if k not in TRAIN_EXTRA_KEYS}
    kwargs.update(output_dir=str(output_dir), use_cpu=not torch.cuda.is_available())
    cls = trl_config_class(recipe.stage)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        message = "; ".join(line.strip(" -") for line in str(e).strip().splitlines() if line.strip())
        raise RecipeError(f"{recipe.source or 'recipe'}: train: {message}") from None


def world_size() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


def count_adapter_parameters(recipe: Recipe) -> tuple[int, int]:
    """(trainable, total) for the recipe's model + adapter, built on the meta device (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    cfg = AutoConfig.from_pretrained(models.model_path(recipe.model), revision=recipe.model.revision,
                                     trust_remote_code=recipe.model.trust_remote_code)
    auto, task_type = AutoModelForCausalLM, None
    if recipe.stage == "rm":  # a reward model: a score head (trained in full) instead of lm_head
        cfg.num_labels, auto, task_type = 1, AutoModelForSequenceClassification, "SEQ_CLS"
    with init_empty_weights():
        model = auto.from_config(cfg, trust_remote_code=recipe.model.trust_remote_code)
        model = adapters.for_counting(model, recipe.adapter, task_type)
    return models.count_parameters(model)


def output_notes(recipe: Recipe) -> list[str]:
    """What a real run would do with what is already at output.dir (for the dry-run plan)."""
    from finetune.outputs import RunDir, is_nonempty_dir

    run_dir = RunDir(recipe.output.dir, recipe.output.overwrite, recipe.train["resume"])
    notes = []
    if run_dir.final.exists() and not run_dir.final.is_dir():
        notes.append(f"{run_dir.final} exists and is not a directory: a real run would refuse; choose another output.dir")
    elif is_nonempty_dir(run_dir.final):
        finished = "a finished run" if (run_dir.final / "recipe.yaml").is_file() else "files"
        notes.append(f"{run_dir.final} already holds {finished}: a real run would " + (
            "replace it when it finishes (output.overwrite=true)" if recipe.output.overwrite else
            "refuse; set output.overwrite=true to replace it, or choose another output.dir"))
    checkpoint = run_dir.resume_from() if run_dir.work.is_dir() else None
    if checkpoint is not None:
        notes.append(f"an interrupted run is in {run_dir.work}: a real run resumes from {checkpoint.name}")
    return notes


def planned_steps(recipe: Recipe, n_examples: int, world: int) -> int:
    """Optimizer steps of the run: train.max_steps, or the epochs over the data."""
    t = recipe.train
    effective = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * world
    return t["max_steps"] if t["max_steps"] > 0 else math.ceil(math.ceil(n_examples / effective) * t["num_train_epochs"])


@dataclass
class TrainPlan:
    recipe: Recipe
    trainable: int
    total: int
    train_stats: dict
    eval_stats: dict | None
    world: int
    effective_batch: int
    steps: int
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, recipe: Recipe, prepared) -> "TrainPlan":
        t = recipe.train
        trl_args(recipe, "/nonexistent-dry-run")  # the TRL config accepts these values
        trainable, total = count_adapter_parameters(recipe)
        world = world_size()
        effective = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * world
        steps = planned_steps(recipe, len(prepared.train.encoded), world)
        notes = list(prepared.notes) + output_notes(recipe)
        return cls(recipe, trainable, total, prepared.train.stats(),
                   prepared.eval.stats() if prepared.eval else None, world, effective, steps, notes)

    def render(self) -> str:
        r, t = self.recipe, self.recipe.train
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "bf16" if t["bf16"] else "fp16" if t["fp16"] else "fp32"
        lines = [
            f"plan for {r.source or 'recipe'} (dry run: nothing trained, nothing written)",
            f"  stage          {r.stage}",
            f"  model          {r.model.name_or_path} -> {models.model_path(r.model)}",
            f"  adapter        {adapters.describe(r.adapter)}",
            f"  parameters     {self.trainable:,} trainable of {self.total:,} ({100 * self.trainable / max(self.total, 1):.3f}%)",
            f"  device         {device} x {plural(self.world, 'process', 'processes')}, {dtype}",
            f"  batch          {t['per_device_train_batch_size']} per device x {t['gradient_accumulation_steps']} accumulation"
            f" x {self.world} = {self.effective_batch} per step",
            f"  steps          {self.steps} (lr {t['learning_rate']:g}, {t['lr_scheduler_type']})",
            f"  output         {r.output.dir}",
        ]
        online = r.stage in RL_STAGES  # prompts only: the trained tokens are generated during training
        for name, stats in (("train", self.train_stats), ("eval", self.eval_stats)):
            if stats:
                trained = ("prompts only (answers are generated and scored during training)" if online else
                           f"{stats['trained_tokens']} of {stats['tokens']} tokens trained "
                           f"({100 * stats['trained_tokens'] / max(stats['tokens'], 1):.0f}%)")
                lines.append(
                    f"  {name:<14} {plural(stats['examples'], 'prompt' if online else 'example')} from "
                    f"{plural(stats['records'], 'record')}; tokens/{'prompt' if online else 'example'} "
                    f"min {stats['length_min']} mean {stats['length_mean']} p50 {stats['length_p50']} "
                    f"p95 {stats['length_p95']} max {stats['length_max']}; {trained}"
                )
        lines += [f"  note           {n}" for n in self.notes]
        return "\n".join(lines)
