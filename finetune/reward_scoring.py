"""`finetune score RM_DIR --data FILE`: a reward model's score for every record, as JSONL.

Pairs get `chosen`, `rejected` and `margin`; KTO examples `score` and `label`; chats (SFT
formats) `score` of the whole conversation. A summary (pairwise accuracy, mean margin) goes to
stderr. `score_conversations` is the same scorer for code (RL reward functions).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from finetune.config import DataSection
from finetune.errors import DataError


@torch.no_grad()
def score_conversations(
    model, tok, conversations: list, batch_size: int = 16, max_length: int | None = None
) -> list[float]:
    """The reward of each conversation (a message list, rendered with the chat template as
    RewardTrainer renders it, or an already rendered string)."""
    texts = [c if isinstance(c, str) else tok.apply_chat_template(c, tokenize=False) for c in conversations]
    device = next(model.parameters()).device
    scores: list[float] = []
    side = tok.padding_side
    tok.padding_side = "right"  # the classifier reads the last non-pad token
    try:
        for start in range(0, len(texts), batch_size):
            batch = tok(
                texts[start : start + batch_size],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
                truncation=max_length is not None,
                max_length=max_length,
            ).to(device)
            scores += model(**batch).logits[:, 0].float().tolist()
    finally:
        tok.padding_side = side
    return scores


def score_file(rm_dir: str, data: str, fmt: str | None = None, out: str | None = None, batch_size: int = 16) -> dict:
    """Score every record of `data` with the reward model in `rm_dir`; write JSONL to `out`
    (atomically) or stdout; return the summary."""
    from finetune.data import read_examples
    from finetune.loading import load_reward_model

    examples, fmt, src = read_examples(data, DataSection(train=data, format=fmt), field_name="--data")
    if out and Path(out).resolve() == Path(src.label()).resolve():
        raise DataError(f"--out: {out} is the input file")
    from finetune import locks

    if out:
        locks.check_free(out, "--out")  # in use, or not writable: fail before the scoring
    model, tok = load_reward_model(rm_dir)
    rows = _score_examples(model, tok, examples, batch_size, src.label())
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out:
        from finetune.outputs import write_text_atomic

        locks.hold(out, "--out")
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(out), text)
        finally:
            locks.release(out)
    else:
        sys.stdout.write(text)
    return _summary(rows, fmt)


def _score_examples(model, tok, examples: list[dict], batch_size: int, label: str) -> list[dict]:
    convs, slots = [], []  # slots[i] = (row, key) the i-th score goes to
    rows = []
    for i, e in enumerate(examples):
        row = {"record": i}
        if "chosen" in e:
            keys = {"chosen": e["prompt"] + e["chosen"], "rejected": e["prompt"] + e["rejected"]}
        elif "completion" in e and isinstance(e["completion"], list):
            keys, row["label"] = {"score": e["prompt"] + e["completion"]}, e["label"]
        elif "messages" in e:
            keys = {"score": e["messages"]}
        else:
            raise DataError(
                f"{label}: record {i}: a reward model scores answers; this format gives only "
                "prompts or raw text (use a chat or preference format)"
            )
        for key, conv in keys.items():
            convs.append(conv)
            slots.append((row, key))
        rows.append(row)
    for (row, key), s in zip(slots, score_conversations(model, tok, convs, batch_size)):
        row[key] = round(s, 6)
    for row in rows:
        if "chosen" in row:
            row["margin"] = round(row["chosen"] - row["rejected"], 6)
    return rows


def _summary(rows: list[dict], fmt: str) -> dict:
    summary = {"records": len(rows), "format": fmt}
    pairs = [r for r in rows if "margin" in r]
    if pairs:
        summary["accuracy"] = sum(r["margin"] > 0 for r in pairs) / len(pairs)
        summary["mean_margin"] = sum(r["margin"] for r in pairs) / len(pairs)
    labelled = [r for r in rows if "label" in r]
    if labelled:
        good = [r["score"] for r in labelled if r["label"]]
        bad = [r["score"] for r in labelled if not r["label"]]
        if good and bad:
            summary["mean_desirable"], summary["mean_undesirable"] = sum(good) / len(good), sum(bad) / len(bad)
    return summary
