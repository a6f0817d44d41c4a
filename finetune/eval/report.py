"""report.json, report.md and a self-contained report.html (plots embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from finetune.errors import plural
from finetune.outputs import write_text_atomic

PERCENT_METRICS = {"bleu", "sentence_bleu", "bleu-4", "rouge-1", "rouge-2", "rouge-l"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_plot(trainer_state: Path | None) -> str | None:
    if trainer_state is None:
        return None
    try:
        log = json.loads(Path(trainer_state).read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError):
        return None
    train = [(h["step"], h["loss"]) for h in log if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log if "eval_loss" in h and "step" in h]
    if not train:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.legend()
    return _png(fig)


def bars_plot(rows: list[dict]) -> str | None:
    """Baseline vs tuned, one panel per task (metrics of one task share a scale)."""
    if not rows:
        return None
    def panel(r):  # generation metrics on a 0-100 scale get their own panel
        return f"{r['task']} (0-100)" if r["task"] == "generation" and r["metric"] in PERCENT_METRICS else r["task"]

    tasks = list(dict.fromkeys(panel(r) for r in rows))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks) + 1, 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if panel(r) == task]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["baseline"] for r in mine], 0.4, label="baseline", color="#9aa5b1")
        ax.bar([x + 0.2 for x in xs], [r["tuned"] for r in mine], 0.4, label="tuned",
               color=["#d64545" if r["regression"] else "#3b82c4" for r in mine])
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["metric"] for r in mine], rotation=30, ha="right", fontsize=8)
        ax.set_title(task, fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Baseline vs tuned (red: regression)", y=1.04)
    return _png(fig)


def history_plot(history: list[dict]) -> str | None:
    """Each gated metric of the tuned model over the runs in the history file."""
    series: dict[str, list[tuple[int, float]]] = {}
    for i, entry in enumerate(history):
        for key, value in (entry.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                series.setdefault(key, []).append((i, value))
    if not series or len(history) < 1:
        return None
    plt = _pyplot()
    ppl = {k: v for k, v in series.items() if k.endswith("/perplexity")}
    rest = {k: v for k, v in series.items() if k not in ppl}
    panels = [p for p in ((rest, "score"), (ppl, "perplexity")) if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.4), squeeze=False)
    for ax, (group, label) in zip(axes[0], panels):
        for key, points in group.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=key)
        ax.set_xlabel("run (history order)")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.suptitle("History", y=1.02)
    return _png(fig)


def _table(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        tol = "" if r["task"] == "generation" else (f"{r['tolerance']:.0%} rel." if r["relative"] else f"{r['tolerance']:g}")
        verdict = "REGRESSION" if r["regression"] else ("" if r["task"] == "generation" else "ok")
        out.append([r["task"], r["metric"], _fmt(r["baseline"]), _fmt(r["tuned"]), f"{r['delta']:+.4g}", tol, verdict])
    return out


HEAD = ["task", "metric", "baseline", "tuned", "delta", "tolerance", "verdict"]


def verdict_table(report: dict) -> str:
    """The gate's verdict as an aligned plain-text table, for the terminal ('' when nothing was compared)."""
    suite = report.get("suite") or {}
    rows = _table(suite.get("rows") or []) + _table((report.get("generation") or {}).get("rows") or [])
    if not rows:
        return ""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEAD, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if suite.get("rows"):
        n = suite["regressions"]
        lines.append(f"suite {suite['name']}: " + (plural(n, "regression") if n else "passed (no regression)"))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    lines = [f"# Evaluation of `{report['model']}`", ""]
    if report.get("baseline"):
        lines += [f"Baseline: `{report['baseline']}`", ""]
    gen = report.get("generation")
    if gen:
        n, style = plural(gen["tuned"]["n"], "example"), gen["tuned"]["style"]
        lines += [f"## Generation metrics on `{gen['data']}` ({n}, {style} style)", ""]
        lines += ["| metric | tuned |" + (" baseline | delta |" if gen.get("baseline") else ""),
                  "|---|---|" + ("---|---|" if gen.get("baseline") else "")]
        for k, v in gen["tuned"].items():
            if isinstance(v, float):
                b = (gen.get("baseline") or {}).get(k)
                lines.append(f"| {k} | {_fmt(v)} |" + (f" {_fmt(b)} | {v - b:+.4g} |" if isinstance(b, float) else ""))
        lines.append("")
    suite = report.get("suite")
    if suite:
        verdict = f"**{plural(suite['regressions'], 'regression')}**" if suite["regressions"] else "no regression"
        lines += [f"## Capability suite `{suite['name']}`: {verdict}", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in _table(suite["rows"])]
        lines.append("")
    if report.get("history_file"):
        lines += [f"History: `{report['history_file']}` ({plural(report.get('history_runs', 0), 'run')}).", ""]
    return "\n".join(lines)


def card_section(report: dict) -> str:
    """The model card's evaluation section (markdown without the title)."""
    body = markdown(report).split("\n", 2)[2]
    return "\n## Evaluation\n\n" + body.replace("\n## ", "\n### ") + "\nFull report: `eval/report.html`.\n"


def html_page(report: dict, images: dict[str, str]) -> str:
    def table(rows, head):
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr" + (' class="bad"' if "REGRESSION" in r else "") + ">" +
                      "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><tr>{th}</tr>{trs}</table>"

    parts = [f"<h1>Evaluation of <code>{html.escape(report['model'])}</code></h1>"]
    if report.get("baseline"):
        parts.append(f"<p>Baseline: <code>{html.escape(report['baseline'])}</code></p>")
    gen = report.get("generation")
    if gen:
        rows = [[k, _fmt(v), _fmt((gen.get("baseline") or {}).get(k))] for k, v in gen["tuned"].items() if isinstance(v, float)]
        parts.append(f"<h2>Generation metrics on <code>{html.escape(str(gen['data']))}</code></h2>")
        parts.append(table(rows, ["metric", "tuned", "baseline"]))
    suite = report.get("suite")
    if suite:
        parts.append(f"<h2>Capability suite <code>{html.escape(suite['name'])}</code>: "
                     f"{plural(suite['regressions'], 'regression')}</h2>")
        parts.append(table(_table(suite["rows"]), HEAD))
    for key, title in (("loss", "Training loss"), ("bars", "Baseline vs tuned"), ("history", "History")):
        if images.get(key):
            parts.append(f"<h2>{title}</h2><img alt=\"{title}\" src=\"data:image/png;base64,{images[key]}\">")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}tr.bad{background:#fdd}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>finetune eval</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write(out: Path, report: dict, trainer_state: Path | None, history: list[dict]) -> None:
    rows = list((report.get("suite") or {}).get("rows", [])) + list((report.get("generation") or {}).get("rows", []))
    images = {"loss": loss_plot(trainer_state), "bars": bars_plot(rows), "history": history_plot(history)}
    report["plots"] = [k for k, v in images.items() if v]
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    write_text_atomic(out / "report.html", html_page(report, images))
