"""The worker of bench/gpu.sh (run that): LoRA / QLoRA SFT through finetune on an 8B-shaped random Llama.

`--count-gpus` refuses in one line without CUDA (exit 2); `--prepare` writes the model (random bf16 weights,
Llama-3-8B shapes), a byte-level BPE tokenizer and a text dataset into --dir once; a run (directly, or under
`accelerate launch` with --mode naming the config) trains `finetune train`'s SFT stage for BENCH_STEPS steps
and writes tokens/s, MFU and peak memory to --dir/result-MODE-METHOD.json; `--table` prints them all.
MFU counts 6 x (base parameters) FLOPs per token against the card's dense bf16 peak (LoRA skips the frozen
weights' gradients, so this convention overstates the work a little; it is the one people quote)."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
STEPS = int(os.environ.get("BENCH_STEPS", 12))
SEQ = int(os.environ.get("BENCH_SEQ", 2048))
BATCH = 4


def count_gpus() -> int:
    if not torch.cuda.is_available():
        print(
            "bench/gpu.sh: no CUDA GPU is visible (torch.cuda.is_available() is False): nothing to run",
            file=sys.stderr,
        )
        sys.exit(2)
    print(torch.cuda.device_count())
    return 0


def prepare(folder: Path) -> None:
    """The random model, tokenizer and data, once (about 16 GB of weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir = folder / "model"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B, dtype="bfloat16")).to(torch.bfloat16)
        model.save_pretrained(model_dir)
        del model
        torch.cuda.empty_cache()
        words = [w for f in Path("data").glob("*.json*") for w in f.read_text(encoding="utf-8").split()]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator([" ".join(words)], trainers.BpeTrainer(vocab_size=8000, special_tokens=["<eos>"]))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
        fast.save_pretrained(model_dir)
    data = folder / "text.jsonl"
    if not data.is_file():
        rng = random.Random(0)
        words = [w for f in Path("data").glob("*.json*") for w in f.read_text(encoding="utf-8").split()]
        rows = STEPS * BATCH * max(torch.cuda.device_count(), 1) * 2
        data.write_text(
            "".join(json.dumps({"text": " ".join(rng.choices(words, k=SEQ * 2))}) + "\n" for _ in range(rows))
        )


def run(folder: Path, method: str, mode: str) -> None:
    import yaml
    from accelerate import PartialState
    from transformers import TrainerCallback

    from finetune import config
    from finetune.stages import sft

    try:
        import flash_attn  # noqa: F401

        attention = "flash_attention_2"
    except ImportError:
        attention = "sdpa"
    state = PartialState()
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": str(folder / "model"), "dtype": "bfloat16", "attn_implementation": attention},
        "adapter": {"method": method, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(folder / "text.jsonl"), "format": "text", "cache": "off"},
        "train": {
            "max_steps": STEPS,
            "per_device_train_batch_size": BATCH,
            "max_length": SEQ,
            "bf16": True,
            "activation_checkpointing": True,
            "logging_steps": 1,
            "save_steps": 100000,
            "report_to": [],
            "learning_rate": 1e-4,
        },
        "output": {"dir": str(folder / f"out-{mode}-{method}"), "overwrite": True},
    }

    class Meter(TrainerCallback):
        """Times the steps after the first two (compilation, allocator warm-up)."""

        marks: list[float] = []

        def on_step_end(self, args, st, control, **kwargs):
            torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    torch.cuda.reset_peak_memory_stats()
    meter = Meter()
    sft.run(config.load(text=yaml.safe_dump(recipe)), callbacks=[meter])
    timed = meter.marks[-1] - meter.marks[1]
    tokens_per_s = (len(meter.marks) - 2) * BATCH * SEQ * state.num_processes / timed
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    params = 8_030_261_248  # Llama-3-8B shapes
    mfu = 6 * params * tokens_per_s / (peak * state.num_processes) if peak else None
    memory = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device="cuda")
    if state.num_processes > 1:
        torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)
    if state.is_main_process:
        result = {
            "mode": mode,
            "method": method,
            "gpu": f"{state.num_processes} x {name}",
            "attention": attention,
            "tokens_per_s": round(tokens_per_s),
            "mfu": round(mfu, 3) if mfu else None,
            "peak_memory_gib": round(memory.item(), 1),
            "steps": STEPS,
            "tokens_per_step": BATCH * SEQ * state.num_processes,
        }
        (folder / f"result-{mode}-{method}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))


def table(folder: Path) -> None:
    print("| mode | method | GPUs | attention | tokens/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---|---:|---:|---:|")
    for f in sorted(folder.glob("result-*.json")):
        r = json.loads(f.read_text())
        print(
            f"| {r['mode']} | {r['method']} | {r['gpu']} | {r['attention']} | {r['tokens_per_s']} "
            f"| {r['mfu']} | {r['peak_memory_gib']} |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("BENCH_DIR", "/tmp/finetune-bench-8b")))
    p.add_argument("--method", choices=("lora", "qlora"), default="lora")
    p.add_argument("--mode", default="1gpu", help="a label: 1gpu, fsdp2, zero3")
    p.add_argument("--count-gpus", action="store_true")
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--table", action="store_true")
    a = p.parse_args()
    if a.count_gpus or not torch.cuda.is_available():
        return count_gpus()
    if a.prepare:
        prepare(a.dir)
    elif a.table:
        table(a.dir)
    else:
        run(a.dir, a.method, a.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
