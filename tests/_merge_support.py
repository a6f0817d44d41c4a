"""Adapters for merge / export / chat tests, built directly with peft (random non-zero weights, no
training: a merge must reproduce any adapter, and random weights move the logits far more than a
few training steps would)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig

QUANT = {"quant_bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def make_adapter(base_path: str, out: Path, peft_config, seed: int = 0, qlora: bool = False) -> Path:
    """Save `peft_config` on `base_path` with random weights to `out`; a QLoRA one gets finetune's recipe.yaml."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    kwargs = {}
    if qlora:
        kwargs = dict(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
            device_map={"": "cpu"},
        )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **kwargs), peft_config)
    model.save_pretrained(str(out))
    if qlora:
        recipe = {"stage": "sft", "model": {"name_or_path": "tiny-llama"}, "adapter": {"method": "qlora", **QUANT}}
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return out


def lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kw)


def other_base(tiny_path: str, out: Path, hidden_size: int = 64) -> Path:
    """A random 2-layer Llama with the tiny tokenizer: adapters of (4-layer) tiny-llama do not fit it, by
    shape (another width) or by config (the same width, fewer layers)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1536,
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=256,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(str(out))
    return out


def set_base(adapter_dir: Path, base: str) -> None:
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg))


@torch.no_grad()
def logits(model, tok, text: str = "What colour is the sky?") -> torch.Tensor:
    enc = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    model.eval()
    return model(input_ids=enc["input_ids"]).logits.float()
