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


BASELINE, TUNED, WORSE = "#8d99ae", "#2b6cb0", "#c53030"


def _grid(plt, n: int, cols: int = 4, size: tuple[float, float] = (2.6, 2.3)):
    """n small panels, `cols` to a row; the unused ones hidden."""
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols + 0.4, size[1] * rows + 0.3), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def bars_plot(rows: list[dict]) -> str | None:
    """Baseline vs tuned: one panel per metric (each on its own scale, from zero), values written on the
    bars, the tuned bar red where the gate flags a regression."""
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(rows))
    for ax, r in zip(axes, rows):
        colours = [BASELINE, WORSE if r["regression"] else TUNED]
        bars = ax.bar(["baseline", "tuned"], [r["baseline"], r["tuned"]], color=colours, width=0.6)
        ax.bar_label(bars, labels=[_fmt(r["baseline"]), _fmt(r["tuned"])], fontsize=8, padding=2)
        ax.set_title(
            f"{r['task']}\n{r['metric']}" + (" (lower is better)" if not r["higher_is_better"] else ""), fontsize=8.5
        )
        ax.set_ylim(0, max(r["baseline"], r["tuned"], 1e-9) * 1.22)
        ax.tick_params(labelsize=7.5)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _png(fig)


def comparable_runs(history: list[dict], report: dict) -> list[dict]:
    """The history entries measured like this report (same suite, same generation data): a trend
    mixes neither suite-only with generation runs nor two data sets."""
    suite = (report.get("suite") or {}).get("name")
    data = (report.get("generation") or {}).get("data")
    return [h for h in history if h.get("suite") == suite and h.get("data") == data]


def history_plot(history: list[dict]) -> str | None:
    """Each metric over the runs (one panel per metric, run numbers on the x axis); None below 2 runs."""
    if len(history) < 2:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for i, entry in enumerate(history, 1):
        for key, value in (entry.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((i, value))
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(series), size=(2.8, 2.2))
    for ax, (key, points) in zip(axes, series.items()):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, "o-", color=TUNED, markersize=4)
        ax.plot(
            xs[-1:], ys[-1:], "o", color=WORSE if len(ys) > 1 and _worse(key, ys[-1], ys[-2]) else TUNED, markersize=7
        )
        ax.set_title(key, fontsize=8.5)
        ax.set_xticks(xs if len(xs) <= 8 else xs[:: max(1, len(xs) // 8)])
        ax.set_xlabel("run", fontsize=7.5)
        ax.tick_params(labelsize=7.5)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _png(fig)


def _worse(key: str, last: float, before: float) -> bool:
    from finetune.eval.suite import direction

    higher, _ = direction(key.rsplit("/", 1)[-1])
    return last < before if higher else last > before


def sample_rows(predictions_file: Path, n: int = 5) -> tuple[list[dict], list[dict]]:
    """The `n` worst and `n` best predictions by their own ROUGE-L F1 against the reference."""
    from finetune.eval import scores

    try:
        rows = [
            json.loads(line)
            for line in Path(predictions_file).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    except (OSError, ValueError):
        return [], []
    for r in rows:
        r["rougeL"] = scores.rouge([r.get("answer", r["prediction"])], [r["reference"]])["rougeL"]
    ranked = sorted(range(len(rows)), key=lambda i: (rows[i]["rougeL"], i))
    k = min(n, len(rows) // 2) if len(rows) > 1 else len(rows)  # few rows: split them, never show one twice
    return [rows[i] for i in ranked[:k]], [rows[i] for i in reversed(ranked[len(rows) - k :])] if len(rows) > 1 else []


def _table(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        tol = (
            ""
            if r["task"] == "generation"
            else (f"{r['tolerance']:.0%} rel." if r["relative"] else f"{r['tolerance']:g}")
        )
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


def scored_note(gen: dict) -> str:
    """What the generation metrics scored: the answer, with the reasoning split off (how many had some)."""
    scored = gen["tuned"].get("scored")
    if not scored:
        return ""
    open_tag, close_tag = scored["reasoning_tags"]
    n, k = gen["tuned"].get("n", 0), scored["with_reasoning"]
    if not k:
        return f"Scored: the whole prediction (none opened with reasoning in {open_tag}…{close_tag})."
    note = f"Scored: the answer after {close_tag}; the reasoning in {open_tag}…{close_tag} of {k} of {n} predictions "
    note += "was split off" + (
        f" ({scored['kept_in']} keeps it as `reasoning`, the scored text as `answer`)."
        if scored.get("kept_in")
        else "."
    )
    if scored["unfinished_reasoning"]:
        note += (
            f" {scored['unfinished_reasoning']} never closed their reasoning within max_new_tokens and "
            "scored as empty answers."
        )
    return note


def data_notes(gen: dict) -> list[str]:
    return [n for n in (scored_note(gen), gen.get("note", "")) if n]


def markdown(report: dict) -> str:
    lines = [f"# Evaluation of `{report['model']}`", ""]
    if report.get("baseline"):
        lines += [f"Baseline: `{report['baseline']}`", ""]
    gen = report.get("generation")
    if gen:
        n, style = plural(gen["tuned"]["n"], "example"), gen["tuned"]["style"]
        lines += [f"## Generation metrics on `{gen['data']}` ({n}, {style} style)", ""]
        lines += [
            "| metric | tuned |" + (" baseline | delta |" if gen.get("baseline") else ""),
            "|---|---|" + ("---|---|" if gen.get("baseline") else ""),
        ]
        for k, v in gen["tuned"].items():
            if isinstance(v, float):
                b = (gen.get("baseline") or {}).get(k)
                lines.append(f"| {k} | {_fmt(v)} |" + (f" {_fmt(b)} | {v - b:+.4g} |" if isinstance(b, float) else ""))
        lines.append("")
        lines += [line for note in data_notes(gen) for line in (note, "")]
    suite = report.get("suite")
    if suite:
        verdict = f"**{plural(suite['regressions'], 'regression')}**" if suite["regressions"] else "no regression"
        lines += [
            f"## Capability suite `{suite['name']}`: {verdict}",
            "",
            "| " + " | ".join(HEAD) + " |",
            "|" + "---|" * len(HEAD),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in _table(suite["rows"])]
        lines.append("")
    if report.get("history_file"):
        lines += [f"History: `{report['history_file']}` ({plural(report.get('history_runs', 0), 'run')}).", ""]
    return "\n".join(lines)


def card_section(report: dict) -> str:
    """The model card's evaluation section (markdown without the title)."""
    body = markdown(report).split("\n", 2)[2]
    return "\n## Evaluation\n\n" + body.replace("\n## ", "\n### ") + "\nFull report: `eval/report.html`.\n"


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC","PingFang SC",sans-serif;
 max-width:1080px;margin:2em auto;padding:0 1em;color:#1a202c;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em}\
h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #e2e8f0;padding-bottom:.2em}
.sub{color:#4a5568;margin-top:0}.verdict{display:inline-block;padding:.35em .8em;border-radius:6px;font-weight:600}
.pass{background:#e6f4ea;color:#1e6b34}.fail{background:#fde8e8;color:#9b1c1c}.none{background:#edf2f7;color:#2d3748}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}\
td,th{border:1px solid #e2e8f0;padding:4px 9px;vertical-align:top}
th{background:#f7fafc;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fde8e8}td.up{color:#1e6b34}td.down{color:#9b1c1c}
table.samples{width:100%}table.samples td{max-width:330px}\
table.samples pre{white-space:pre-wrap;margin:0;font-size:.88em;max-height:9em;overflow:auto}
img{max-width:100%;border:1px solid #edf2f7;border-radius:4px}.note{color:#4a5568;font-size:.92em}
"""


def html_page(report: dict, images: dict[str, str], samples: tuple[list[dict], list[dict]] = ([], [])) -> str:
    def esc(value) -> str:
        return html.escape(str(value))

    def table(rows, head, numeric=(), bad=None, cls=""):
        th = "".join(f"<th>{esc(h)}</th>" for h in head)
        body = []
        for r in rows:
            cells = "".join(
                f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>" for i, c in enumerate(r)
            )
            row_class = ' class="bad"' if bad and bad(r) else ""
            body.append(f"<tr{row_class}>{cells}</tr>")
        return f'<table class="{cls}"><tr>{th}</tr>{"".join(body)}</table>'

    def image(key, title, note=""):
        if not images.get(key):
            return ""
        return f'<h2>{title}</h2>{note}<img alt="{title}" src="data:image/png;base64,{images[key]}">'

    suite, gen = report.get("suite"), report.get("generation")
    parts = [f"<h1>Evaluation of <code>{esc(report['model'])}</code></h1>"]
    if report.get("baseline"):
        parts.append(f'<p class="sub">against the baseline <code>{esc(report["baseline"])}</code></p>')
    if suite and suite.get("baseline"):
        n = suite["regressions"]
        verdict = (
            f'<span class="verdict fail">Gate: {plural(n, "regression")}</span>'
            if n
            else '<span class="verdict pass">Gate: passed (no regression)</span>'
        )
        parts.append(f"<p>{verdict} on suite <code>{esc(suite['name'])}</code></p>")
    if gen:
        base = gen.get("baseline") or {}
        rows = [
            [k, _fmt(v)] + ([_fmt(base.get(k)), f"{v - base[k]:+.4g}"] if isinstance(base.get(k), float) else [])
            for k, v in gen["tuned"].items()
            if isinstance(v, float)
        ]
        head = ["metric", "tuned"] + (["baseline", "delta"] if base else [])
        parts.append(
            f"<h2>Generation metrics on <code>{esc(gen['data'])}</code> "
            f"({plural(gen['tuned'].get('n', 0), 'example')}, {esc(gen['tuned'].get('style', ''))} style)</h2>"
        )
        parts.append(table(rows, head, numeric={1, 2, 3}))
        parts += [f'<p class="note">{esc(note)}</p>' for note in data_notes(gen)]
    if suite:
        parts.append(f"<h2>Capability suite <code>{esc(suite['name'])}</code></h2>")
        parts.append(
            table(_table(suite["rows"]), HEAD, numeric={2, 3, 4}, bad=lambda r: r[-1] == "REGRESSION")
            if suite["rows"]
            else table(
                [[t, m, _fmt(v)] for t, ms in suite["tuned"].items() for m, v in ms.items()],
                ["task", "metric", "tuned"],
                numeric={2},
            )
        )
    parts.append(
        image(
            "bars",
            "Baseline vs tuned",
            '<p class="note">One panel per metric, each on its own scale '
            "from zero; red: a regression beyond the suite's tolerance.</p>",
        )
    )
    worst, best = samples
    for title, rows in (("Worst predictions", worst), ("Best predictions", best)):
        if rows:
            body = [
                [_prompt_tail(r["prompt"]), r["reference"], r.get("answer", r["prediction"]), _fmt(r["rougeL"])]
                for r in rows
            ]
            th = "".join(f"<th>{h}</th>" for h in ("prompt (end)", "reference", "answer (scored)", "ROUGE-L"))
            trs = "".join(
                "<tr>"
                + "".join(f"<td><pre>{esc(c)}</pre></td>" for c in row[:3])
                + f'<td class="num">{esc(row[3])}</td></tr>'
                for row in body
            )
            note = "By each answer's own ROUGE-L F1 against its reference."
            parts.append(
                f'<h2>{title}</h2><p class="note">{note}</p><table class="samples"><tr>{th}</tr>{trs}</table>'
            )
    parts.append(image("loss", "Training loss"))
    runs = report.get("comparable_runs", 0)
    if images.get("history"):
        parts.append(
            image(
                "history",
                "History",
                f'<p class="note">{plural(runs, "run")} measured the same way in '
                f"<code>{esc(report.get('history_file', ''))}</code>; the last point "
                "is this run (red: worse than the run before).</p>",
            )
        )
    elif report.get("history_file"):
        parts.append(
            f'<h2>History</h2><p class="note">This is the first run measured this way in '
            f"<code>{esc(report['history_file'])}</code>: the trend appears from the second.</p>"
        )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>finetune eval: {esc(report["model"])}'
        f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def _prompt_tail(prompt: str, limit: int = 400) -> str:
    return prompt if len(prompt) <= limit else "…" + prompt[-limit:]


def write(out: Path, report: dict, trainer_state: Path | None, history: list[dict]) -> None:
    rows = list((report.get("suite") or {}).get("rows", [])) + list((report.get("generation") or {}).get("rows", []))
    runs = comparable_runs(history, report)
    report["comparable_runs"] = len(runs)
    images = {"loss": loss_plot(trainer_state), "bars": bars_plot(rows), "history": history_plot(runs)}
    report["plots"] = [k for k, v in images.items() if v]
    samples = sample_rows(out / "predictions.jsonl")
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    write_text_atomic(out / "report.html", html_page(report, images, samples))
