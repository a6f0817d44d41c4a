"""The run shared by the preference stages (rm, dpo, kto, orpo, cpo, simpo): load, data, model,
trainer (built by the stage), train, evaluate, save, card. Each stage file says only what
differs: its model head and its TRL trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from finetune import adapters, guards, loading
from finetune.config import Recipe
from finetune.data import pairs, vision
from finetune.errors import RecipeError
from finetune.outputs import RunDir
from finetune.stages.common import (
    TrainPlan,
    absolute_intervals,
    align_router_aux_loss,
    claim,
    final_eval,
    finish,
    keep_adapter_in_compute_dtype,
    planned_steps,
    start_summary,
    terminal_log,
    trl_args,
)

log = logging.getLogger("finetune")

VISION_STAGES = ("dpo",)  # the preference stages whose TRL trainer batches images (DataCollatorForVisionPreference)


def prepare(recipe: Recipe, dry_run: bool = False):
    """Everything that can fail on the user's input, before any output dir exists. A dry run
    plans even where output.dir is taken (the plan notes what a real run would do there)."""
    run_dir = RunDir(recipe.output.dir, recipe.output.overwrite, recipe.train["resume"])
    if not dry_run:
        run_dir.check()
    tok = loading.load_tokenizer_or_processor(recipe.model, recipe.data)  # a processor for a vision-language model
    if vision.is_processor(tok) and recipe.stage not in VISION_STAGES:
        raise RecipeError(
            f"stage: {recipe.stage}: {recipe.model.name_or_path} is a vision-language model; its preference "
            f"stage is {', '.join(VISION_STAGES)} (TRL's vision collator)"
        )
    prepared = pairs.load(
        recipe.data, tok, recipe.stage, seed=recipe.train["seed"], template_kwargs=recipe.model.chat_template_kwargs
    )
    return run_dir, tok, prepared


def plan(recipe: Recipe, gpu_memory: int | None = None) -> TrainPlan:
    _, _, prepared = prepare(recipe, dry_run=True)
    return TrainPlan.build(recipe, prepared, gpu_memory)


def run(recipe: Recipe, make_trainer: Callable, callbacks=(), num_labels: int | None = None, loaded=None) -> Path:
    """Train with the trainer `make_trainer(model, args, tok, prepared, callbacks)` builds.
    `num_labels` loads the base as a sequence classifier (the reward model); `loaded`: what
    `prepare(recipe)` returned, when the stage has already loaded the data (rl.py checks it first)."""
    from accelerate import PartialState
    from transformers import set_seed

    state = PartialState()
    run_dir, tok, prepared = loaded or prepare(recipe)
    args = trl_args(recipe, run_dir.work)  # invalid TRL combinations fail here, before anything is written
    claim(recipe, run_dir)  # the output dir's lock; the checkpoint to resume; the adapter fits
    set_seed(recipe.train["seed"])  # the adapter (and a reward head) are initialised from this seed
    model = loading.load_for_training(
        recipe.model,
        recipe.adapter,
        recipe.train["activation_checkpointing"],
        num_labels=num_labels,
        pad_token_id=vision.tokenizer_of(tok).pad_token_id,
    )
    align_router_aux_loss(model, args)
    checkpoint = run_dir.start(recipe.identity(), is_main=state.is_main_process)
    state.wait_for_everyone()
    if checkpoint and state.is_main_process:
        log.info("resuming from %s", checkpoint)

    trainer = make_trainer(model, args, tok, prepared, list(callbacks) + guards.callbacks(recipe))
    keep_adapter_in_compute_dtype(trainer.model, recipe)
    dropped = _count_dropped(trainer, prepared, recipe)
    absolute_intervals(trainer.args, planned_steps(recipe, len(trainer.train_dataset), state.num_processes))
    terminal_log(trainer)
    if state.is_main_process:
        steps = planned_steps(recipe, len(trainer.train_dataset), state.num_processes)
        log.info(start_summary(recipe, prepared, trainer.model, steps, state.num_processes, run_dir.work))
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = {**dropped, **guards.whole_run_metrics(trainer, result)}
    if prepared.eval is not None:
        metrics.update(final_eval(trainer))

    trainer.save_model(str(run_dir.work))
    if state.is_main_process:
        finish(recipe, run_dir, trainer, prepared, metrics)
    state.wait_for_everyone()
    return run_dir.final


def _count_dropped(trainer, prepared, recipe: Recipe) -> dict:
    """Some TRL trainers drop (not truncate) examples that do not fit train.max_length
    (RewardTrainer: pairs longer than it; DPO: prompts that fill it): say how many."""
    counts = {}
    splits = (("train", prepared.train, trainer.train_dataset), ("eval", prepared.eval, trainer.eval_dataset))
    for name, split, dataset in splits:
        if split is None or dataset is None:
            continue
        split.n_dropped = counts[f"{name}_dropped_examples"] = len(split.examples) - len(dataset)
        if split.n_dropped:
            prepared.notes.append(
                f"{split.source}: {split.n_dropped} of {len(split.examples)} examples dropped: "
                f"longer than train.max_length={recipe.train.get('max_length')}"
            )
            log.warning(prepared.notes[-1])
            if split is prepared.train and not len(dataset):
                from finetune.errors import DataError

                raise DataError(
                    f"{split.source}: every example is longer than train.max_length="
                    f"{recipe.train.get('max_length')}; raise it"
                )
    return counts


def trainer(trainer_cls, recipe: Recipe, peft_config=None, **extra) -> Callable:
    """A `make_trainer` for `run`: a TRL trainer of `trainer_cls` on the prepared splits, with the
    recipe's adapter (built by the trainer from `peft_config`) and any `extra` arguments."""

    def make(model, args, tok, prepared, callbacks):
        return trainer_cls(
            model=model,
            args=args,
            train_dataset=prepared.train.dataset(),
            eval_dataset=prepared.eval.dataset() if prepared.eval else None,
            processing_class=tok,
            peft_config=peft_config or adapters.peft_config(recipe.adapter, model),
            callbacks=callbacks,
            **extra,
        )

    return make
