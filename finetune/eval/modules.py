"""The metrics as `evaluate` modules shipped inside the package, loaded by path.

`evaluate.load("sacrebleu")` needs the hub; a local folder with a metric script works offline.
evaluate copies the script into its modules cache (under HF_HOME); when that is not writable
(a read-only home or install) the copy goes to a private temporary folder instead.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

from finetune.eval import scores

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
NAMES = ("bleu", "rouge", "exact_match", "llamafactory")


def path(name: str) -> Path:
    return METRICS_DIR / name


def _writable(directory: Path) -> bool:
    directory = directory.resolve()
    while not directory.exists():
        directory = directory.parent
    return os.access(directory, os.W_OK)


_chosen: dict[str, str | None] = {}


def set_modules_dir(directory: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
    """Where evaluate's copies of the scripts go (and its metric cache dirs, when given), for
    this process, before the first load."""
    from evaluate.loading import init_dynamic_modules

    _chosen["modules"] = init_dynamic_modules(hf_modules_cache=str(directory))
    _chosen["cache"] = str(cache_dir) if cache_dir else str(Path(directory) / "metrics")


def _dirs() -> tuple[str, str | None]:
    """evaluate's own caches when writable, else a private temp dir; fixed per process
    (evaluate imports the copies as one package, `evaluate_modules`)."""
    if "modules" not in _chosen:
        from evaluate import config

        modules_cache, metrics_cache = Path(config.HF_MODULES_CACHE), Path(config.HF_METRICS_CACHE)
        if _writable(modules_cache) and _writable(metrics_cache):
            set_modules_dir(modules_cache, metrics_cache)
        else:
            private = tempfile.mkdtemp(prefix="finetune-evaluate-")
            atexit.register(shutil.rmtree, private, True)
            set_modules_dir(private)
    return _chosen["modules"], _chosen["cache"]


@cache
def load(name: str):
    """The `evaluate.EvaluationModule` of one of NAMES (kept in memory: nothing is written beside it)."""
    from evaluate.loading import evaluation_module_factory, import_main_class

    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r} (one of {', '.join(NAMES)})")
    modules_dir, cache_dir = _dirs()
    module = evaluation_module_factory(str(path(name)), dynamic_modules_path=modules_dir)
    cls = import_main_class(module.module_path)
    return cls(keep_in_memory=True, hash=module.hash, cache_dir=cache_dir)


def score(
    predictions, references, language: str = "auto", style: str = "standard", rouge_tokenizer: str = "chars"
) -> dict:
    """All metrics of a style through the evaluate modules: the numbers of `metrics.json`."""
    predictions, references = list(predictions), list(references)
    language = scores.detect_language(references) if language == "auto" else language
    out: dict = {"n": len(predictions), "language": language, "style": style}
    if style == "llamafactory":
        out.update(load("llamafactory").compute(predictions=predictions, references=references))
    else:
        bleu = load("bleu").compute(predictions=predictions, references=references, language=language)
        out.update({k: v for k, v in bleu.items() if k != "language"})
        out.update(load("rouge").compute(predictions=predictions, references=references, tokenizer=rouge_tokenizer))
        out["rouge_tokenizer"] = rouge_tokenizer
    out.update(load("exact_match").compute(predictions=predictions, references=references))
    return out
