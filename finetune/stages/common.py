"""Glue shared by the training stages: the TRL config from a recipe, the dry-run plan, and the
end of every run (`finish`: save what describes the output, swap it into place, evaluate)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field

import torch

from finetune import adapters, card, models, rewards, tiny
from finetune.config import RL_STAGES, TRAIN_EXTRA_KEYS, Recipe, trl_config_class
from finetune.errors import RecipeError
from finetune.outputs import ADAPTER_CONFIG, RunDir, record_base, write_text_atomic


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


def planned_steps(recipe: Recipe, n_examples: int, world: int) -> int:
    """Optimizer steps of the run: train.max_steps, or the epochs over the data."""
    t = recipe.train
    effective = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * world
    if t["max_steps"] > 0:
        return t["max_steps"]
    return math.ceil(math.ceil(n_examples / effective) * t["num_train_epochs"])


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
    def build(cls, recipe: Recipe, prepared) -> TrainPlan:
        t = recipe.train
        trl_args(recipe, "/nonexistent-dry-run")  # the TRL config accepts these values
        trainable, total = count_adapter_parameters(recipe)
        world = world_size()
        effective = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * world
        steps = planned_steps(recipe, len(prepared.train.encoded), world)
        return cls(recipe, trainable, total, prepared.train.stats(),
                   prepared.eval.stats() if prepared.eval else None, world, effective, steps,
                   [*getattr(prepared, "modes", []), *prepared.notes])

    def render(self) -> str:
        r, t = self.recipe, self.recipe.train
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "bf16" if t["bf16"] else "fp16" if t["fp16"] else "fp32"
        stage_origin = r.origins.get("stage", "recipe")
        lines = [
            f"plan for {r.source or 'recipe'} (dry run: nothing trained, nothing written)",
            f"  stage          {r.stage}" + ("" if stage_origin in ("recipe", "override") else f" ({stage_origin})"),
            f"  model          {r.model.name_or_path} -> {models.model_path(r.model)}",
            f"  adapter        {adapters.describe(r.adapter)}",
            f"  parameters     {self.trainable:,} trainable of {self.total:,} "
            f"({100 * self.trainable / max(self.total, 1):.3f}%)",
            f"  device         {device} x {self.world} process(es), {dtype}",
            f"  batch          {t['per_device_train_batch_size']} per device"
            f" x {t['gradient_accumulation_steps']} accumulation"
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
                    f"  {name:<14} {stats['examples']} {'prompts' if online else 'examples'} from {stats['records']} "
                    f"records; tokens/{'prompt' if online else 'example'} "
                    f"min {stats['length_min']} mean {stats['length_mean']} p50 {stats['length_p50']} "
                    f"p95 {stats['length_p95']} max {stats['length_max']}; {trained}"
                )
        lines += [f"  note           {n}" for n in self.notes]
        lines += origin_lines(r)
        return "\n".join(lines)


ORIGINS = ("override", "recipe", "method default", "stage default", "default")


def origin_lines(recipe: Recipe) -> list[str]:
    """Where each effective value came from, one line per source (recipe, override, method
    default, stage default, default), for the dry-run plan."""
    by_origin: dict[str, list[str]] = {}
    for dotted, origin in recipe.origins.items():
        if "." not in dotted:
            continue
        section, key = dotted.split(".", 1)
        value = recipe.train.get(key) if section == "train" else getattr(getattr(recipe, section, None), key, None)
        by_origin.setdefault(origin, []).append(f"{dotted}={value}")
    lines = []
    for origin in ORIGINS:
        if by_origin.get(origin):
            lines.append(f"  {origin + ':':<16}{', '.join(by_origin[origin])}")
    return lines


def keep_adapter_in_compute_dtype(model, recipe: Recipe) -> None:
    """SFTTrainer casts a quantized model's trainable weights to bf16 (the QLoRA paper's GPU
    recipe). With a float32 compute dtype (the CPU default) that only loses precision and
    mixes dtypes, so cast them back before the optimizer is built."""
    if recipe.adapter.method != "qlora":
        return
    dtype = models.resolve_dtype(recipe.adapter.compute_dtype)
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def finish(recipe: Recipe, run_dir: RunDir, trainer, prepared, metrics: dict) -> None:
    """Main process, after the weights are saved: the files that make the output describe itself
    (recipe, state, metrics, card; a chained stage's base.json), then the atomic swap into
    output.dir, then the recipe's `eval:` section (an eval failure never costs the training)."""
    from finetune.eval import after_training

    work = run_dir.work
    (work / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml holds the arguments
    trainer.state.save_to_json(str(work / "trainer_state.json"))
    write_text_atomic(work / "recipe.yaml", recipe.dump())
    # RL stages: the reward at the first and last logged steps
    metrics = {**metrics, **rewards.trend_metrics(recipe.stage, trainer.state.log_history)}
    card.write_metrics(work, metrics)
    model = getattr(trainer.model, "policy", trainer.model)  # PPO's trainer wraps the policy and its value model
    base = adapters.base_model_path(model)
    chained = record_base(work, run_dir.final, recipe.model.name_or_path)
    if chained is not None:  # name the original model, not this machine's merged copy in the cache
        base = tiny.resolve(chained["base"]) if tiny.is_tiny(chained["base"]) else chained["base"]
        _rename_base(work, base)
    write_text_atomic(work / "README.md", card.model_card(recipe, prepared, metrics, model, base, chained))
    if not recipe.output.keep_checkpoints:
        for ckpt in work.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    run_dir.finish()
    after_training(recipe, run_dir.final)  # the recipe's `eval:` section, if any (report + model card)


def _rename_base(work, base: str) -> None:
    """adapter_config.json's base_model_name_or_path -> `base` (PEFT wrote the merged copy's path)."""
    f = work / ADAPTER_CONFIG
    if f.is_file():
        cfg = json.loads(f.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = base
        write_text_atomic(f, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
