"""How far each QLoRA merge is from the 4-bit adapter model it came from, on a trained adapter.

    python bench/merge_qlora.py                      # trains recipes/tiny/sft_qlora.yaml briefly, merges both ways
    python bench/merge_qlora.py --adapter DIR        # an existing QLoRA output dir instead

Prints, for `--onto dequantized` and `--onto original`: the merge check (written model vs the adapter
on the base it was merged into), the deviation from the 4-bit adapter model (max |Δlogit| on the
probe chats), and how many greedy tokens of answers to the demo questions agree with the 4-bit
adapter model's. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What colour is the sky?",
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "How many days are in a week?",
]


def greedy(model, tok, n: int = 24) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            ids = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        out.append(ids[0, enc["input_ids"].shape[1] :].tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """Tokens before the first disagreement, summed over questions, of the total generated."""
    same = sum(next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b))
    return f"{same}/{sum(len(p) for p in a)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", help="a finetune QLoRA output dir (default: train one)")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from finetune import config, loading, merge
    from finetune.stages import sft

    work = Path(tempfile.mkdtemp(prefix="bench_merge_qlora_"))
    adapter = args.adapter
    if adapter is None:
        recipe = config.load(
            REPO / "recipes" / "tiny" / "sft_qlora.yaml",
            [
                f"train.max_steps={args.steps}",
                f"output.dir={work / 'qlora'}",
                "data.eval_ratio=0",
                "train.report_to=[]",
            ],
        )
        adapter = str(sft.run(recipe))
    source = loading.inspect(adapter)
    tok = loading.load_tokenizer(source)
    q_model = loading.attach_adapter(loading.load_base(source), source)
    reference = greedy(q_model, tok)
    scale = merge.max_abs(merge.probe_logits(q_model, merge.probe_batch(tok)))
    del q_model

    rows = []
    for onto in ("dequantized", "original"):
        report = merge.merge(adapter, str(work / onto), onto=onto)
        merged = AutoModelForCausalLM.from_pretrained(str(work / onto)).eval()
        rows.append(
            {
                "onto": onto,
                "merge_check": report.max_delta,
                "deviation_from_4bit": report.deviations[onto],
                "greedy_agreement": agreement(reference, greedy(merged, tok)),
                "notes": report.notes,
            }
        )
    print(f"adapter {adapter}; max |logit| of the 4-bit adapter model on the probes: {scale:.3g}")
    print("| --onto | merge check max |Δlogit| | deviation from 4-bit adapter model | greedy tokens agreeing |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['onto']} | {r['merge_check']:.3g} | {r['deviation_from_4bit']:.3g} | {r['greedy_agreement']} |")
    for r in rows:
        for note in r["notes"]:
            print(f"{r['onto']}: {note}")
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
