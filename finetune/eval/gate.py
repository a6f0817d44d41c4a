"""The regression gate: tuned vs baseline, metric by metric, against the suite's tolerances;
and the history file that keeps every run's numbers (one JSON object per line)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.eval.suite import Suite, direction


@dataclass
class Row:
    task: str
    metric: str
    baseline: float
    tuned: float
    delta: float  # tuned - baseline
    tolerance: float
    relative: bool  # tolerance is a fraction of the baseline (perplexity)
    higher_is_better: bool
    regression: bool


def compare(suite: Suite, tuned: dict, baseline: dict) -> list[Row]:
    """One row per task metric; `regression` when tuned is worse than baseline beyond tolerance."""
    rows = []
    for task in suite.tasks:
        for metric in task.metrics:
            t, b = tuned[task.name][metric], baseline[task.name][metric]
            higher, relative = direction(metric)
            worse = (b - t) if higher else (t - b)
            limit = task.tolerance[metric] * (abs(b) if relative else 1.0)
            rows.append(
                Row(task.name, metric, b, t, t - b, task.tolerance[metric], relative, higher, worse > limit + 1e-12)
            )
    return rows


def generation_rows(tuned: dict, baseline: dict) -> list[Row]:
    """Generation metrics of tuned vs baseline, reported with deltas (no tolerance: not gated)."""
    rows = []
    for metric, t in tuned.items():
        b = baseline.get(metric)
        if isinstance(t, (int, float)) and isinstance(b, (int, float)) and metric != "n":
            rows.append(Row("generation", metric, float(b), float(t), float(t) - float(b), 0.0, False, True, False))
    return rows


def read_history(path: Path) -> list[dict]:
    """Every entry of a JSONL history file (none if it does not exist; unreadable lines are skipped)."""
    history = []
    if not Path(path).is_file():
        return history
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            history.append(json.loads(line))
        except ValueError:
            continue
    return history


def append_history(path: Path, entry: dict) -> list[dict]:
    """Append one run to the JSONL history; returns every entry (unreadable lines are skipped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    history = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            history.append(json.loads(line))
        except ValueError:
            continue
    return history


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
