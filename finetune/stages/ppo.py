"""PPO (experimental, as TRL marks it): `trl.experimental.ppo.PPOTrainer`, the last TRL with it is 1.12.

- policy: the base (or the merged previous stage, finetune.chain) with a LoRA/QLoRA adapter;
- reference: the same model with the adapter disabled (`ref_model=None` + `peft_config`): no copy;
- reward model: `rewards.model`, an `rm` output dir, merged and frozen;
- value model: a second copy of the reward model, trained in full (its head starts as the reward head).
Generation (`response_length`, `temperature`, `stop_token`), KL (`kl_coef`, `kl_estimator`) and
whitening (`whiten_rewards`) are `train` keys (PPOConfig fields). Reward (`objective/scores`), KL
(`objective/kl`) and entropy (`objective/entropy`) are logged at every step. The reward model
scores the policy's token ids directly, so it must share the policy's tokenizer.

`train.max_steps` sets TRL's `total_episodes` (= steps x batch) when that is not given. TRL's
PPOTrainer cannot resume from a checkpoint: an interrupted PPO run starts over.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetune import adapters, loading, rewards
from finetune.config import Recipe
from finetune.errors import RecipeError
from finetune.stages.common import claim, finish, keep_adapter_in_compute_dtype, trl_args
from finetune.stages.preference import plan, prepare  # noqa: F401  (the stage interface: run, plan)

log = logging.getLogger("finetune")


def _prompt_ids(split, tok):
    """The `input_ids` dataset PPOTrainer generates from: prompts with the generation prompt (and the
    model's chat_template_kwargs)."""
    import datasets

    ids = []
    for e in split.examples:
        p = e["prompt"]
        if isinstance(p, str):
            ids.append(tok(p)["input_ids"])
        else:
            rendered = tok.apply_chat_template(
                p, add_generation_prompt=True, tokenize=True, return_dict=True, **split.template_kwargs
            )
            ids.append(rendered["input_ids"])
    return datasets.Dataset.from_dict({"input_ids": ids})


def _reward_models(recipe: Recipe, tok):
    """(frozen reward model, trainable value model) from the `rm` dir, checked against the policy tokenizer."""
    reward_model, rm_tok = rewards.load_recipe_reward_model(recipe)
    if rm_tok.get_vocab() != tok.get_vocab():
        raise RecipeError(
            f"rewards.model: {recipe.rewards.model}: its tokenizer differs from the policy's "
            f"({recipe.model.name_or_path}); PPO scores the policy's tokens directly, so train the "
            "reward model on the same base"
        )
    value_model, _ = rewards.load_recipe_reward_model(recipe)
    value_model.train().requires_grad_(True)
    return reward_model, value_model


def run(recipe: Recipe, callbacks=()) -> Path:
    from accelerate import PartialState
    from transformers import set_seed
    from trl.experimental.ppo import PPOTrainer

    state = PartialState()
    log.warning(
        "stage ppo is experimental: it runs on trl.experimental.ppo.PPOTrainer, "
        "which TRL marks experimental (and removes after 1.12)"
    )
    run_dir, tok, prepared = prepare(recipe)
    tok.padding_side = "left"  # prompts are generated from: pad on the left
    args = trl_args(recipe, run_dir.work)
    if args.total_episodes is None and recipe.train["max_steps"] > 0:
        batch = (
            args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * args.num_mini_batches
            * state.num_processes
        )
        args.total_episodes = recipe.train["max_steps"] * batch
    claim(recipe, run_dir)  # the output dir's lock; the checkpoint to resume; the adapter fits
    reward_model, value_model = _reward_models(recipe, tok)
    set_seed(recipe.train["seed"])
    model = loading.load_for_training(recipe.model, recipe.adapter, recipe.train["activation_checkpointing"])
    if run_dir.resume_from() is not None:
        log.warning("ppo cannot resume (TRL's PPOTrainer has no resume): starting over")
    run_dir.resume = "never"
    run_dir.start(recipe.identity(), is_main=state.is_main_process)
    state.wait_for_everyone()

    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=model,
        ref_model=None,  # with peft_config: the policy with its adapter disabled
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=_prompt_ids(prepared.train, tok),
        eval_dataset=_prompt_ids(prepared.eval, tok) if prepared.eval else None,
        peft_config=adapters.peft_config(recipe.adapter),
        callbacks=list(callbacks),
    )
    keep_adapter_in_compute_dtype(trainer.model, recipe)
    _fit_for_several_processes(trainer)
    trainer.train()
    trainer.save_model(str(run_dir.work))  # the policy's adapter only (TRL drops the value model)
    if state.is_main_process:
        metrics = {"episodes": trainer.state.episode, "steps": trainer.state.global_step}
        finish(recipe, run_dir, trainer, prepared, metrics)
    state.wait_for_everyone()
    return run_dir.final


def _fit_for_several_processes(trainer) -> None:
    """Two gaps of TRL 1.12's PPOTrainer in multi-process runs (each an AttributeError under DDP):
    it disables the adapter for the reference pass through `self.model.policy`, which the
    DistributedDataParallel wrapper does not have, so the wrapper gets a plain (unregistered)
    reference to the policy it wraps; and it never runs Trainer.__init__, which sets
    `is_distributed_loading_by_transformers` (read when a non-main process saves), so it gets
    Trainer's default for a model that did not load distributed, False."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(trainer.model, DistributedDataParallel):
        object.__setattr__(trainer.model, "policy", trainer.model.module.policy)
    if not hasattr(trainer, "is_distributed_loading_by_transformers"):
        trainer.is_distributed_loading_by_transformers = False
