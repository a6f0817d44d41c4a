"""`finetune fit` against a GPU's measured peak: for a few 7B-8B-shaped random-weight configs (LoRA and QLoRA,
with and without activation checkpointing) the estimate next to `torch.cuda.max_memory_allocated` after one
optimizer step of the real training path (finetune's loading, PEFT adapter, TRL's loss), and the error.

    python bench/fit_gpu.py                       # one GPU, ~5 min on an H100
    python bench/fit_gpu.py --layers 8            # a shallower model (same widths) when memory is short

Without CUDA it says so in one line and exits 2. The figures go in bench/README.md with the card named.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

CASES = [  # (name, adapter section, train section)
    ("lora", {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, {"activation_checkpointing": False}),
    ("lora+ckpt", {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, {"activation_checkpointing": True}),
    (
        "qlora+ckpt",
        {"method": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "compute_dtype": "bfloat16"},
        {"activation_checkpointing": True},
    ),
    (
        "qlora",
        {"method": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "compute_dtype": "bfloat16"},
        {"activation_checkpointing": False},
    ),
]


def llama_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def measure(model_dir: Path, adapter: dict, train: dict, batch: int, length: int) -> tuple[float, float]:
    import torch
    import yaml
    from peft import get_peft_model

    from finetune import adapters, config, fit, loading

    text = yaml.safe_dump(
        {
            "stage": "sft",
            "model": {"name_or_path": str(model_dir), "dtype": "bfloat16", "attn_implementation": "sdpa"},
            "adapter": {**adapter, "target_modules": "all-linear"},
            "data": {"train": "alpaca_en_demo"},
            "train": {"bf16": True, "per_device_train_batch_size": batch, "max_length": length, **train},
            "output": {"dir": "/nonexistent"},
        }
    )
    recipe = config.load(text=text)
    estimate = fit.estimate(recipe, on_gpu=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = loading.load_for_training(recipe.model, recipe.adapter, train["activation_checkpointing"])
    model = model.to("cuda") if recipe.adapter.method != "qlora" else model
    if train["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, adapters.peft_config(recipe.adapter, model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    peak = torch.cuda.max_memory_allocated()
    del model, optimizer, loss
    framework = estimate.part("framework")
    return (estimate.total - framework) / fit.GIB, peak / fit.GIB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--out", default="/tmp/bench_fit_gpu.json")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "bench/fit_gpu.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured",
            file=sys.stderr,
        )
        return 2
    from transformers import AutoModelForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-8b-shaped"
        model = AutoModelForCausalLM.from_config(llama_8b_config(args.layers), torch_dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        del model
        for name, adapter, train in CASES:
            estimate, measured = measure(model_dir, adapter, train, args.batch, args.length)
            rows.append({"case": name, "estimate_gib": round(estimate, 2), "measured_gib": round(measured, 2)})
            error = 100 * (estimate - measured) / measured
            print(
                f"{name:<12} estimate {estimate:6.2f} GiB  measured {measured:6.2f} GiB  error {error:+.1f}%",
                flush=True,
            )
    card = torch.cuda.get_device_name(0)
    Path(args.out).write_text(json.dumps({"card": card, "layers": args.layers, "rows": rows}, indent=1))
    print(f"card: {card}; torch.cuda.max_memory_allocated vs finetune fit without the framework line; {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
