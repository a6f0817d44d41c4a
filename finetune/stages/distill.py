"""Knowledge distillation: a student (the recipe's model and adapter, any method) learns from a teacher
(`distill.teacher`: any model, or a finetune output dir). Load, check the pair, data, teacher pass,
student, trainer, train, save, card. Three methods (`distill.method`):

- `logits`: on the recipe's data, encoded as SFT encodes it (answers only), the student learns the
  teacher's next-token distributions: `alpha * divergence + (1 - alpha) * cross-entropy`
  (`finetune.kd`: TRL's generalized JSD). The teacher runs beside the student at every step, or, with
  `distill.top_k`, once over the data into the prepared-data cache (its top-k log-probs), and not at
  all on a second run. Needs the teacher's vocabulary (checked at load).
- `sequences`: the teacher answers the data's prompts (greedy, batched, the recipe's chat template and
  template kwargs; reasoning in the answer kept), the answers are written into the output dir
  (`distill_data/`) and the student is trained on them as SFT trains. Any vocabulary.
- `on_policy`: TRL's GKDTrainer (trl.experimental.gkd): with probability `lmbda` a step trains on the
  student's own samples, scored token by token by the teacher (generalized JSD, `beta`). It takes our
  encoded data through its public `data_collator` argument (prompts cut at the first answer token).

The trainers are TRL's SFTTrainer (its public `compute_loss` replaced by the distillation loss) and
GKDTrainer; no private method of TRL is touched.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from pathlib import Path

import torch

from finetune import adapters, data, guards, kd, loading
from finetune.config import Recipe
from finetune.data.encode import options_of
from finetune.errors import RecipeError, plural
from finetune.outputs import OutputDir, RunDir, write_text_atomic
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
SAME_VOCABULARY = ("logits", "on_policy")
GENERATED = "distill_data"  # sequences: the teacher's answers, kept in the output dir


def prepare(recipe: Recipe, dry_run: bool = False):
    """Everything that can fail on the user's input, before any output dir exists: the output dir, the
    student's tokenizer and data, the teacher (it exists; same vocabulary where the method needs it)."""
    run_dir = RunDir(recipe.output.dir, recipe.output.overwrite, recipe.train["resume"])
    if not dry_run:
        run_dir.check()
    tok = loading.load_tokenizer(recipe.model)
    try:
        teacher_tok = loading.load_named_tokenizer(recipe.distill.teacher, "distill.teacher")
    except RecipeError as e:
        raise RecipeError(f"{recipe.source or 'recipe'}: {e}") from None
    if recipe.distill.method in SAME_VOCABULARY:
        check_vocabulary(recipe, teacher_tok, tok)
    prepared = data.load(
        recipe.data, tok, recipe.train["max_length"], seed=recipe.train["seed"], options=options_of(recipe)
    )
    for note in prepared.notes:
        log.warning(note)
    return run_dir, tok, prepared


def check_vocabulary(recipe: Recipe, teacher_tok, tok) -> None:
    """Logit distillation compares distributions token by token: the two tokenizers must give every id the
    same token (the teacher may have more padded embedding rows). One line naming both and the first difference."""
    mine, theirs = tok.get_vocab(), teacher_tok.get_vocab()
    by_id, teacher_by_id = {i: t for t, i in mine.items()}, {i: t for t, i in theirs.items()}
    for i in range(max(len(by_id), len(teacher_by_id))):
        if by_id.get(i) != teacher_by_id.get(i):
            raise RecipeError(
                f"{recipe.source or 'recipe'}: distill.teacher: {recipe.distill.teacher} and the student "
                f"{recipe.model.name_or_path} have different vocabularies (first difference: id {i} is "
                f"{teacher_by_id.get(i)!r} for the teacher, {by_id.get(i)!r} for the student); method "
                f"{recipe.distill.method} needs the same one; use method: sequences"
            )
    if recipe.distill.method == "on_policy":  # TRL's GKDTrainer compares the configs' vocab_size
        try:
            sizes = (vocab_size(recipe.distill.teacher), vocab_size(recipe.model.name_or_path, recipe.model))
        except (OSError, ValueError) as e:
            raise RecipeError(f"{recipe.source or 'recipe'}: distill.teacher: {str(e).splitlines()[0]}") from None
        if sizes[0] != sizes[1]:
            raise RecipeError(
                f"{recipe.source or 'recipe'}: distill.teacher: {recipe.distill.teacher} has {sizes[0]} embedding "
                f"rows, the student {sizes[1]}; TRL's GKDTrainer (on_policy) needs the same; use method: logits"
            )


def _config(name: str, model_section=None):
    from transformers import AutoConfig

    if model_section is not None:
        return AutoConfig.from_pretrained(loading.model_path(model_section), revision=model_section.revision)
    return AutoConfig.from_pretrained(teacher_base(name))


def vocab_size(name: str, model_section=None) -> int:
    return _config(name, model_section).get_text_config().vocab_size


def teacher_base(name: str) -> str:
    """The full model a teacher runs on: an adapter dir's base, else the model itself."""
    path = Path(name).expanduser()
    if path.is_dir():
        model_dir = loading.inspect(path, what="distill.teacher")
        return model_dir.base if model_dir.kind == "adapter" else str(model_dir.path)
    return loading.resolve_reference(name, "distill.teacher")


def teacher_fingerprint(name: str) -> str:
    """The teacher's content (for the top-k cache key): an adapter dir's base + adapter, a model dir's files,
    else the hub id (its revision is what the hub serves under it)."""
    from finetune.data import cache

    path = Path(loading.resolve_reference(name, "distill.teacher")).expanduser()
    if not path.is_dir():
        return f"hub:{name}"
    out = OutputDir(path, "distill.teacher")
    return f"adapter:{out.fingerprint()}" if out.is_adapter else f"model:{cache.folder_fingerprint(path)}"


def teacher_memory(name: str) -> tuple[int, str]:
    """(parameters, memory in words) of the teacher as it is loaded (built on the meta device: no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        cfg = _config(name)
    except (OSError, ValueError) as e:  # a hub id with no network: the plan says so, the run finds out
        return 0, f"memory unknown: {str(e).splitlines()[0][:200]}"
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    dtype = loading.resolve_dtype("auto")
    return n, f"{size(n * dtype.itemsize)} of weights in {str(dtype).removeprefix('torch.')}"


def size(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def count(n: int) -> str:
    return next(f"{n / s:.3g}{u}" for s, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= s or s == 1)


def topk_cache(recipe: Recipe, prepared, tok):
    """(key, unique rows, whether the cache holds them) of the teacher's top-k log-probs for the splits."""
    from finetune.data import cache

    splits = [s for s in (prepared.train, prepared.eval) if s is not None]
    d = recipe.distill
    key, rows = kd.cache_key(f"{teacher_fingerprint(d.teacher)}:{len(tok)}", splits, d.top_k, d.temperature)
    return key, rows, cache.is_complete(cache.entry_dir(key)) and recipe.data.cache == "auto"


def plan(recipe: Recipe, gpu_memory: int | None = None) -> TrainPlan:
    """What `train` would do (for --dry-run): validates recipe, teacher, data and model config, trains nothing;
    `gpu_memory` (bytes) gives the will-it-fit line a verdict."""
    _, tok, prepared = prepare(recipe, dry_run=True)
    p = TrainPlan.build(recipe, prepared, gpu_memory)
    d = recipe.distill
    n, memory = teacher_memory(d.teacher)
    p.details += [
        ("teacher", f"{d.teacher} ({count(n)} parameters, {memory})" if n else f"{d.teacher} ({memory})"),
        ("student", f"{recipe.model.name_or_path}, {adapters.describe(recipe.adapter)}"),
        ("distill", describe(recipe)),
    ]
    if d.method == "logits":
        p.details.append(("teacher logits", logits_line(recipe, prepared, tok)))
    return p


def describe(recipe: Recipe) -> str:
    d = recipe.distill
    divergence = {0.0: "forward KL(teacher || student)", 1.0: "reverse KL(student || teacher)"}.get(
        d.beta, f"generalized JSD (beta {d.beta:g})"
    )
    if d.method == "logits":
        return f"logits: {d.alpha:g} x {divergence} at temperature {d.temperature:g} + {1 - d.alpha:g} x CE"
    if d.method == "sequences":
        return f"sequences: SFT on the teacher's greedy answers (at most {d.max_new_tokens} new tokens)"
    return (
        f"on_policy: TRL GKD, {d.lmbda:g} of the steps on the student's samples (temperature {d.temperature:g}, "
        f"at most {d.max_new_tokens} new tokens), {divergence}"
    )


def logits_line(recipe: Recipe, prepared, tok) -> str:
    d = recipe.distill
    if d.top_k is None:
        return "full distribution, the teacher runs at every step (not cached; set distill.top_k to cache)"
    from finetune.data import cache

    key, rows, hit = topk_cache(recipe, prepared, tok)
    tokens = sum(kd.n_answer_tokens(labels) for _, labels in rows)
    state = "cached: the teacher does not run" if hit else "not cached yet: one teacher pass fills it"
    return (
        f"top-{d.top_k} per answer token, {tokens:,} tokens = {size(kd.cache_bytes(tokens, d.top_k))} in "
        f"{cache.entry_dir(key)} ({state})"
    )


# ----------------------------------------------------------------------------- the run


def run(recipe: Recipe, callbacks=()) -> Path:
    from accelerate import PartialState
    from transformers import set_seed

    state = PartialState()
    d = recipe.distill
    run_dir, tok, prepared = prepare(recipe)
    args = trl_args(recipe, run_dir.work)  # invalid TRL combinations fail here, before anything is written
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}  # encoded by finetune
    args.remove_unused_columns = False
    claim(recipe, run_dir)  # the output dir's lock; the checkpoint to resume; the adapter fits
    checkpoint = run_dir.start(recipe.identity(), is_main=state.is_main_process)

    # The teacher's part first, so that (top-k, sequences) it is out of memory before the student loads.
    teacher, topk = None, None
    if d.method == "logits" and d.top_k is not None:
        topk = teacher_topk(recipe, prepared, tok)
    elif d.method == "sequences":
        prepared = teacher_answers(recipe, prepared, run_dir.work, state)
    else:
        teacher = load_teacher(recipe)

    set_seed(recipe.train["seed"])  # the adapter is initialised from this seed
    model = loading.load_for_training(recipe.model, recipe.adapter, recipe.train["activation_checkpointing"])
    align_router_aux_loss(model, args)
    steps = planned_steps(recipe, len(prepared.train.encoded), state.num_processes)
    absolute_intervals(args, steps)  # fractional logging/eval/save steps as counts: no warning on resume
    training = adapters.for_training(model, recipe, args, steps, tokenizer=tok.name_or_path)
    training.keep_initial(run_dir.work, is_main=state.is_main_process)
    state.wait_for_everyone()
    if checkpoint and state.is_main_process:
        log.info("resuming from %s", checkpoint)

    common = dict(
        args=args,
        train_dataset=prepared.train.dataset(with_length=True),
        eval_dataset=prepared.eval.dataset(with_length=True) if prepared.eval else None,
        processing_class=tok,
        peft_config=training.peft_config,
        callbacks=list(callbacks) + training.callbacks + guards.callbacks(recipe),
        optimizers=training.optimizers,
    )
    if d.method == "on_policy":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(type(args)) if f.init},
            lmbda=d.lmbda,
            beta=d.beta,
            temperature=d.temperature,
            max_new_tokens=d.max_new_tokens,
        )
        common["args"] = args
        collator = Collator(tok.pad_token_id, with_prompts=True)
        trainer = GKDTrainer(model=training.model, teacher_model=teacher, data_collator=collator, **common)
    elif d.method == "sequences":  # the teacher's answers are the labels: SFT's own loss
        from trl import SFTTrainer

        trainer = SFTTrainer(model=training.model, data_collator=Collator(tok.pad_token_id), **common)
    else:
        trainer = distillation_trainer()(
            model=training.model,
            data_collator=Collator(tok.pad_token_id),
            recipe=recipe,
            teacher=teacher,
            topk=topk,
            **common,
        )
    keep_adapter_in_compute_dtype(trainer.model, recipe)
    if teacher is not None and d.method == "logits" and getattr(teacher, "hf_quantizer", None) is None:
        teacher.to(trainer.accelerator.device)  # this rank's device (a quantized teacher was placed at load time)
    terminal_log(trainer)
    if state.is_main_process:
        log.info(start_summary(recipe, prepared, trainer.model, steps, state.num_processes, run_dir.work))
        log.info("distilling: %s from %s", describe(recipe), d.teacher)
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


def load_teacher(recipe: Recipe):
    """The teacher in eval mode, frozen, as `finetune eval` loads a model: a dir (an adapter on its base as
    it was trained, 4-bit for a QLoRA run), tiny name or hub id."""
    teacher = loading.load_for_eval(recipe.distill.teacher, "distill.teacher")
    teacher.model.requires_grad_(False)
    return teacher.model


def teacher_topk(recipe: Recipe, prepared, tok) -> kd.TopK:
    """The teacher's top-k log-probs of every answer token, from the cache or computed into it (one pass)."""
    from finetune.data import cache

    d = recipe.distill
    key, rows, hit = topk_cache(recipe, prepared, tok)
    if hit:
        log.info("teacher logits: top-%d from the cache %s (the teacher does not run)", d.top_k, cache.entry_dir(key))
        return kd.TopK(cache.entry_dir(key))

    def build(tmp: Path) -> dict:
        teacher = load_teacher(recipe)
        log.info("teacher logits: one pass of %s over %s", d.teacher, plural(len(rows), "sequence"))
        meta = kd.build_topk(teacher, rows, d.top_k, d.temperature, d.batch_size, tmp, tok.pad_token_id, len(tok))
        meta["teacher"] = d.teacher
        del teacher
        gc.collect()
        return meta

    if recipe.data.cache == "off":  # nothing shared: a private dir of this run, as finetune.data does
        import os
        import shutil
        import socket

        private = cache.root() / f".off-topk-{socket.gethostname()}-{os.getpid()}"  # removed once this process ends
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir(parents=True)
        (private / "meta.json").write_text(json.dumps(build(private)), encoding="utf-8")
        return kd.TopK(private)
    return kd.TopK(cache.obtain(key, build, recipe.data.cache))


def teacher_answers(recipe: Recipe, prepared, work: Path, state):
    """sequences: the teacher's answers to the train (and held-out) prompts, written into the run's
    `distill_data/` (kept by a resumed run), then encoded as SFT data. Returns the prepared data."""
    from finetune.eval import generation

    d, out = recipe.distill, work / GENERATED
    splits = {"train": prepared.train, "eval": prepared.eval}
    files = {name: out / f"{name}.jsonl" for name, split in splits.items() if split is not None}
    if state.is_main_process and not all(f.is_file() for f in files.values()):
        teacher = loading.load_for_eval(recipe.distill.teacher, "distill.teacher")
        tok = teacher.tokenizer
        if recipe.model.chat_template:  # the recipe's template renders the prompts, as the student sees them
            tok.chat_template = loading.load_tokenizer(recipe.model).chat_template
        out.mkdir(parents=True, exist_ok=True)
        for name, f in files.items():
            examples = _examples_of(recipe, splits[name], name)
            items = generation.items_from_examples(examples, splits[name].source)
            answers = generation.generate(
                teacher.model,
                tok,
                [it.prompt for it in items],
                max_new_tokens=d.max_new_tokens,
                batch_size=d.batch_size,
                template_kwargs=dict(recipe.model.chat_template_kwargs),
            )
            rows = [_with_answer(ex, a) for ex, a in zip(examples, answers)]
            write_text_atomic(f, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            log.info("sequences: %s teacher answers written to %s", len(rows), f)
        del teacher
        gc.collect()
    state.wait_for_everyone()
    first = json.loads(files["train"].read_text(encoding="utf-8").splitlines()[0])
    generated = dataclasses.replace(
        recipe.data,
        train=str(files["train"]),
        eval=str(files["eval"]) if "eval" in files else None,
        eval_ratio=0.0,
        format="messages" if "messages" in first else "prompt_completion",
        columns={},
        max_samples=None,
        registry=None,
        split="train",
        system=None,  # the prompts carry it already
    )
    tok = loading.load_tokenizer(recipe.model)
    return data.load(generated, tok, recipe.train["max_length"], seed=recipe.train["seed"], options=options_of(recipe))


def _examples_of(recipe: Recipe, split, name: str) -> list[dict]:
    """The records a split was encoded from (canonical examples, in the split's order, once each)."""
    dsec = recipe.data
    source = dsec.eval if name == "eval" and dsec.eval else dsec.train
    examples, _, _ = data.read_examples(source, dsec, fmt=dsec.format, field_name=f"data.{name}")
    records = dict.fromkeys(split.table.with_format("arrow")["record"].to_numpy().tolist())
    return [examples[i] for i in records]


def _with_answer(example: dict, answer: str) -> dict:
    """The example with the teacher's answer in place of its last answer."""
    if "messages" in example:
        msgs = example["messages"]
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        return {"messages": [*msgs[:last], {"role": "assistant", "content": answer}]}
    return {"prompt": example["prompt"], "completion": answer}


# ----------------------------------------------------------------------------- batches and the trainer


class Collator:
    """Right-padded input_ids, labels (finetune's, as encoded) and attention_mask; with `with_prompts`, also
    each sequence up to its first answer token, left-padded (`prompts`, `prompt_attention_mask`: what TRL's
    GKDTrainer generates the student's samples from)."""

    def __init__(self, pad_id: int, with_prompts: bool = False):
        self.pad_id, self.with_prompts = pad_id, with_prompts

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        batch = {
            "input_ids": torch.full((len(examples), width), self.pad_id, dtype=torch.long),
            "labels": torch.full((len(examples), width), kd.IGNORE, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        }
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(e["input_ids"])
            batch["labels"][i, :n] = torch.as_tensor(e["labels"])
            batch["attention_mask"][i, :n] = 1
        if self.with_prompts:
            prompts = [
                e["input_ids"][: next(j for j, x in enumerate(e["labels"]) if x != kd.IGNORE)] for e in examples
            ]
            pwidth = max(len(p) for p in prompts)
            batch["prompts"] = torch.full((len(examples), pwidth), self.pad_id, dtype=torch.long)
            batch["prompt_attention_mask"] = torch.zeros((len(examples), pwidth), dtype=torch.long)
            for i, p in enumerate(prompts):
                if p:
                    batch["prompts"][i, pwidth - len(p) :] = torch.as_tensor(p)
                    batch["prompt_attention_mask"][i, pwidth - len(p) :] = 1
        return batch


def distillation_trainer():
    """TRL's SFTTrainer with the distillation loss (`finetune.kd.kd_loss`) as its `compute_loss`."""
    from trl import SFTTrainer

    class DistillationTrainer(SFTTrainer):
        def __init__(self, *, recipe: Recipe, teacher=None, topk: kd.TopK | None = None, **kwargs):
            super().__init__(**kwargs)
            self.distill, self.teacher, self.topk = recipe.distill, teacher, topk

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            d = self.distill
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            teacher_logits, topk = None, None
            if self.topk is not None:
                topk = self.topk.rows(inputs["input_ids"], inputs["labels"], inputs["attention_mask"])
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(
                        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                    ).logits
            mask, target = kd.answer_positions(inputs["labels"])
            student = outputs.logits[:, :-1][mask]
            teacher = teacher_logits[:, :-1][mask] if teacher_logits is not None else None
            items = num_items_in_batch if model.training else None
            loss = kd.kd_loss(student, target, d.alpha, d.beta, d.temperature, teacher=teacher, topk=topk, items=items)
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer
