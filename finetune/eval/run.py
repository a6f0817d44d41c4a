"""`finetune eval`: generation metrics, the capability gate, history and reports, in one place
for the CLI and for the after-training hook. Everything that can fail on the user's input
(files, fields, suite) is checked before a model is loaded; outputs are written into a temp
dir beside `out` and renamed when complete."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from finetune import image_inputs, loading, locks
from finetune.config import EvalSection
from finetune.data.chat_formats import DEFAULT_REASONING_TAGS
from finetune.errors import RecipeError
from finetune.eval import gate, generation, modules, report, scores
from finetune.eval import suite as suites
from finetune.loading import load_for_eval
from finetune.outputs import check_target, replace_dir, write_text_atomic
from finetune.resources import find_suite

log = logging.getLogger("finetune")
HISTORY_NAME = "eval_history.jsonl"


@dataclass
class Request:
    out: Path
    model: str | None = None
    data: str | None = None
    split: str = "test"
    format: str | None = None
    max_samples: int | None = None
    max_new_tokens: int = EvalSection.max_new_tokens  # the defaults of the recipe's eval: section
    batch_size: int = EvalSection.batch_size
    predictions: str | None = None
    baseline: str | None = None
    base: str | None = None  # MODEL's base, when MODEL is an adapter whose recorded base moved
    suite: str | None = None
    language: str = "auto"
    metric_style: str = "standard"
    rouge_tokenizer: str = "chars"
    history: str | None = ""  # "" = eval_history.jsonl beside out; None = no history
    overwrite: bool = False
    name: str | None = None  # how the report names the model (default: MODEL)
    baseline_tokenizer: str | None = None  # tokenizer (chat template) for the baseline, e.g. the tuned run's
    items: list = field(default_factory=list)  # prompts + references given directly (the hook)
    data_label: str = ""
    data_language: str | None = None
    data_note: str = ""  # said beside the metrics (e.g. the data is what the model was trained on)
    reasoning_tags: tuple[str, str] | None = None  # None: MODEL's recorded data.reasoning_tags, else <think>


def _check(req: Request):
    if req.predictions and (req.model or req.data or req.suite or req.baseline):
        raise RecipeError(
            "--predictions scores an existing file: give it alone (no MODEL, --data, --suite or --baseline)"
        )
    if not req.predictions and not req.model:
        raise RecipeError("give MODEL (with --data and/or --suite) or --predictions FILE")
    if req.model and not (req.data or req.items or req.suite):
        raise RecipeError("nothing to evaluate: give --data DATASET and/or --suite SUITE")
    if req.baseline and not req.model:
        raise RecipeError("--baseline needs MODEL")
    if req.base and not req.model:
        raise RecipeError("--base needs MODEL (an adapter dir)")
    for key in ("max_samples", "max_new_tokens", "batch_size"):
        if getattr(req, key) is not None and getattr(req, key) < 1:
            raise RecipeError(f"--{key.replace('_', '-')}: must be at least 1")
    if req.history and Path(req.history).is_dir():
        raise RecipeError(f"--history: {req.history} is a directory; give a .jsonl file (or 'none')")
    if req.baseline and not req.baseline_tokenizer:  # the CLI's --baseline: found before the tuned model is scored
        base = Path(req.baseline).expanduser()
        if req.baseline.startswith(("/", "./", "../", "~")) and not base.exists():
            raise RecipeError(f"--baseline: {req.baseline}: no such directory")
    locks.check_free(req.out, "--out")  # in use by another process, or not writable: fail before any work
    check_target(req.out, req.overwrite, "--out")


def _language(req: Request, references: list[str]) -> str:
    if req.language != "auto":
        return req.language
    if req.data_language in ("en", "zh"):
        return req.data_language
    return scores.detect_language(references)


def run(req: Request) -> dict:
    """Evaluate; returns the report dict (report['suite']['regressions'] counts regressions)."""
    req.out = Path(req.out).expanduser().resolve()
    _check(req)
    preds = refs = None
    if req.predictions:
        preds, refs = generation.read_predictions(req.predictions)
    if req.data:
        req.items, req.data_language = generation.load_items(req.data, req.format, req.split, req.max_samples)
        req.data_label = req.data
    recipe = _recorded_recipe(req.model)
    if req.reasoning_tags is None:
        req.reasoning_tags = tuple((recipe.get("data") or {}).get("reasoning_tags") or DEFAULT_REASONING_TAGS)
    trained_on = (recipe.get("data") or {}).get("train")
    if req.data and isinstance(trained_on, str) and _same_data(req.data, trained_on):
        req.data_note = (
            f"Note: {req.data} is the data {req.model} was trained on (data.train): these scores measure how "
            "well it fits its training data, not how it generalises; evaluate on held-out data "
            "(data.eval, data.eval_ratio) for that."
        )
        log.warning("%s", req.data_note)
    suite = suites.load(find_suite(req.suite)) if req.suite else None
    if suite:
        suites.check_data(suite)

    locks.hold(req.out, "--out")  # one writer per output (finetune.locks); released below
    try:
        req.out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{req.out.name}.incomplete-", dir=req.out.parent))
    except BaseException:
        locks.release(req.out)
        raise
    try:
        pending_history: list = []
        result = _evaluate(req, work, preds, refs, suite, pending_history)
        check_target(req.out, req.overwrite, "--out")  # someone may have written there meanwhile
        replace_dir(work, req.out)  # atomic: the old report stays until the new one is in place
        for path, entry in pending_history:  # last: a history line only for an output that exists
            gate.append_history(path, entry)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        locks.release(req.out)


def _same_data(given: str, trained: str) -> bool:
    """Whether --data names the run's data.train: the same registry name / hub id, or the same file."""
    if given == trained:
        return True
    a, b = Path(given).expanduser(), Path(trained).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _recorded_recipe(model: str | None) -> dict:
    """The recipe.yaml a finetune output dir (adapter or merged model) was trained with; {} otherwise."""
    from finetune.outputs import OutputDir

    path = Path(model).expanduser() if model else None
    return OutputDir(path).recipe_dict() if path is not None and path.is_dir() else {}


def _score(req: Request, predictions: list[str], references: list[str], metric_kw: dict, opened=None):
    """Metrics of the answers (reasoning split off predictions and references by req.reasoning_tags), the
    splits, and the report's account of what was scored."""
    tags = tuple(req.reasoning_tags or DEFAULT_REASONING_TAGS)
    splits = [generation.split_answer(p, tags, bool(opened and opened[i])) for i, p in enumerate(predictions)]
    refs = [generation.split_answer(r, tags).answer for r in references]
    metrics = modules.score([s.answer for s in splits], refs, **metric_kw)
    scored = {
        "what": "answer",
        "reasoning_tags": list(tags),
        "with_reasoning": sum(bool(s.reasoning) or s.unfinished for s in splits),
        "unfinished_reasoning": sum(s.unfinished for s in splits),
    }
    return metrics, splits, scored


def _processor(loaded):
    """A vision-language model's processor, for eval prompts with images (None for a text model or a hub id)."""
    where = Path(loaded.adapter or loaded.base)
    return image_inputs.vision_processor(loading.inspect(where)) if where.is_dir() else None


def _score_model(req: Request, name: str, field: str, prefix: str, work: Path, suite, metric_kw: dict, tokenizer=None):
    """Load one model, answer req.items (-> `{prefix}predictions.jsonl`), run the suite; then free it.
    Returns (generation metrics or None, suite results or None, trainer_state.json or None)."""
    loaded = load_for_eval(name, field, tokenizer=tokenizer, base=req.base if field == "MODEL" else None)
    gen = results = None
    if req.items:
        log.info("generating %d answers with %s", len(req.items), name)
        answers = generation.generate(
            loaded.model,
            loaded.tokenizer,
            [it.prompt for it in req.items],
            req.max_new_tokens,
            req.batch_size,
            template_kwargs=loaded.template_kwargs,
            processor=_processor(loaded) if any(image_inputs.has_images(it.prompt) for it in req.items) else None,
            where=field,
        )
        kwargs = loaded.template_kwargs
        prompts = [generation.prompt_text(loaded.tokenizer, it.prompt, kwargs) for it in req.items]
        opened = [generation.prompt_opens_reasoning(p, req.reasoning_tags) for p in prompts]
        gen, splits, scored = _score(req, answers, [it.reference for it in req.items], metric_kw, opened)
        gen["scored"] = {**scored, "kept_in": f"{prefix}predictions.jsonl"}
        generation.write_predictions(
            work / f"{prefix}predictions.jsonl", loaded.tokenizer, req.items, answers, splits, kwargs
        )
    if suite:
        log.info("scoring %s on suite %s", name, suite.name)
        results = suites.run(loaded.model, loaded.tokenizer, suite)
    state = loaded.train_state
    del loaded  # one model in memory at a time
    gc.collect()
    return gen, results, state


def _evaluate(req: Request, work: Path, preds, refs, suite, pending_history: list) -> dict:
    rep: dict = {"model": req.name or req.model or str(req.predictions), "baseline": req.baseline}
    references = refs if preds is not None else [it.reference for it in req.items]
    language = _language(req, references) if references else None
    metric_kw = {"language": language, "style": req.metric_style, "rouge_tokenizer": req.rouge_tokenizer}
    gen_tuned = gen_base = tuned_suite = base_suite = trainer_state = None
    if preds is not None:
        gen_tuned, _, scored = _score(req, preds, refs, metric_kw)
        gen_tuned["scored"] = scored
    if req.model:
        gen_tuned, tuned_suite, trainer_state = _score_model(req, req.model, "MODEL", "", work, suite, metric_kw)
    if req.baseline:
        gen_base, base_suite, _ = _score_model(
            req, req.baseline, "--baseline", "baseline_", work, suite, metric_kw, tokenizer=req.baseline_tokenizer
        )
    if gen_tuned is not None:
        rep["generation"] = {"data": str(req.predictions) if preds is not None else req.data_label, "tuned": gen_tuned}
        if req.data_note:
            rep["generation"]["note"] = req.data_note
        if gen_base is not None:
            rep["generation"]["baseline"] = gen_base
            rep["generation"]["rows"] = gate.rows_to_dicts(gate.generation_rows(gen_tuned, gen_base))
    for name, metrics in (("metrics.json", gen_tuned), ("baseline_metrics.json", gen_base)):
        if metrics is not None:
            write_text_atomic(work / name, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    if suite:
        rows = gate.compare(suite, tuned_suite, base_suite) if base_suite else []
        rep["suite"] = {
            "name": suite.name,
            "path": str(suite.path),
            "tuned": tuned_suite,
            "baseline": base_suite,
            "rows": gate.rows_to_dicts(rows),
            "regressions": sum(r.regression for r in rows),
        }
        write_text_atomic(work / "suite.json", json.dumps(rep["suite"], indent=2, ensure_ascii=False) + "\n")

    history: list[dict] = []
    if req.history is not None:
        path = Path(req.history) if req.history else req.out.parent / HISTORY_NAME
        flat = {f"{t}/{m}": v for t, ms in (tuned_suite or {}).items() for m, v in ms.items()}
        flat.update({f"generation/{k}": v for k, v in (gen_tuned or {}).items() if isinstance(v, float)})
        entry = {
            "model": rep["model"],
            "baseline": req.baseline,
            "suite": suite.name if suite else None,
            "data": (rep.get("generation") or {}).get("data"),
            "out": str(req.out),
            "metrics": flat,
            "regressions": (rep.get("suite") or {}).get("regressions"),
        }
        history = gate.read_history(path) + [entry]  # appended only once the outputs are in place (run)
        rep["history_file"], rep["history_runs"] = str(path), len(history)
        pending_history[:] = [(path, entry)]
    report.write(work, rep, trainer_state, history)
    return rep


def summary(rep: dict) -> str:
    """The terminal's account: generation metrics (what was scored), then the gate's table (baseline, tuned,
    delta, tolerance, verdict per suite metric) and its verdict, as the after-training evaluation prints it."""
    lines = []
    gen = rep.get("generation")
    if gen:
        keys = [
            k
            for k in ("bleu", "sentence_bleu", "rouge1", "rouge2", "rougeL", "bleu-4", "rouge-l", "exact_match")
            if k in gen["tuned"]
        ]
        lines.append(
            "generation (tuned"
            + (", change from baseline" if gen.get("baseline") else "")
            + "): "
            + ", ".join(
                f"{k} {gen['tuned'][k]:.4g}"
                + (f" ({gen['tuned'][k] - gen['baseline'][k]:+.4g})" if gen.get("baseline") else "")
                for k in keys
            )
        )
        lines += report.data_notes(gen)
    s = rep.get("suite")
    if s:
        if s["rows"]:
            lines.append(report.verdict_table({"suite": s}))
        else:
            lines.append(f"suite {s['name']} (no baseline: nothing gated; give --baseline to compare)")
            lines += [f"tuned {t}/{m}: {v:.4g}" for t, ms in s["tuned"].items() for m, v in ms.items()]
    return "\n".join(lines)
