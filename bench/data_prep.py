"""Data preparation at scale: cold encoding rows/s (num_proc 1 and 2), warm start (cache hit),
peak RSS and cache size, on a generated multi-turn en+zh chat file (about 1 KB per row).

    python bench/data_prep.py --rows 100000              # 100k rows, tiny tokenizer
    python bench/data_prep.py --rows 1000000 --num-proc 1 2
    python bench/data_prep.py --rows 100000 --tokenizer /path/to/a/real/tokenizer

The data file is generated into --work (default: a temp dir), never committed. Each measurement
runs in a fresh process (so peak RSS is that run's): `data.load` through the prepared-data cache
in its own FINETUNE_DATA_CACHE. Figures, not pass/fail: see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EN = [
    "How do I keep basil alive on a windowsill?",
    "Explain what a hash table is.",
    "Why is the sky blue?",
    "Write a short note thanking a colleague.",
    "What is the difference between a list and a tuple?",
    "Summarise the plot of a detective story in three sentences.",
    "How many minutes are in a week?",
]
ZH = [
    "如何在窗台上养活罗勒？",
    "请解释什么是哈希表。",
    "为什么天空是蓝色的？",
    "写一封简短的感谢信给同事。",
    "列表和元组有什么区别？",
    "用三句话概括一个侦探故事的情节。",
    "一周有多少分钟？",
]
EN_WORDS = [
    "the",
    "a",
    "model",
    "data",
    "answer",
    "light",
    "water",
    "time",
    "small",
    "large",
    "quickly",
    "because",
    "therefore",
    "which",
    "every",
]
ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下"
    "过子说产种面而方后多定行学法所民得经"
)


def _sentence(rng: random.Random, zh: bool) -> str:
    if zh:
        return "".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(12, 40))) + "。"
    return " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(8, 24))).capitalize() + "."


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Multi-turn chats (2-3 exchanges, en or zh, sometimes a system prompt), ~1 KB per JSON line."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            zh = i % 2 == 1
            messages = (
                [{"role": "system", "content": "你是一个乐于助人的助手。" if zh else "You are a helpful assistant."}]
                if rng.random() < 0.3
                else []
            )
            for _ in range(rng.randint(2, 3)):
                question = rng.choice(ZH if zh else EN) + " " + _sentence(rng, zh)
                answer = " ".join(_sentence(rng, zh) for _ in range(rng.randint(2, 5)))
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


MEASURE = """
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
t0 = time.perf_counter()
from transformers import AutoTokenizer
from finetune import data
from finetune.config import DataSection
from finetune.data import cache
tok = AutoTokenizer.from_pretrained({tokenizer!r})
t1 = time.perf_counter()
setup = resource.getrusage(resource.RUSAGE_SELF)
prepared = data.load(DataSection(train={path!r}, format="messages", num_proc={num_proc}), tok, {max_length})
t2 = time.perf_counter()
stats = prepared.train.stats()
print(json.dumps({{"load_s": t2 - t1, "import_s": t1 - t0, "built": cache.builds, "examples": stats["examples"],
                  "tokens": stats["tokens"], "trained_tokens": stats["trained_tokens"],
                  "setup_cpu_s": setup.ru_utime + setup.ru_stime,
                  "cache_bytes": cache.size_on_disk(prepared.train.cache_dir),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(path: Path, tokenizer: str, num_proc: int, max_length: int, cache_dir: Path) -> dict:
    env = {
        **os.environ,
        "FINETUNE_DATA_CACHE": str(cache_dir),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    script = MEASURE.format(
        repo=str(REPO), tokenizer=tokenizer, path=str(path), num_proc=num_proc, max_length=max_length
    )
    return run_measured([sys.executable, "-c", script], env)


def run_measured(command: list[str], env: dict, log: Path | None = None) -> dict:
    """Run one measurement process: the JSON of its last stdout line, plus its wall time, the CPU
    seconds of it and its children, and the children's peak RSS (`log` keeps its output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if log is not None:
        log.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out.update(
        wall_s=wall,
        cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        children_peak_rss_mb=after.ru_maxrss / 1024,
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000])
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", help="tokenizer dir (default: the tiny model's)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--work", help="where the generated data and caches go (default: a temp dir)")
    args = p.parse_args()
    if args.tokenizer is None:
        sys.path.insert(0, str(REPO))
        from finetune import tiny

        args.tokenizer = tiny.build_if_tiny("tiny-llama")
    work = Path(args.work or tempfile.mkdtemp(prefix="data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"tokenizer {args.tokenizer}; work dir {work}; {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    print(
        "| rows | num_proc | cold s | cold rows/s | rows/s per CPU-s | peak RSS main / any process "
        "| warm load s | warm process s | cache size |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        path = work / f"chat_{rows}.jsonl"
        if not path.is_file():
            generate(path, rows)
        for num_proc in args.num_proc:
            cache_dir = work / f"cache_{rows}_{num_proc}"
            if cache_dir.exists():
                import shutil

                shutil.rmtree(cache_dir)
            cold = measure(path, args.tokenizer, num_proc, args.max_length, cache_dir)
            warm = measure(path, args.tokenizer, num_proc, args.max_length, cache_dir)
            assert cold["built"] == 1 and warm["built"] == 0, (cold, warm)
            print(
                f"| {rows:,} | {num_proc} | {cold['load_s']:.0f} | {rows / cold['load_s']:,.0f} | "
                f"{rows / cold['cpu_s']:,.0f} | {cold['rss_mb']:,.0f} MB / {cold['children_peak_rss_mb']:,.0f} MB | "
                f"{warm['load_s']:.2f} | {warm['wall_s']:.1f} | {cold['cache_bytes'] / 2**20:,.0f} MB |",
                flush=True,
            )
        print(
            f"  file {path.stat().st_size / 2**20:,.0f} MB, {cold['examples']:,} examples, {cold['tokens']:,} tokens"
        )


if __name__ == "__main__":
    main()
