"""Glue shared by the training stages: the TRL config from a recipe, the dry-run plan, and the
end of every run (`finish`: save what describes the output, swap it into place, evaluate)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune import adapters, card, loading, rewards, tiny
from finetune.config import RL_STAGES, TRAIN_EXTRA_KEYS, Recipe, trl_config_class
from finetune.errors import RecipeError, plural
from finetune.outputs import ADAPTER_CONFIG, RunDir, record_base, write_text_atomic

log = logging.getLogger("finetune")


def check_throughput_features(recipe: Recipe) -> None:
    """Packing, Liger kernels and vLLM generation: where they would be wrong or cannot run here, one line before
    anything loads (not a leak between packed examples, a Triton or an import traceback mid-run)."""
    import importlib.util

    from finetune.data.packing import PACKING_ATTENTION

    t, where = recipe.train, recipe.source or "recipe"
    attn = recipe.model.attn_implementation
    if t.get("packing") and attn and attn not in PACKING_ATTENTION:
        raise RecipeError(
            f"{where}: train.packing with model.attn_implementation={attn}: packed examples would attend to each "
            f"other (only {', '.join(PACKING_ATTENTION)} keep them apart by position_ids)"
        )
    wants = [
        ("use_liger_kernel", "Liger's fused kernels (Triton)", "liger_kernel", "liger"),
        ("use_vllm", "vLLM generation", "vllm", "vllm"),
    ]
    for key, what, module, extra in wants:
        if not t.get(key):
            continue
        if not torch.cuda.is_available():
            raise RecipeError(f"{where}: train.{key}: {what} needs a CUDA GPU and this machine has none; drop it here")
        if importlib.util.find_spec(module) is None:
            raise RecipeError(
                f"{where}: train.{key}: {what} needs the {module} package: pip install 'finetune[{extra}]'"
            )
    if t.get("use_vllm") and recipe.adapter.method == "qlora":
        raise RecipeError(
            f"{where}: train.use_vllm with adapter.method=qlora: TRL 1.12 syncs a LoRA policy to vLLM by merging the "
            "adapter into the 4-bit base weights each step, which re-quantizes them; use adapter.method=lora "
            "(a 16-bit base) with vLLM, or TRL's own generation with QLoRA"
        )


def accelerated_notes(recipe: Recipe) -> list[str]:
    """What the plan says about Liger and vLLM when they are on."""
    t, notes = recipe.train, []
    if t.get("use_liger_kernel"):
        notes.append(
            "Liger kernels: fused linear cross-entropy (no full logits); the per-step entropy metric is not logged, "
            "token accuracy comes from the kernel"
        )
    if t.get("use_vllm"):
        notes.append(
            f"vLLM generation ({t.get('vllm_mode', 'colocate')} mode); the LoRA adapter is merged for each sync"
        )
    return notes


def packing_notes(recipe: Recipe, prepared) -> list[str]:
    """train.packing: how many rows the examples become (as TRL's best-fit decreasing packs them)."""
    from finetune.data.packing import packed_rows

    t = recipe.train
    if recipe.stage != "sft" or not t.get("packing") or not hasattr(prepared.train, "table"):
        return []
    lengths = prepared.train.table.with_format("arrow")["length"].to_numpy()
    rows = packed_rows(lengths, t["max_length"])
    fill = lengths.sum() / max(rows * t["max_length"], 1)
    return [
        f"packing: {len(lengths):,} examples -> {rows:,} rows of up to {t['max_length']} tokens "
        f"({fill:.0%} full; padding-free, each example attends only to itself)"
    ]


def trl_args(recipe: Recipe, output_dir):
    """The stage's TRL config (SFTConfig, ...) from the recipe's effective `train` section."""
    check_launch(recipe)
    check_throughput_features(recipe)
    kwargs = {k: v for k, v in recipe.train.items() if k not in TRAIN_EXTRA_KEYS}
    kwargs.update(output_dir=str(output_dir), use_cpu=not torch.cuda.is_available())
    cls = trl_config_class(recipe.stage)
    if recipe.model.chat_template_kwargs and "chat_template_kwargs" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["chat_template_kwargs"] = dict(recipe.model.chat_template_kwargs)  # GRPO, RLOO render prompts
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        message = "; ".join(line.strip(" -") for line in str(e).strip().splitlines() if line.strip())
        raise RecipeError(f"{recipe.source or 'recipe'}: train: {message}") from None


# ----------------------------------------------------------------------------- under accelerate launch


def _recipe_precision(recipe: Recipe) -> str:
    return "bf16" if recipe.train["bf16"] else "fp16" if recipe.train["fp16"] else "no"


def check_launch(recipe: Recipe) -> None:
    """What `accelerate launch` asks for, checked against the recipe before anything is written.

    The precision rule: the recipe's `train.bf16` / `train.fp16` decide. An accelerate config whose
    `mixed_precision` names another precision (it reaches us as ACCELERATE_MIXED_PRECISION) is overridden,
    with one log line naming both; `mixed_precision: 'no'` means "not set" and never conflicts. Without this,
    a DeepSpeed config saying bf16 and a recipe saying fp32 stop on DeepSpeed's own mismatch check.
    FSDP1 (`fsdp_version: 1`) is refused in one line: only FSDP2 is tested (FSDP1 refuses a CPU, in torch
    and in accelerate, so CI cannot run it) and FSDP2 is what accelerate recommends."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise RecipeError(
            "accelerate config: fsdp_config.fsdp_version is 1 (FSDP1), which finetune does not support; "
            "set fsdp_version: 2 (see recipes/accelerate/fsdp.yaml)"
        )
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    ours = _recipe_precision(recipe)
    if asked not in ("no", ours):
        log.warning(
            "precision: %s says train.bf16=%s, train.fp16=%s (%s); the accelerate config's mixed_precision: %s "
            "is overridden (the recipe decides, docs/distributed.md)",
            recipe.source or "the recipe",
            str(recipe.train["bf16"]).lower(),
            str(recipe.train["fp16"]).lower(),
            {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[ours],
            asked,
        )
        os.environ["ACCELERATE_MIXED_PRECISION"] = ours


@dataclass
class Parallelism:
    """The distributed mode in force: what the plan and the start summary say."""

    mode: str  # single process, DDP, FSDP2, ZeRO-2, ...
    world: int
    machines: int
    sharded: str
    warning: str = ""

    @classmethod
    def of(cls, live: bool = False) -> Parallelism:
        """`live`: from the trainer's accelerator state (a run, once the trainer is built); else as accelerate
        will decide it (a dry run): FSDP only where `PartialState` reports a GPU-type backend (accelerate's own
        rule), DeepSpeed wherever it is asked for (it runs on CPU too)."""
        import os

        from accelerate import PartialState
        from accelerate.state import AcceleratorState, is_initialized
        from accelerate.utils import DistributedType

        live = live and is_initialized()
        state = AcceleratorState() if live else PartialState(cpu=not torch.cuda.is_available())
        world = state.num_processes
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
        machines = max(1, world // max(per_node, 1))
        asks_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        asks_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if live:
            fsdp = state.distributed_type == DistributedType.FSDP
            zero = state.deepspeed_plugin.zero_stage if state.distributed_type == DistributedType.DEEPSPEED else 0
        else:
            fsdp = asks_fsdp and state.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU)
            zero = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")) if asks_deepspeed else 0
        if fsdp:
            mode, sharded = "FSDP2", "parameters, gradients and optimizer state (adapter and base)"
        elif zero:
            mode = f"ZeRO-{zero}"
            sharded = {
                1: "optimizer state",
                2: "optimizer state and gradients (parameters replicated)",
                3: "parameters, gradients and optimizer state",
            }.get(zero, "?")
        else:
            mode = "DDP" if world > 1 else "single process"
            sharded = "nothing (every process holds the whole model)" if world > 1 else "nothing"
        warning = ""
        if asks_fsdp and not fsdp:
            device = "CPU" if not torch.cuda.is_available() else str(state.distributed_type)
            warning = (
                f"FSDP on {device}: the accelerate config asks for FSDP, which accelerate does not run here; "
                f"this trains as {mode}, nothing sharded"
            )
        return cls(mode, world, machines, sharded, warning)

    def line(self, per_device: int, accumulation: int) -> str:
        """`FSDP2, 2 processes on 1 machine, batch 4 per device x 1 accumulation = 8 per step; sharded: ...`"""
        total = per_device * accumulation * self.world
        if self.world == 1:
            return f"{self.mode}, batch {per_device} per device x {accumulation} accumulation = {total} per step"
        places = f"{plural(self.world, 'process', 'processes')} on {plural(self.machines, 'machine')}"
        batch = f"batch {per_device} per device x {accumulation} accumulation x {self.world} = {total} per step"
        return f"{self.mode}, {places}, {batch}; sharded: {self.sharded}"


def count_adapter_parameters(recipe: Recipe) -> tuple[int, int]:
    """(trainable, total) for the recipe's model + adapter, built on the meta device (no weights read, never
    under DeepSpeed's `zero.Init`: finetune.fit.meta_model)."""
    from finetune import fit

    return adapters.count_parameters(fit.meta_model(recipe))


def trained_parts(model) -> str:
    """What a vision-language model's run trains, part by part (`language_model 1,234 of 5,678 trainable,
    visual frozen, ...`): the adapter's default stays in the text decoder."""
    parts = adapters.trainable_by_part(model)
    return ", ".join(
        f"{part} {trainable:,} of {total:,} trainable" if trainable else f"{part} frozen"
        for part, trainable, total in parts
    )


def output_notes(recipe: Recipe) -> list[str]:
    """What a real run would do with what is already at output.dir (for the dry-run plan)."""
    from finetune.outputs import RunDir, is_nonempty_dir

    run_dir = RunDir(recipe.output.dir, recipe.output.overwrite, recipe.train["resume"])
    notes = []
    if run_dir.final.exists() and not run_dir.final.is_dir():
        notes.append(
            f"{run_dir.final} exists and is not a directory: a real run would refuse; choose another output.dir"
        )
    elif is_nonempty_dir(run_dir.final):
        finished = "a finished run" if (run_dir.final / "recipe.yaml").is_file() else "files"
        notes.append(
            f"{run_dir.final} already holds {finished}: a real run would "
            + (
                "replace it when it finishes (output.overwrite=true)"
                if recipe.output.overwrite
                else "refuse; set output.overwrite=true to replace it, or choose another output.dir"
            )
        )
    checkpoint = run_dir.resume_from() if run_dir.work.is_dir() else None
    if checkpoint is not None:
        notes.append(f"an interrupted run is in {run_dir.work}: a real run resumes from {checkpoint.name}")
    return notes


def absolute_intervals(args, steps: int) -> None:
    """Fractional logging/eval/save steps (a share of the run, e.g. the 0.1 eval_steps default) as the step counts
    Trainer derives from them (TrainerState.compute_steps), so resuming compares like with like (transformers
    warned `eval_steps: 0.1 (from args) != 30 (from trainer_state.json)` on every resume)."""
    for key in ("logging_steps", "eval_steps", "save_steps"):
        value = getattr(args, key, None)
        if value is not None and 0 < value < 1:
            setattr(args, key, math.ceil(steps * value))


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
    parallelism: Parallelism | None = None
    notes: list[str] = field(default_factory=list)
    memory: str = ""  # will it fit (finetune.fit): the peak per device on a GPU, and the verdict
    details: list[tuple[str, str]] = field(default_factory=list)  # a stage's own lines (distill: the teacher)

    @classmethod
    def build(cls, recipe: Recipe, prepared, gpu_memory: int | None = None, vision: bool = False) -> TrainPlan:
        t = recipe.train
        trl_args(recipe, "/nonexistent-dry-run")  # the TRL config accepts these values
        from finetune import fit

        model = fit.meta_model(recipe)  # the adapter on the meta device: its size and what it wraps
        trainable, total = adapters.count_parameters(model)
        targets = adapters.adapted_modules(model)
        parallelism = Parallelism.of()
        world = parallelism.world
        effective = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * world
        steps = planned_steps(recipe, len(prepared.train.encoded), world)
        notes = [
            *prepared.notes,
            *output_notes(recipe),
            *[parallelism.warning] * bool(parallelism.warning),
            *accelerated_notes(recipe),
            *packing_notes(recipe, prepared),
        ]
        return cls(
            recipe,
            trainable,
            total,
            prepared.train.stats(),
            prepared.eval.stats() if prepared.eval else None,
            world,
            effective,
            steps,
            parallelism,
            [*getattr(prepared, "modes", []), *notes],
            memory_line(recipe, parallelism, gpu_memory),
            details=[("targets", targets)] * bool(targets) + [("trained", trained_parts(model))] * vision,
        )

    def render(self) -> str:
        r, t = self.recipe, self.recipe.train
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "bf16" if t["bf16"] else "fp16" if t["fp16"] else "fp32"
        stage_origin = r.origins.get("stage", "recipe")
        caches = (
            r.stage in ("sft", "distill") and r.data.cache != "off" and not r.data.streaming
        )  # finetune.data's cache
        cached = "; the encoded data is kept in the prepared-data cache" if caches else ""
        lines = [
            f"plan for {r.source or 'recipe'} (dry run: nothing trained, no output written{cached})",
            f"  stage          {r.stage}" + ("" if stage_origin in ("recipe", "override") else f" ({stage_origin})"),
            f"  model          {r.model.name_or_path} -> {loading.model_path(r.model)}",
            f"  adapter        {adapters.describe(r.adapter)}",
            *[f"  {name:<14} {value}" for name, value in self.details],
            f"  parameters     {self.trainable:,} trainable of {self.total:,} "
            f"({100 * self.trainable / max(self.total, 1):.3f}%)",
            f"  device         {device} x {plural(self.world, 'process', 'processes')}, {dtype}",
            "  distributed    "
            + (self.parallelism or Parallelism.of()).line(
                t["per_device_train_batch_size"], t["gradient_accumulation_steps"]
            ),
            f"  steps          {self.steps} (lr {t['learning_rate']:g}, {t['lr_scheduler_type']})",
            f"  output         {r.output.dir}",
        ]
        if self.memory:
            lines.append(f"  memory         {self.memory}")
        online = r.stage in RL_STAGES  # prompts only: the trained tokens are generated during training
        for name, stats in (("train", self.train_stats), ("eval", self.eval_stats)):
            if stats:
                trained = (
                    "prompts only (answers are generated and scored during training)"
                    if online
                    else f"{stats['trained_tokens']} of {stats['tokens']} tokens trained "
                    f"({100 * stats['trained_tokens'] / max(stats['tokens'], 1):.0f}%)"
                )
                lines.append(
                    f"  {name:<14} {plural(stats['examples'], 'prompt' if online else 'example')} from "
                    f"{plural(stats['records'], 'record')}; tokens/{'prompt' if online else 'example'} "
                    f"min {stats['length_min']} mean {stats['length_mean']} p50 {stats['length_p50']} "
                    f"p95 {stats['length_p95']} max {stats['length_max']}; {trained}"
                    + (f" (estimated from {stats['sampled']:,} sampled examples)" if stats.get("sampled") else "")
                )
        lines += [f"  note           {n}" for n in self.notes]
        lines += origin_lines(r)
        return "\n".join(lines)


def memory_line(recipe: Recipe, parallelism: Parallelism, gpu_memory: int | None) -> str:
    """The plan's will-it-fit line: finetune.fit's peak per device on a GPU (shared out as the distributed mode
    shards), with the verdict where a GPU size is known (--gpu-memory or the visible GPU)."""
    from finetune import fit

    sharding = {"FSDP2": "full", "ZeRO-3": "full", "ZeRO-2": "zero2", "ZeRO-1": "zero1"}.get(parallelism.mode, "none")
    capacity = gpu_memory if gpu_memory is not None else fit.visible_gpu_bytes()
    verdict = fit.verdict(recipe, capacity, world=parallelism.world, sharding=sharding)
    return verdict + " (finetune fit: the breakdown)"


ORIGINS = ("override", "recipe", "method default", "stage default", "default")


def shown(value) -> str:
    """A value as the plan prints it: whole numbers without `.0` (TRL types the step counts float, for ratios),
    a multi-line text (a chat template) as its first line and its length."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and "\n" in value:
        first = value.split("\n", 1)[0]
        return f"{first[:40]}{'…' if len(first) > 40 else ''} … ({value.count(chr(10)) + 1} lines)"
    return str(value)


def origin_lines(recipe: Recipe) -> list[str]:
    """Where each effective value came from, one line per source (recipe, override, method
    default, stage default, default), for the dry-run plan."""
    by_origin: dict[str, list[str]] = {}
    for dotted, origin in recipe.origins.items():
        if "." not in dotted:
            continue
        section, key = dotted.split(".", 1)
        value = recipe.train.get(key) if section == "train" else getattr(getattr(recipe, section, None), key, None)
        by_origin.setdefault(origin, []).append(f"{dotted}={shown(value)}")
    lines = []
    for origin in ORIGINS:
        if by_origin.get(origin):
            lines.append(f"  {origin + ':':<16}{', '.join(by_origin[origin])}")
    return lines


def align_router_aux_loss(model, args) -> bool:
    """TRL treats a model whose config has `output_router_logits` as a MoE with a router load-balancing loss,
    asks the forward for it and adds `outputs.aux_loss`. A model whose forward takes no `output_router_logits`
    returns none (DeepSeek-V3 / Kimi-K2 / Moonlight balance experts with a routing bias, not an auxiliary
    loss), and TRL crashed on the missing loss; nor does a MoE class configured with 0 experts. For such a model
    the TRL config's public switch, `router_aux_loss_coef`, is set to 0.0 (the config's own field cannot hold None);
    returns whether it was."""
    import inspect

    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", None) is None or not getattr(args, "router_aux_loss_coef", 0.0):
        return False
    experts = [getattr(text_config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts")]
    dense = 0 in experts  # a dense config of a MoE class (Granite 4.0-H-Micro): no router, no router logits
    if "output_router_logits" in inspect.signature(model.forward).parameters and not dense:
        return False
    args.router_aux_loss_coef = 0.0
    log.info(
        "%s returns no router load-balancing loss: trained without one (router_aux_loss_coef 0)", type(model).__name__
    )
    return True


def keep_adapter_in_compute_dtype(model, recipe: Recipe) -> None:
    """SFTTrainer casts a quantized model's trainable weights to bf16 (the QLoRA paper's GPU
    recipe). With a float32 compute dtype (the CPU default) that only loses precision and
    mixes dtypes, so cast them back before the optimizer is built."""
    if recipe.adapter.method != "qlora":
        return
    dtype = loading.resolve_dtype(recipe.adapter.compute_dtype)
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
        base = tiny.build_if_tiny(chained["base"])
        _rename_base(work, base)
    text = card.model_card(recipe, prepared, metrics, model, base, chained, tokenizer=trainer.processing_class)
    write_text_atomic(work / "README.md", text)
    if not recipe.output.keep_checkpoints:
        for ckpt in work.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    run_dir.finish()
    if final_summary(metrics):
        log.info(final_summary(metrics))
    # the recipe's `eval:` section, if any (report + model card), on the held-out split training had
    after_training(recipe, run_dir.final, getattr(prepared, "eval", None))


def _rename_base(work, base: str) -> None:
    """adapter_config.json's base_model_name_or_path -> `base` (PEFT wrote the merged copy's path)."""
    f = work / ADAPTER_CONFIG
    if f.is_file():
        cfg = json.loads(f.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = base
        write_text_atomic(f, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- the terminal during a run


def start_summary(recipe: Recipe, prepared, model, steps: int, world: int, work) -> str:
    """What the run is about to do, in four lines: model and adapter, parameters, data and steps, where it writes."""
    t = recipe.train
    trainable, total = adapters.count_parameters(model)
    effective = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * world
    n_train = prepared.train.stats()["examples"]
    held = prepared.eval.stats()["examples"] if prepared.eval is not None else 0
    unit = "prompt" if recipe.stage in RL_STAGES else "example"
    parallelism = Parallelism.of(live=True)
    return "\n".join(
        [
            f"training: {recipe.stage}, {adapters.describe(recipe.adapter)}, on {recipe.model.name_or_path}",
            f"  parameters  {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.3g}%)",
            f"  data        {plural(n_train, unit)}"
            + (f", {held} held out for eval" if held else "")
            + f"; {plural(steps, 'step')} of {effective} ({plural(world, 'process', 'processes')})",
            f"  parallel    {parallelism.line(t['per_device_train_batch_size'], t['gradient_accumulation_steps'])}",
            *([f"  warning     {parallelism.warning}"] if parallelism.warning else []),
            f"  writing     {work} (renamed to {recipe.output.dir} when finished)",
        ]
    )


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def log_line(logs: dict, step: int, max_steps: int) -> str:
    """One trainer log as a line of plain numbers: `step 4/12  loss 5.088  grad_norm 1.353 ...`;
    `eval (step 12/12)  loss 4.21 ...`; the end-of-training summary as `train done ...`."""
    logs = {k: v for k, v in logs.items() if k != "total_flos"}
    if any(k.startswith("eval_") for k in logs):
        speed = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
        head = f"eval (step {step}/{max_steps})"
        logs = {k.removeprefix("eval_"): v for k, v in logs.items() if k not in speed}
    elif "train_runtime" in logs:
        head, logs = "train done", {k.removeprefix("train_"): v for k, v in logs.items()}
    else:
        head = f"step {step}/{max_steps}"
    return "  ".join([head] + [f"{k} {_number(v)}" for k, v in logs.items()])


def terminal_log(trainer) -> None:
    """Replace the trainer's progress printing: logs become lines of numbers (not dicts of strings);
    on a terminal the progress bar stays, in a pipe or file there are no bars, so no \\r or escape codes."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class TerminalLog(ProgressCallback):
        def __init__(self):
            super().__init__()
            self.bars = sys.stderr.isatty()

        def on_train_begin(self, args, state, control, **kwargs):
            self.current_step = 0
            if self.bars:
                super().on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bars:
                super().on_step_end(args, state, control, **kwargs)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if self.bars:
                super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            line = log_line(logs, state.global_step, state.max_steps)
            if self.training_bar is not None:
                self.training_bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bars and self.training_bar is not None:
                super().on_train_end(args, state, control, **kwargs)

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TerminalLog())


def final_summary(metrics: dict) -> str:
    """`final: train loss 1.23, eval loss 1.41` (the numbers a run is judged by), '' if none."""
    parts = [
        f"{name} {metrics[key]:.4g}"
        for key, name in (("train_loss", "train loss"), ("eval_loss", "eval loss"))
        if isinstance(metrics.get(key), (int, float))
    ]
    return "final: " + ", ".join(parts) if parts else ""


def final_eval(trainer) -> dict:
    """The eval metrics at the last step: those logged there (eval_strategy: steps evaluates at the end),
    else one evaluation now."""
    history = trainer.state.log_history
    logged = [h for h in history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    if logged:
        return {k: v for k, v in logged[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()


# ----------------------------------------------------------------------------- before anything is written


def claim(recipe, run_dir) -> None:
    """What a training run checks after validating its input and before it writes anything: the output
    dir's lock (finetune.locks), the checkpoint it would resume from, and that the adapter fits the model."""
    from finetune import locks, security
    from finetune.errors import OutputError

    locks.hold(run_dir.final)
    checkpoint = run_dir.resume_from()
    if checkpoint is not None:
        if not (Path(checkpoint) / "trainer_state.json").is_file():
            raise OutputError(
                f"train.resume: {checkpoint} is not a checkpoint dir (no trainer_state.json); "
                "give a checkpoint-N dir, auto or never"
            )
        security.check_checkpoint(checkpoint)
    check_adapter_fits(recipe)


def check_adapter_fits(recipe) -> None:
    """Build the adapter on the meta device (no memory): target modules the model lacks, or an adapter
    bigger than the model itself (an absurd adapter.r), fail here in one line."""
    from finetune.errors import FinetuneError

    if recipe.adapter.method in ("full", "freeze"):
        return
    import torch

    try:
        with torch.device("meta"):  # every tensor, the adapter's too (init_empty_weights covers only the model's)
            trainable, total = count_adapter_parameters(recipe)
    except FinetuneError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # peft: NoMatchingPeftModuleError (a ValueError), ...
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RecipeError(f"{recipe.source or 'recipe'}: adapter: {first[:300]}") from None
    if trainable > total - trainable:
        raise RecipeError(
            f"{recipe.source or 'recipe'}: adapter.r: {recipe.adapter.r} makes an adapter of "
            f"{trainable:,} parameters, more than the model's own {total - trainable:,}; use a smaller r"
        )
