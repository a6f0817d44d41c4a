"""Every adapter method on the same tiny task: a markdown table of what each trains and buys.

    python bench/methods.py                                  # all methods, 80 steps, table to stdout
    python bench/methods.py --methods lora,prompt_tuning,full --steps 40 --out /tmp/bench_methods

Task: memorise 8 short Q/A chats (tests/_support.py: QA, facts the tiny corpus does not contain,
and MEMO_CHATS), batch 8 (every chat every step), the same number of steps for every method,
loss on the answers only. Each method runs its shipped recipe `recipes/tiny/sft_<method>.yaml`
(its adapter settings and tiny-model learning rate) with the data, steps and batch overridden,
each in a fresh child process. Columns:

- trainable / %: trainable parameters and their share of the model's (adapter included).
- peak RSS +MB: the child's RSS high-water mark (getrusage ru_maxrss) at the end of training minus
  its RSS when training began: optimizer state, gradients, activations (CPU; allocator caching
  makes small figures noisy). On a GPU: torch.cuda.max_memory_allocated during training instead.
- tok/s: non-pad input tokens seen (TRL's num_tokens) / train_runtime.
- train loss: the last step's loss; held-out loss: mean loss on tests/_support.py HELD_OUT,
  corpus-like sentences none of the methods trained on (lower = the base's language modelling
  disturbed less; the `base` row is the untrained model).
- exact match: greedy answers (chat template, up to 48 new tokens) equal to the memorised answer,
  of 8, from the output dir reloaded in plain peft / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from _support import MEMO_CHATS, QA, heldout_loss, write_jsonl  # noqa: E402  (shared probes)

from finetune.config import ADAPTER_METHODS  # noqa: E402

# every method's shipped recipe, and LoRA+ (recipes/tiny/sft_loraplus.yaml: LoRA with loraplus_lr_ratio)
METHODS = [*ADAPTER_METHODS, "loraplus"]
CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA] + MEMO_CHATS


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(method: str, steps: int, work: pathlib.Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from finetune import adapters, config
    from finetune.stages import sft

    data = write_jsonl(work / "memo.jsonl", [{"messages": c} for c in CHATS])
    recipe = config.load(
        REPO / "recipes" / "tiny" / f"sft_{method}.yaml",
        [
            f"data.train={data}",
            "data.format=messages",
            "data.eval_ratio=0",
            f"train.max_steps={steps}",
            "train.per_device_train_batch_size=8",
            "train.logging_steps=1",
            "train.save_strategy=no",
            "train.report_to=[]",
            "train.lr_scheduler_type=constant",
            "train.warmup_steps=0",
            f"output.dir={work / 'out'}",
        ],
    )
    mem = {}

    class Memory(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            mem["start"] = _rss_mb()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_train_end(self, args, state, control, model=None, **kw):
            if torch.cuda.is_available():
                mem["peak_delta"] = torch.cuda.max_memory_allocated() / 2**20
            else:
                mem["peak_delta"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - mem["start"]
            mem["trainable"], mem["total"] = adapters.count_parameters(model)

    out = sft.run(recipe, callbacks=[Memory()])
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    runtime = next(h["train_runtime"] for h in state["log_history"] if "train_runtime" in h)
    model, tok = _reload(out)
    return {
        "method": method,
        "lr": recipe.train["learning_rate"],
        "trainable": mem["trainable"],
        "total": mem["total"],
        "peak_delta_mb": mem["peak_delta"],
        "tok_s": logs[-1]["num_tokens"] / runtime,
        "first_loss": logs[0]["loss"],
        "train_loss": logs[-1]["loss"],
        "heldout_loss": heldout_loss(model, tok),
        "exact": exact_match(model, tok),
    }


def _reload(out: pathlib.Path):
    """The output dir in plain peft / transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "adapter_config.json").exists():
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    return model.eval(), AutoTokenizer.from_pretrained(out)


def exact_match(model, tok) -> int:
    import torch

    hits = 0
    for chat in CHATS:
        inputs = tok.apply_chat_template(chat[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        answer = tok.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        hits += answer == chat[1]["content"]
    return hits


def base_row() -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import tiny

    path = tiny.build_if_tiny("tiny-llama")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    return {
        "method": "base",
        "heldout_loss": heldout_loss(model, tok),
        "exact": exact_match(model, tok),
        "total": sum(p.numel() for p in model.parameters()),
    }


def table(rows: list[dict], steps: int) -> str:
    lines = [
        f"| method | lr | trainable | % | peak {'GPU MB' if rows[0].get('gpu') else 'RSS +MB'} | tok/s | "
        f"train loss (step 1 -> {steps}) | held-out loss | exact match |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "base":
            lines.append(f"| base (untrained) | | 0 | 0 | | | | {r['heldout_loss']:.3f} | {r['exact']}/{len(CHATS)} |")
            continue
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} | "
            f"{r['peak_delta_mb']:.0f} | {r['tok_s']:,.0f} | {r['first_loss']:.3f} -> {r['train_loss']:.3f} | "
            f"{r['heldout_loss']:.3f} | {r['exact']}/{len(CHATS)} |"
        )
    if any(r["method"] == "adalora" for r in rows):
        lines.append("\nadalora's train loss includes its orthogonality regulariser (PEFT's `orth_reg_weight` 0.5).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", default="/tmp/bench_methods", help="folder for results.json, table.md, child logs")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args._child:
        import torch

        with tempfile.TemporaryDirectory() as work:
            row = base_row() if args._child == "base" else child(args._child, args.steps, pathlib.Path(work))
        row["gpu"] = torch.cuda.is_available()
        (out / f"{args._child}.json").write_text(json.dumps(row))
        return 0
    rows = []
    for method in ["base"] + args.methods.split(","):
        log = out / f"{method}.log"
        with open(log, "w") as f:
            proc = subprocess.run(
                [sys.executable, __file__, "--_child", method, "--steps", str(args.steps), "--out", str(out)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        if proc.returncode != 0:
            print(f"{method}: failed, see {log}", file=sys.stderr)
            continue
        rows.append(json.loads((out / f"{method}.json").read_text()))
        print(f"{method}: done", file=sys.stderr)
    text = table(rows, args.steps)
    load = os.getloadavg()[0]
    meta = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1-min load average at the end "
        f"{load:.1f}; {len(CHATS)} chats, {args.steps} steps, batch 8"
    )
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "table.md").write_text(text + "\n")
    print(meta)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
