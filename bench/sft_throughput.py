"""SFT training throughput: `finetune train` vs a plain TRL `SFTTrainer` script, same model and data.

    python bench/sft_throughput.py                     # finetune vs plain TRL, tiny model, 3 repeats
    python bench/sft_throughput.py --variants study    # + each finetune default flipped alone
    python bench/sft_throughput.py --variants fourway --ref trl:fp32+nockpt   # vs TRL tuned for the hardware
    python bench/sft_throughput.py --build-model /tmp/bench_model   # a 512x8 random Llama (tiny tokenizer)
    python bench/sft_throughput.py --model /tmp/bench_model --variants ft,trl,ft:bf16

Both arms train one epoch on the same mixed-length chats (the shipped demo data converted to
`messages`: sharegpt_demo, messages_demo, alpaca_en_demo, alpaca_zh_demo), with the same LoRA
(r, alpha, dropout, targets), batch size, learning rate and max_length (taken from the recipe),
answers-only loss (finetune: its own labels; TRL: `assistant_only_loss=True`).

- `ft`:  `finetune.config.load(recipes/tiny/sft_lora.yaml, overrides)` + `finetune.stages.sft.run`,
         in-process in a child. Overrides: model, data (the bench file, no eval split), 1 epoch,
         a fresh output dir. Everything else is the recipe + finetune's defaults.
- `trl`: `SFTTrainer(model=<path>, args=SFTConfig(...), peft_config=LoraConfig(...))` with TRL's
         defaults (bf16 autocast, activation checkpointing, chunked_nll loss, fused AdamW, ...)
         except `use_cpu` on a CPU and the shared hyper-parameters above.

A variant is `arm[:mod[+mod...]]`, e.g. `ft:bf16+padding_free` (see MODS). Each run is a fresh
child process (so peak RSS does not mix); runs are interleaved (A, B, A, B, ...) and the median is
reported. Figures:

- tok/s:   real (non-pad) input tokens of the epoch / `train_runtime` of `trainer.train()`
           (tokens counted on the trainer's own train dataset, so padding is never counted).
- trained: answer tokens (labels != -100) of the epoch / train_runtime.
- setup:   seconds from the child's start (after imports) to the first training step
           (tokenizer, data preparation, model load, trainer construction).
- peak:    the child's RSS high-water mark (`getrusage(RUSAGE_SELF).ru_maxrss`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "sft_lora.yaml"
DATA_SOURCES = ("sharegpt_demo", "messages_demo", "alpaca_en_demo", "alpaca_zh_demo")
WORK = Path(tempfile.gettempdir()) / "bench_sft"

# Modifiers: arm -> name -> (recipe overrides for `ft` | SFTConfig kwargs for `trl`).
# `threads1` is handled in the child (torch.set_num_threads(1)).
MODS = {
    "ft": {
        "random": ["train.train_sampling_strategy=random"],
        "group": ["train.train_sampling_strategy=group_by_length"],
        "padding_free": ["train.padding_free=true", "train.max_length=null"],
        "bf16": ["train.bf16=true"],
        "fp32": ["train.bf16=false"],
        "ckpt": ["train.activation_checkpointing=true"],
        "pack_bfd": ["train.packing=true", "train.packing_strategy=bfd"],
        "pack_wrapped": ["train.packing=true", "train.packing_strategy=wrapped"],
        "workers1": ["train.dataloader_num_workers=1"],
        "nosave": ["train.save_strategy='no'"],  # quoted: YAML reads a bare no as false
        "threads1": [],
    },
    "trl": {
        "fp32": {"bf16": False},
        "nockpt": {"activation_checkpointing": False},
        "nll": {"loss_type": "nll"},
        "group": {"train_sampling_strategy": "group_by_length"},
        "threads1": {},
    },
}
PRESETS = {
    "default": ["ft", "trl"],
    # the honest table: finetune's default, TRL's defaults, TRL tuned for this hardware (fp32 and no activation
    # checkpointing on a CPU), finetune packed
    "fourway": ["ft", "trl", "trl:fp32+nockpt", "ft:pack_bfd"],
    "study": [
        "ft",
        "trl",
        "ft:random",
        "ft:padding_free",
        "ft:bf16",
        "ft:ckpt",
        "ft:pack_bfd",
        "ft:pack_wrapped",
        "ft:threads1",
        "ft:workers1",
        "ft:nosave",
        "trl:fp32+nockpt",
    ],
}


# ----------------------------------------------------------------------------- data


def build_data(path: Path) -> dict:
    """The demo datasets as one `messages` JSONL file (finetune's own converters), fixed order."""
    from finetune.config import DataSection
    from finetune.data import read_examples

    rows = []
    for name in DATA_SOURCES:
        examples, _, _ = read_examples(name, DataSection(train=name))
        rows += [{"messages": e["messages"]} for e in examples]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return {"file": str(path), "examples": len(rows), "sources": list(DATA_SOURCES)}


def build_model(out: Path, hidden: int = 512, layers: int = 8) -> str:
    """A random-init Llama (hidden x layers) with the tiny model's tokenizer and vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune import tiny

    tok = AutoTokenizer.from_pretrained(tiny.build_if_tiny("tiny-llama"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {out}: Llama hidden {hidden} x {layers} layers, vocab {len(tok)}, {n / 1e6:.1f}M params")
    return str(out)


# ----------------------------------------------------------------------------- child


def _shared(recipe) -> dict:
    a, t = recipe.adapter, recipe.train
    return {
        "r": a.r,
        "alpha": a.alpha,
        "dropout": a.dropout,
        "target_modules": a.target_modules,
        "batch": t["per_device_train_batch_size"],
        "lr": t["learning_rate"],
        "max_length": t["max_length"],
    }


def _callback(record: dict):
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            record["t_begin"] = time.perf_counter()
            record["cpu_begin"] = _cpu_s()
            record["load1"] = os.getloadavg()[0]
            dl = kw.get("train_dataloader")
            ds = getattr(dl, "dataset", None)
            if ds is not None and "input_ids" in ds.column_names:
                ids = ds["input_ids"]
                record["rows"] = len(ids)
                record["tokens"] = sum(len(x) for x in ids)
                if "labels" in ds.column_names:
                    record["trained_tokens"] = sum(sum(1 for y in x if y != -100) for x in ds["labels"])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "train_runtime" in logs:
                record["train_runtime"] = logs["train_runtime"]
                record["train_loss"] = logs.get("train_loss")

        def on_train_end(self, args, state, control, **kw):
            record["t_end"] = time.perf_counter()
            record["cpu_end"] = _cpu_s()
            record["steps"] = state.global_step

    return Probe()


def _cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child(spec: dict) -> dict:
    t0 = time.perf_counter()
    arm, mods, model = spec["arm"], spec["mods"], spec["model"]
    import logging
    import resource

    import torch

    logging.basicConfig(level=logging.WARNING)
    if "threads1" in mods:
        torch.set_num_threads(1)
    from finetune import config

    overrides = [
        f"model.name_or_path={model}",
        f"data.train={spec['data']}",
        "data.format=messages",
        "data.eval_ratio=0",
        "train.num_train_epochs=1",
        f"output.dir={spec['out_dir']}",
        "output.overwrite=true",
    ]
    recipe = config.load(str(RECIPE), overrides)
    record: dict = {"arm": arm, "mods": mods, "threads": torch.get_num_threads()}
    probe = _callback(record)

    if arm == "ft":
        from finetune.stages import sft

        recipe = config.load(str(RECIPE), overrides + [o for m in mods for o in MODS["ft"][m]])
        sft.run(recipe, callbacks=[probe])
        t = recipe.train
        record["settings"] = {
            k: t.get(k)
            for k in (
                "bf16",
                "activation_checkpointing",
                "train_sampling_strategy",
                "padding_free",
                "packing",
                "packing_strategy",
                "loss_type",
                "optim",
                "max_length",
                "dataloader_num_workers",
                "save_steps",
            )
        }
    else:
        import datasets
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        s = _shared(recipe)
        rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
        kwargs = dict(
            output_dir=spec["out_dir"],
            use_cpu=not torch.cuda.is_available(),
            num_train_epochs=1,
            per_device_train_batch_size=s["batch"],
            learning_rate=s["lr"],
            max_length=s["max_length"],
            assistant_only_loss=True,
        )
        for m in mods:
            kwargs.update(MODS["trl"][m])
        args = SFTConfig(**kwargs)
        trainer = SFTTrainer(
            model=_resolve(model),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            peft_config=LoraConfig(
                task_type="CAUSAL_LM",
                r=s["r"],
                lora_alpha=s["alpha"],
                lora_dropout=s["dropout"],
                target_modules=s["target_modules"],
            ),
            callbacks=[probe],
        )
        trainer.train()
        record["settings"] = {
            k: getattr(args, k)
            for k in (
                "bf16",
                "activation_checkpointing",
                "train_sampling_strategy",
                "padding_free",
                "packing",
                "loss_type",
                "max_length",
                "dataloader_num_workers",
                "save_steps",
            )
        }
        record["settings"] = {k: getattr(v, "value", v) for k, v in record["settings"].items()}
        record["settings"]["optim"] = getattr(args.optim, "value", args.optim)

    record["setup_s"] = record["t_begin"] - t0
    record["loop_s"] = record["t_end"] - record["t_begin"]
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rt = record.get("train_runtime") or record["loop_s"]
    record["tok_s"] = record["tokens"] / rt
    record["trained_tok_s"] = record.get("trained_tokens", 0) / rt
    record["cpu_s"] = record["cpu_end"] - record["cpu_begin"]
    record["tok_cpu_s"] = record["tokens"] / record["cpu_s"]
    for k in ("t_begin", "t_end", "cpu_begin", "cpu_end"):
        record.pop(k)
    return record


def _resolve(model: str) -> str:
    """A local dir as is; a tiny name -> an already built dir of it (newest), built only if none exists.

    Resolved once, in the parent, so both arms load the very same weights and no child rebuilds the
    tiny model half-way (its fingerprint changes whenever finetune/tiny.py or its corpus is edited).
    """
    from finetune import tiny

    if not tiny.is_tiny(model):
        return str(Path(model).expanduser().resolve())
    built = [
        d for d in (tiny.cache_root() / "tiny").glob(f"{model}-*") if d.is_dir() and (d / "config.json").is_file()
    ]
    if built:
        return str(max(built, key=lambda d: d.stat().st_mtime))
    return tiny.build_if_tiny(model)


# ----------------------------------------------------------------------------- parent


def parse_variant(v: str) -> tuple[str, list[str]]:
    arm, _, rest = v.partition(":")
    if arm not in MODS:
        raise SystemExit(f"variant {v!r}: arm must be one of {', '.join(MODS)}")
    mods = [m for m in rest.split("+") if m] if rest else []
    for m in mods:
        if m not in MODS[arm]:
            raise SystemExit(f"variant {v!r}: unknown modifier {m!r} for {arm} (one of {', '.join(MODS[arm])})")
    return arm, mods


def run_child(variant: str, model: str, data: str, idx: int, log_dir: Path) -> dict:
    arm, mods = parse_variant(variant)
    safe = variant.replace(":", "_").replace("+", "_")
    spec = {"arm": arm, "mods": mods, "model": model, "data": data, "out_dir": str(WORK / "runs" / f"{safe}-{idx}")}
    log = log_dir / f"{safe}-{idx}.log"
    for leftover in (Path(spec["out_dir"]), Path(spec["out_dir"] + ".incomplete")):
        shutil.rmtree(leftover, ignore_errors=True)  # a fresh run every time (no auto-resume)
    env = dict(
        os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1"
    )
    env.setdefault("FINETUNE_CACHE", "/tmp/ftcache_lead")
    with open(log, "w") as fh:
        p = subprocess.run(
            [sys.executable, __file__, "--_child", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
        )
    line = [x for x in p.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if p.returncode != 0 or not line:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"variant": variant, "error": f"exit {p.returncode}: " + " | ".join(tail), "log": str(log)}
    rec = json.loads(line[-1][len("BENCH_RESULT ") :])
    rec["variant"] = variant
    return rec


def summarize(runs: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for v in variants:
        ok = [r for r in runs if r["variant"] == v and "error" not in r]
        errs = [r["error"] for r in runs if r["variant"] == v and "error" in r]
        if not ok:
            rows.append({"variant": v, "error": errs[0] if errs else "no runs"})
            continue

        def med(k, ok=ok):
            return statistics.median(r[k] for r in ok)

        rows.append(
            {
                "variant": v,
                "n": len(ok),
                "tok_s": med("tok_s"),
                "best_tok_s": max(r["tok_s"] for r in ok),
                "tok_cpu_s": med("tok_cpu_s"),
                "load1": [r["load1"] for r in ok],
                "tok_s_all": [round(r["tok_s"], 1) for r in ok],
                "trained_tok_s": med("trained_tok_s"),
                "train_runtime": med("train_runtime"),
                "setup_s": med("setup_s"),
                "peak_rss_mb": med("peak_rss_mb"),
                "steps": ok[0]["steps"],
                "rows": ok[0]["rows"],
                "tokens": ok[0]["tokens"],
                "trained_tokens": ok[0].get("trained_tokens"),
                "train_loss": med("train_loss"),
                "threads": ok[0]["threads"],
                "settings": ok[0]["settings"],
                "errors": errs,
            }
        )
    return rows


def table(rows: list[dict], ref: str | None) -> str:
    base = next((r for r in rows if r["variant"] == ref and "tok_s" in r), None)
    head = (
        f"{'variant':<26}{'tok/s':>8}{'x':>6}{'best':>8}{'x':>6}{'tok/cpu-s':>10}{'x':>6}{'trained/s':>10}"
        f"{'runtime':>8}{'setup':>7}{'peak MB':>8}{'steps':>6}{'loss':>7}  runs tok/s"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "tok_s" not in r:
            lines.append(f"{r['variant']:<26}  FAILED: {r['error'][:150]}")
            continue
        x = {k: f"{r[k] / base[k]:.2f}" if base else "-" for k in ("tok_s", "best_tok_s", "tok_cpu_s")}
        lines.append(
            f"{r['variant']:<26}{r['tok_s']:>8.0f}{x['tok_s']:>6}{r['best_tok_s']:>8.0f}{x['best_tok_s']:>6}"
            f"{r['tok_cpu_s']:>10.0f}{x['tok_cpu_s']:>6}{r['trained_tok_s']:>10.0f}{r['train_runtime']:>8.1f}"
            f"{r['setup_s']:>7.1f}{r['peak_rss_mb']:>8.0f}{r['steps']:>6}{r['train_loss']:>7.3f}  "
            + ", ".join(f"{x:.0f}" for x in r["tok_s_all"])
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llama", help="tiny-llama (default) or a local model dir")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant (median reported)")
    ap.add_argument(
        "--variants",
        default="default",
        help=f"comma list of arm[:mod+mod] or a preset ({', '.join(PRESETS)}); "
        + "; ".join(f"{a} mods: {', '.join(m)}" for a, m in MODS.items()),
    )
    ap.add_argument("--ref", default="trl", help="variant the ratio column is relative to (default trl)")
    ap.add_argument("--out", default=str(WORK / "results.json"), help="JSON results file")
    ap.add_argument("--build-model", metavar="DIR", help="build the 512x8 random Llama at DIR and exit")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if a._child:
        rec = child(json.loads(a._child))
        print("BENCH_RESULT " + json.dumps(rec, default=str), flush=True)
        return 0
    os.environ.setdefault("FINETUNE_CACHE", "/tmp/ftcache_lead")
    if a.build_model:
        build_model(Path(a.build_model))
        return 0

    variants = []
    for item in a.variants.split(","):
        item = item.strip()
        variants += PRESETS.get(item, [item] if item else [])
    for v in variants:
        parse_variant(v)
    model = _resolve(a.model)
    print(f"model: {model}", file=sys.stderr)
    data = WORK / "chats.jsonl"
    data_info = build_data(data)
    log_dir = WORK / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    runs = []
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(a.out).with_suffix(".runs.jsonl")  # every run as it finishes (kept if interrupted)
    partial.write_text("")
    for i in range(a.repeats):  # interleaved: A, B, C, A, B, C, ...
        for v in variants:
            rec = run_child(v, model, str(data), i, log_dir)
            runs.append(rec)
            with open(partial, "a") as fh:
                fh.write(json.dumps(rec, default=str) + "\n")
            msg = f"{rec['tok_s']:.0f} tok/s" if "tok_s" in rec else rec["error"][:200]
            print(f"[{time.time() - t0:6.0f}s] run {i + 1}/{a.repeats} {v}: {msg}", file=sys.stderr, flush=True)

    rows = summarize(runs, variants)
    ref = a.ref if a.ref in variants else None
    import torch

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_end": os.getloadavg(),
        "model": a.model,
        "model_path": model,
        "data": data_info,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "repeats": a.repeats,
        "wall_s": round(time.time() - t0, 1),
        **_versions(),
    }
    print(
        f"\nSFT throughput, {a.model}, {data_info['examples']} chats x 1 epoch, median of {a.repeats} "
        f"({meta['cpu']}, {meta['cores']} cores, {meta['date']})\n"
    )
    print(table(rows, ref))
    ft = next((r for r in rows if r["variant"] == "ft" and "tok_s" in r), None)
    tr = next((r for r in rows if r["variant"] == "trl" and "tok_s" in r), None)
    if ft and tr:
        ratios = {k: ft[k] / tr[k] for k in ("tok_s", "best_tok_s", "tok_cpu_s")}
        meta["ratio_ft_over_trl"] = ratios
        ratio = ratios["tok_s"]
        print(
            f"\nfinetune / plain TRL: {ratio:.2f}x median real tokens/s "
            f"(goal >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'}); "
            f"best-of {ratios['best_tok_s']:.2f}x; per CPU-second {ratios['tok_cpu_s']:.2f}x; "
            f"peak RSS {ft['peak_rss_mb']:.0f} vs {tr['peak_rss_mb']:.0f} MB"
        )
        loads = [x for r in (ft, tr) for x in r["load1"]]
        if max(loads) > (os.cpu_count() or 1):
            print(
                f"note: 1-min load average reached {max(loads):.1f} on {os.cpu_count()} cores during the runs: "
                "other processes shared the CPU, so wall-clock figures are noisy; "
                "tokens per CPU-second and best-of are steadier"
            )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1, default=str))
    print(f"wrote {a.out}")
    return 0 if all("tok_s" in r for r in rows) else 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _versions() -> dict:
    import importlib.metadata as md

    return {"versions": {p: md.version(p) for p in ("transformers", "trl", "peft", "accelerate", "datasets")}}


if __name__ == "__main__":
    sys.exit(main())
