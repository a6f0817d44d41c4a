"""Supervised fine-tuning: load, data, model, trainer, train, save, card.

Labels are built by finetune (answers only, see `finetune.data.encode`) and handed to TRL's
SFTTrainer as a tokenized dataset (`input_ids` + `labels`), so TRL's own preparation only pads
and batches. The adapter is built by SFTTrainer from the recipe's PEFT config.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetune import adapters, data, guards, loading
from finetune.config import Recipe
from finetune.data import vision
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


def prepare(recipe: Recipe, dry_run: bool = False):
    """Everything that can fail on the user's input, before any output dir exists. A dry run
    plans even where output.dir is taken (the plan notes what a real run would do there)."""
    run_dir = RunDir(recipe.output.dir, recipe.output.overwrite, recipe.train["resume"])
    if not dry_run:
        run_dir.check()
    tok = loading.load_tokenizer_or_processor(recipe.model, recipe.data)  # a processor for a vision-language model
    prepared = data.load_recipe(recipe, tok)
    for note in prepared.notes:
        log.warning(note)
    return run_dir, tok, prepared


def plan(recipe: Recipe, gpu_memory: int | None = None) -> TrainPlan:
    """What `train` would do (for --dry-run): validates recipe, data and model config, trains nothing;
    `gpu_memory` (bytes) gives the will-it-fit line a verdict."""
    _, tok, prepared = prepare(recipe, dry_run=True)
    return TrainPlan.build(recipe, prepared, gpu_memory, vision=vision.is_processor(tok))


def run(recipe: Recipe, callbacks=()) -> Path:
    from accelerate import PartialState
    from transformers import set_seed
    from trl import SFTTrainer

    state = PartialState()
    run_dir, tok, prepared = prepare(recipe)
    args = trl_args(recipe, run_dir.work)  # invalid TRL combinations fail here, before anything is written
    if not args.packing:
        # The data is already encoded, truncated and filtered (finetune.data): TRL's own pass over it would
        # copy every row again. The `length` column stays for the length-grouped sampler (TRL's collator
        # ignores it); a stream is split between ranks by accelerate, each rank reading its own part.
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        args.remove_unused_columns = False
    if recipe.data.streaming:
        args.accelerator_config.dispatch_batches = False
    claim(recipe, run_dir)  # the output dir's lock; the checkpoint to resume; the adapter fits
    # SFTTrainer builds the adapter before Trainer seeds the RNG: seed first, so the same
    # recipe gives the same initial adapter (and the same run) every time.
    set_seed(recipe.train["seed"])
    model = loading.load_for_training(recipe.model, recipe.adapter, recipe.train["activation_checkpointing"])
    align_router_aux_loss(model, args)
    # The method's adapter (or frozen weights), callbacks and optimizer: finetune/adapters.py.
    steps = planned_steps(recipe, len(prepared.train.encoded), state.num_processes)
    absolute_intervals(args, steps)
    training = adapters.for_training(model, recipe, args, steps, tokenizer=vision.tokenizer_of(tok).name_or_path)
    checkpoint = run_dir.start(recipe.identity(), is_main=state.is_main_process)
    training.keep_initial(run_dir.work, is_main=state.is_main_process)
    state.wait_for_everyone()
    if checkpoint and state.is_main_process:
        log.info("resuming from %s", checkpoint)

    trainer = SFTTrainer(
        model=training.model,
        args=args,
        train_dataset=prepared.train.dataset(with_length=not args.packing),
        eval_dataset=prepared.eval.dataset(with_length=not args.packing) if prepared.eval else None,
        processing_class=tok,
        data_collator=vision.VisionCollator(tok) if vision.is_processor(tok) else None,
        peft_config=training.peft_config,
        callbacks=list(callbacks) + training.callbacks + guards.callbacks(recipe),
        optimizers=training.optimizers,
    )
    keep_adapter_in_compute_dtype(trainer.model, recipe)
    terminal_log(trainer)
    if state.is_main_process:
        log.info(start_summary(recipe, prepared, trainer.model, steps, state.num_processes, run_dir.work))
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = guards.whole_run_metrics(trainer, result)
    if prepared.eval is not None:
        metrics.update(final_eval(trainer))

    trainer.save_model(str(run_dir.work))  # every rank: FSDP / ZeRO-3 gather the weights here
    if state.is_main_process:
        training.save(run_dir.work)
        finish(recipe, run_dir, trainer, prepared, metrics)
    state.wait_for_everyone()
    return run_dir.final
