"""Generation eval speed: finetune's batched greedy generation (length-sorted, left-padded
batches) vs a one-prompt-at-a-time loop, same model, same prompts, same max_new_tokens.

    python bench/eval_generation.py                           # tiny-llama, 96 demo prompts, 64 new tokens
    python bench/eval_generation.py --model DIR --n 200 --max-new-tokens 128 --batch-sizes 8,16,32

Prompts: the first user turns of the shipped demo sets (alpaca_en_demo, alpaca_zh_demo,
messages_demo; mixed lengths and languages), rendered with the model's chat template.
Figures: wall seconds of each arm (after one warm-up batch), prompts/s, new tokens/s (tokens
actually generated, up to EOS), speed-up over the loop, and how many answers are identical to
the loop's (greedy decoding: padding may flip a near-tie in rare cases).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time


def prompts(n: int) -> list:
    from finetune.eval.generation import load_items

    out = []
    for name in ("alpaca_en_demo", "alpaca_zh_demo", "messages_demo"):
        out += [it.prompt for it in load_items(name)[0]]
    # interleave the sets so every n sees all three
    third = len(out) // 3
    mixed = [p for triple in zip(out[:third], out[third : 2 * third], out[2 * third :]) for p in triple]
    return mixed[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="8,16,32")
    args = ap.parse_args()

    import torch

    from finetune import loading
    from finetune.eval import generation

    loaded = loading.load_for_eval(args.model)
    model, tok = loaded.model, loaded.tokenizer
    items = prompts(args.n)
    generation.generate(model, tok, items[:4], 8, 4)  # warm-up

    def timed(fn):
        t = time.perf_counter()
        answers = fn()
        return time.perf_counter() - t, answers

    def new_tokens(answers):
        return sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)

    loop_s, loop = timed(lambda: generation.generate_one_by_one(model, tok, items, args.max_new_tokens))
    print(
        f"model {args.model}, {len(items)} prompts, max_new_tokens {args.max_new_tokens}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, threads {torch.get_num_threads()}"
    )
    print("| arm | seconds | prompts/s | new tokens/s | speed-up | same answers as loop |")
    print("|---|---|---|---|---|---|")
    print(
        f"| loop (batch 1) | {loop_s:.2f} | {len(items) / loop_s:.1f} | {new_tokens(loop) / loop_s:.0f} | 1.0x | - |"
    )
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        s, answers = timed(functools.partial(generation.generate, model, tok, items, args.max_new_tokens, bs))
        same = sum(a == b for a, b in zip(answers, loop))
        print(
            f"| batched {bs} | {s:.2f} | {len(items) / s:.1f} | {new_tokens(answers) / s:.0f} "
            f"| {loop_s / s:.1f}x | {same}/{len(items)} |"
        )


if __name__ == "__main__":
    main()
