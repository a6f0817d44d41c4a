"""The peer arm of bench/data_prep.py: LLaMA-Factory 0.9.5's own data preprocessing on the same
generated chat file, the same tokenizer and the same worker counts, next to finetune's cold `data.load`.

    python bench/llamafactory_prep.py --rows 20000                    # Qwen2 tokenizer, workers 1 and 2
    python bench/llamafactory_prep.py --rows 20000 --arms lf          # LLaMA-Factory only
    python bench/llamafactory_prep.py --tokenizer DIR --lf-template NAME

LLaMA-Factory lives in its own venv (--lf-python, default /work/lfvenv/bin/python; how to build it:
bench/README.md). The default tokenizer is Qwen2's, built from llama.cpp's ggml-vocab-qwen2.gguf
(tests/_support.real_vocab)
with the Qwen2.5-Instruct chat template (tests/fixtures/templates), LLaMA-Factory template `qwen`.
The chat file is bench/data_prep.py's generator; LLaMA-Factory reads it as `formatting: sharegpt` with
role/content tags through a dataset_info.json. Each measurement is a fresh process (`get_train_args`,
`load_tokenizer`, `get_dataset`: what `llamafactory-cli train` runs before it loads the model) with its
own empty datasets cache; finetune's arm is bench/data_prep.py's cold measurement. One at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_prep  # noqa: E402  (the generator and finetune's measurement, shared with bench/data_prep.py)

REPO = data_prep.REPO
QWEN2_TEMPLATE = REPO / "tests/fixtures/templates/Qwen-Qwen2.5-7B-Instruct.jinja"

LF_MEASURE = """
import json, resource, sys, time
t0 = time.perf_counter()
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
model_args, data_args, training_args, _, _ = get_train_args({args!r})
tokenizer_module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
t1 = time.perf_counter()
setup = resource.getrusage(resource.RUSAGE_SELF)
module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
t2 = time.perf_counter()
train = module["train_dataset"]
lengths = [len(ids) for ids in train["input_ids"]]
trained = sum(sum(1 for label in labels if label != -100) for labels in train["labels"])
print(json.dumps({{"load_s": t2 - t1, "setup_s": t1 - t0, "examples": len(train), "tokens": sum(lengths),
                  "trained_tokens": trained, "max_tokens": max(lengths),
                  "setup_cpu_s": setup.ru_utime + setup.ru_stime,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def build_qwen2_tokenizer(out: Path) -> Path:
    """Qwen2's real byte-level BPE (151,936 tokens) from the vendored vocab GGUF, with its chat template."""
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "tests"))
    from _support import real_vocab  # Qwen2's vocab file, from the llama-cpp-python sdist on PyPI (cached)

    qwen2 = real_vocab("qwen2")
    tok = AutoTokenizer.from_pretrained(str(qwen2.parent), gguf_file=qwen2.name)
    tok.chat_template = QWEN2_TEMPLATE.read_text(encoding="utf-8")
    tok.save_pretrained(str(out))
    return out


def write_dataset_info(dataset_dir: Path, chat_file: Path) -> str:
    """LLaMA-Factory's sharegpt format with role/content tags: the generated `messages` rows as they are."""
    name = "bench_chat"
    info = {
        name: {
            "file_name": str(chat_file),
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    (dataset_dir / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return name


def measure_lf(
    lf_python: str,
    chat_file: Path,
    tokenizer: str,
    template: str,
    workers: int,
    cutoff_len: int,
    work: Path,
    save: bool = False,
) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"lf_{workers}_", dir=work))
    dataset_dir = run_dir / "data"
    dataset_dir.mkdir()
    args = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": tokenizer,
        "finetuning_type": "lora",
        "dataset": write_dataset_info(dataset_dir, chat_file),
        "dataset_dir": str(dataset_dir),
        **({} if template == "auto" else {"template": template}),
        "cutoff_len": cutoff_len,
        "preprocessing_num_workers": workers,
        "overwrite_cache": True,
        **({"tokenized_path": str(run_dir / "tokenized")} if save else {}),
        "output_dir": str(run_dir / "out"),
        "report_to": "none",
    }
    stub = Path(lf_python).absolute().parents[1] / "stub"  # the empty `torchaudio` package LF imports
    env = {
        **os.environ,
        "PYTHONPATH": str(stub),
        "DISABLE_VERSION_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(run_dir / "hf_datasets"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = data_prep.run_measured([lf_python, "-c", LF_MEASURE.format(args=args)], env, work / f"lf_{workers}.log")
    shutil.rmtree(run_dir)
    return out


def isolated(fn, *args) -> dict:
    """Run a measurement from a fresh fork, so its children's peak RSS is that measurement's alone."""
    with ProcessPoolExecutor(1, mp_context=get_context("fork")) as pool:
        return pool.submit(fn, *args).result()


def lf_version(lf_python: str) -> str:
    code = (
        "import importlib.metadata as m; print(*(m.version(p) for p in ('llamafactory', 'transformers', 'datasets')))"
    )
    done = subprocess.run([lf_python, "-c", code], capture_output=True, text=True, check=True)
    return "llamafactory {} (transformers {}, datasets {})".format(*done.stdout.split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="LF preprocessing_num_workers = num_proc")
    p.add_argument("--arms", nargs="+", choices=["finetune", "lf"], default=["finetune", "lf"])
    p.add_argument("--tokenizer", help="tokenizer dir (default: Qwen2's, built from the fixtures into --work)")
    p.add_argument(
        "--lf-template",
        default="qwen",
        help="LLaMA-Factory template matching the tokenizer (`auto`: none, LF parses the tokenizer's chat template)",
    )
    p.add_argument("--max-length", type=int, default=2048, help="finetune max_length = LF cutoff_len")
    p.add_argument("--lf-python", default="/work/lfvenv/bin/python")
    p.add_argument(
        "--lf-save",
        action="store_true",
        help="LF also saves the tokenized data (`tokenized_path`), as finetune writes its prepared-data cache",
    )
    p.add_argument("--work", help="where the data, tokenizer and caches go (default: a temp dir)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lf_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or str(build_qwen2_tokenizer(work / "qwen2-tokenizer"))
    chat_file = work / f"chat_{args.rows}.jsonl"
    if not chat_file.is_file():
        data_prep.generate(chat_file, args.rows)
    print(f"tokenizer {tokenizer}; {chat_file} ({chat_file.stat().st_size / 2**20:.0f} MB); {os.cpu_count()} cpus")
    if "lf" in args.arms:
        print(lf_version(args.lf_python))
    print(
        "| tool | workers | load before | cold s | rows/s | rows per CPU-s | rows per CPU-s after setup "
        "| peak RSS main / any | tokens per row | trained per row |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workers in args.workers:
        for arm in args.arms:
            load = os.getloadavg()[0]
            if arm == "finetune":
                cache_dir = work / f"ft_cache_{workers}"
                shutil.rmtree(cache_dir, ignore_errors=True)
                out = isolated(data_prep.measure, chat_file, tokenizer, workers, args.max_length, cache_dir)
                shutil.rmtree(cache_dir)
            else:
                out = isolated(
                    measure_lf,
                    args.lf_python,
                    chat_file,
                    tokenizer,
                    args.lf_template,
                    workers,
                    args.max_length,
                    work,
                    args.lf_save,
                )
            print(
                f"| {arm} | {workers} | {load:.1f} | {out['load_s']:.1f} | {args.rows / out['load_s']:,.0f} | "
                f"{args.rows / out['cpu_s']:,.0f} | {args.rows / (out['cpu_s'] - out['setup_cpu_s']):,.0f} | "
                f"{out['rss_mb']:,.0f} MB / {out['children_peak_rss_mb']:,.0f} MB | "
                f"{out['tokens'] / out['examples']:.1f} | {out['trained_tokens'] / out['examples']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
