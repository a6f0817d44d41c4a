"""Supervised fine-tuning: load, data, model, trainer, train, save, card.

Labels are built by finetune (answers only, see `finetune.data.encode`) and handed to TRL's
SFTTrainer as a tokenized dataset (`input_ids` + `labels`), so TRL's own preparation only pads
and batches. The adapter is built by SFTTrainer from the recipe's PEFT config.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from finetune import adapters, card, data, guards, models, rewards
from finetune.config import Recipe
from finetune.eval import after_training
from finetune.outputs import RunDir, write_text_atomic
from finetune.stages.common import TrainPlan, planned_steps, trl_args

log = logging.getLogger("finetune")


def prepare(recipe: Recipe):
    """Everything that can fail on the user's input, before any output dir exists."""
    run_dir = RunDir(recipe.output.dir, recipe.output.overwrite, recipe.train["resume"])
    run_dir.check()
    tok = models.load_tokenizer(recipe.model)
    prepared = data.load(recipe.data, tok, recipe.train["max_length"], seed=recipe.train["seed"])
    for note in prepared.notes:
        log.warning(note)
    return run_dir, tok, prepared


def plan(recipe: Recipe) -> TrainPlan:
    """What `train` would do (for --dry-run): validates recipe, data and model config, trains nothing."""
    _, tok, prepared = prepare(recipe)
    return TrainPlan.build(recipe, prepared)


def run(recipe: Recipe, callbacks=()) -> Path:
    from accelerate import PartialState
    from transformers import set_seed
    from trl import SFTTrainer

    state = PartialState()
    run_dir, tok, prepared = prepare(recipe)
    args = trl_args(recipe, run_dir.work)  # invalid TRL combinations fail here, before anything is written
    guards.claim(recipe, run_dir)  # the output dir's lock; the checkpoint to resume; the adapter fits
    # SFTTrainer builds the adapter before Trainer seeds the RNG: seed first, so the same
    # recipe gives the same initial adapter (and the same run) every time.
    set_seed(recipe.train["seed"])
    model = models.load_model(recipe.model, recipe.adapter, recipe.train["activation_checkpointing"])
    # The method's adapter (or frozen weights), callbacks and optimizer: finetune/adapters.py.
    steps = planned_steps(recipe, len(prepared.train.encoded), state.num_processes)
    training = adapters.for_training(model, recipe, args, steps, tokenizer=tok.name_or_path)
    checkpoint = run_dir.start(recipe.identity(), is_main=state.is_main_process)
    training.keep_initial(run_dir.work, is_main=state.is_main_process)
    state.wait_for_everyone()
    if checkpoint and state.is_main_process:
        log.info("resuming from %s", checkpoint)

    trainer = SFTTrainer(
        model=training.model,
        args=args,
        train_dataset=prepared.train.dataset(),
        eval_dataset=prepared.eval.dataset() if prepared.eval else None,
        processing_class=tok,
        peft_config=training.peft_config,
        callbacks=list(callbacks) + training.callbacks + guards.callbacks(recipe),
        optimizers=training.optimizers,
    )
    _keep_adapter_in_compute_dtype(trainer.model, recipe)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics = guards.whole_run_metrics(trainer, result)
    if prepared.eval is not None:
        metrics.update(trainer.evaluate())

    trainer.save_model(str(run_dir.work))  # every rank: FSDP / ZeRO-3 gather the weights here
    if state.is_main_process:
        training.save(run_dir.work)
        _finish(recipe, run_dir, trainer, prepared, metrics)
    state.wait_for_everyone()
    return run_dir.final


def _keep_adapter_in_compute_dtype(model, recipe: Recipe) -> None:
    """SFTTrainer casts a quantized model's trainable weights to bf16 (the QLoRA paper's GPU
    recipe). With a float32 compute dtype (the CPU default) that only loses precision and
    mixes dtypes, so cast them back before the optimizer is built."""
    if recipe.adapter.method != "qlora":
        return
    dtype = models.resolve_dtype(recipe.adapter.compute_dtype)
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _finish(recipe: Recipe, run_dir: RunDir, trainer, prepared, metrics: dict) -> None:
    work = run_dir.work
    (work / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml holds the arguments
    trainer.state.save_to_json(str(work / "trainer_state.json"))
    write_text_atomic(work / "recipe.yaml", recipe.dump())
    metrics = {**metrics, **rewards.trend_metrics(recipe.stage, trainer.state.log_history)}  # RL stages: reward first/last
    card.write_metrics(work, metrics)
    model = getattr(trainer.model, "policy", trainer.model)  # PPO's trainer wraps the policy and its value model
    base = adapters.base_model_path(model)
    write_text_atomic(work / "README.md", card.model_card(recipe, prepared, metrics, model, base))
    if not recipe.output.keep_checkpoints:
        for ckpt in work.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    run_dir.finish()
    after_training(recipe, run_dir.final)  # the recipe's `eval:` section, if any (report + model card)
