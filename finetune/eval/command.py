"""The `finetune eval` command line: arguments -> run.Request -> exit code."""

from __future__ import annotations

import argparse

from finetune.config import DATA_FORMATS, EvalSection
from finetune.eval.scores import LANGUAGES, ROUGE_TOKENIZERS, STYLES

EXIT_REGRESSION = 1


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="evaluate a model or adapter: BLEU/ROUGE, capability suite vs a baseline, reports",
        description="Generation metrics on a dataset (--data), or on an existing predictions file (--predictions), "
        "and/or a capability suite compared with a baseline (--suite, --baseline). Writes predictions.jsonl, "
        "metrics.json, report.{json,md,html} into --out and appends to a history file.",
    )
    p.add_argument("model", nargs="?", help="model dir, adapter dir (finetune output), hub id or tiny-llama")
    p.add_argument("--data", help="dataset: registry name, file or hub id (the reference is the last assistant turn)")
    p.add_argument("--split", default="test", help="split of a hub dataset (default test; a file is used whole)")
    p.add_argument("--format", choices=DATA_FORMATS, help="record format when it cannot be guessed")
    p.add_argument("--max-samples", type=int, help="score only the first N examples")
    defaults = EvalSection()  # the recipe's eval: section and the command share their defaults
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help=f"answer length limit (default {defaults.max_new_tokens})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"prompts per generation batch (default {defaults.batch_size})",
    )
    p.add_argument(
        "--predictions",
        metavar="FILE.jsonl",
        help="score this file (records with prediction, reference) instead of generating",
    )
    p.add_argument("--base", help="MODEL's base model, when MODEL is an adapter whose recorded base moved")
    p.add_argument("--baseline", help="model to compare with (usually the base model)")
    p.add_argument("--suite", help="capability suite YAML, e.g. eval/suites/general.yaml")
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help=f"exit {EXIT_REGRESSION} when a suite metric regresses beyond its tolerance",
    )
    p.add_argument(
        "--language", choices=LANGUAGES, default="auto", help="BLEU tokenizer: en (13a) or zh; auto detects"
    )
    p.add_argument(
        "--metric-style",
        choices=STYLES,
        default="standard",
        help="standard (sacrebleu + rouge-score) or llamafactory (its character BLEU-4 and jieba ROUGE)",
    )
    p.add_argument(
        "--rouge-tokenizer",
        choices=ROUGE_TOKENIZERS,
        default="chars",
        help="ROUGE tokens for Chinese: characters or jieba words",
    )
    p.add_argument(
        "--reasoning-tags",
        nargs=2,
        metavar=("OPEN", "CLOSE"),
        help="tags of the reasoning a prediction opens with, split off before scoring "
        "(default: MODEL's recorded data.reasoning_tags, else <think> </think>)",
    )
    p.add_argument(
        "--history", default="", help="JSONL history file (default: eval_history.jsonl beside --out; 'none' = off)"
    )
    p.add_argument("--out", required=True, help="output dir (must not hold a finished result unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped with a model (auto_map): only "
        "for models you trust; never taken from the evaluated dir's recipe.yaml",
    )
    p.add_argument("--allow-pickle", action="store_true", help="also load pickled weights (.bin), which can run code")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def main(args) -> int:
    import logging

    from finetune.eval.run import Request, run, summary

    req = Request(
        out=args.out,
        model=args.model,
        data=args.data,
        split=args.split,
        format=args.format,
        max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        predictions=args.predictions,
        baseline=args.baseline,
        base=args.base,
        suite=args.suite,
        language=args.language,
        metric_style=args.metric_style,
        rouge_tokenizer=args.rouge_tokenizer,
        history=None if args.history.lower() == "none" else args.history,
        overwrite=args.overwrite,
        reasoning_tags=tuple(args.reasoning_tags) if args.reasoning_tags else None,
    )
    rep = run(req)
    print(summary(rep))
    logging.getLogger("finetune").info("report: %s", req.out / "report.html")
    regressions = (rep.get("suite") or {}).get("regressions") or 0
    return EXIT_REGRESSION if args.fail_on_regression and regressions else 0
