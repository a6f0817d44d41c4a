"""The recipe's `eval:` section, run after training on the output dir: generation metrics on
the held-out split (or eval.data) and the capability suite, tuned vs the base model."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.errors import FinetuneError, plural
from finetune.eval import generation, report
from finetune.eval.run import HISTORY_NAME, Request
from finetune.eval.run import run as run_eval
from finetune.outputs import write_text_atomic

log = logging.getLogger("finetune")


def heldout_items(recipe, heldout=None) -> tuple[list, str, str | None]:
    """(items, label, registry language) of eval.data, else (SFT only) data.eval, else the data.eval_ratio
    split: `heldout`, the split the stage trained with (its `record` column names the held-out records),
    or, called on its own, that split as data.load makes it again (from the prepared-data cache)."""
    from finetune import data

    cfg, d = recipe.eval, recipe.data
    if cfg.data:
        items, language = generation.load_items(cfg.data, None, d.split, cfg.max_samples, d.registry)
        return items, cfg.data, language
    if recipe.stage not in ("sft", "distill"):  # preference / prompt data: no single reference answer; eval.data
        return [], "", None
    if d.eval:
        examples, _, src = data.read_examples(d.eval, d, fmt=d.format, field_name="data.eval")
    elif d.eval_ratio:  # the records of the rows training held out: no re-encoding
        held_out = heldout if getattr(heldout, "table", None) is not None else _heldout_split(recipe)
        records = sorted(set(held_out.table.with_format("arrow")["record"].to_numpy().tolist()))
        examples, _, src = data.read_examples(d.train, d)
        examples = [examples[i] for i in records]
    else:
        return [], "", None
    items = generation.items_from_examples(examples, src.label())
    return items[: cfg.max_samples] if cfg.max_samples else items, f"{src.label()} (held out)", src.language


def _heldout_split(recipe):
    from finetune import data, loading
    from finetune.data.encode import options_of

    tok = loading.load_tokenizer(recipe.model)
    d = recipe.data
    return data.load(d, tok, recipe.train["max_length"], seed=recipe.train["seed"], options=options_of(recipe)).eval


def run(recipe, output_dir, heldout=None) -> str:
    """Evaluate into `output_dir/eval`, append the section to its model card, return it (`heldout`: the
    stage's held-out split, see heldout_items). A user error here (data, suite) is reported in the log
    and the card; the training output stays."""
    cfg, output_dir = recipe.eval, Path(output_dir)
    section = _evaluate(recipe, cfg, output_dir, heldout)
    rep = read_report(output_dir)
    table = report.verdict_table(rep) if rep else ""
    if table:
        log.info("evaluation of %s (full report: %s):\n%s", output_dir, output_dir / "eval" / "report.html", table)
    card = output_dir / "README.md"
    if section and card.is_file():
        write_text_atomic(card, card.read_text(encoding="utf-8") + section)
    return section


def read_report(output_dir) -> dict | None:
    """The `eval/report.json` of a finished output dir, or None."""
    import json

    try:
        return json.loads((Path(output_dir) / "eval" / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def gate_failure(recipe, output_dir) -> str | None:
    """With `eval.fail_on_regression`, why the run fails its gate (regressions, or no report), else None."""
    if getattr(recipe, "eval", None) is None or not recipe.eval.fail_on_regression:
        return None
    rep = read_report(output_dir)
    if rep is None:
        return f"eval.fail_on_regression: the evaluation of {output_dir} did not finish (see above); output kept"
    n = (rep.get("suite") or {}).get("regressions") or 0
    if n:
        rows = [f"{r['task']} {r['metric']}" for r in rep["suite"]["rows"] if r["regression"]]
        return (
            f"eval.fail_on_regression: {plural(n, 'regression')} ({', '.join(rows)}); "
            f"the output in {output_dir} is kept and its card marks them"
        )
    return None


def _evaluate(recipe, cfg, output_dir: Path, heldout=None) -> str:
    try:
        items, label, language = heldout_items(recipe, heldout)
        if not items and not cfg.suite:
            log.warning("eval: nothing to evaluate (no data.eval, data.eval_ratio or eval.data, and no eval.suite)")
            return ""
        req = Request(
            out=output_dir / "eval",
            model=str(output_dir),
            baseline=recipe.model.name_or_path,
            baseline_tokenizer=str(output_dir),
            items=items,
            data_label=label,
            data_language=language,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            suite=cfg.suite,
            language=cfg.language,
            metric_style=cfg.metric_style,
            rouge_tokenizer=cfg.rouge_tokenizer,
            history=cfg.history or str(output_dir.parent / HISTORY_NAME),
            overwrite=True,
        )
        rep = run_eval(req)
    except FinetuneError as e:
        log.error("eval after training failed (the trained output in %s is complete): %s", output_dir, e)
        return f"\n## Evaluation\n\nThe recipe's `eval:` section failed: {e}\n"
    return report.card_section(rep)
