"""The supported-models matrix: a tiny random model of each family goes through SFT LoRA, QLoRA and DPO
(2 steps each, on CPU), a verified merge, and GGUF export where supported (the file's llama.cpp-style
numpy forward against transformers). Prints the README's table.

    python bench/model_matrix.py [FAMILY ...] [--markdown]

Each cell says what happened; a failure shows its first line. Figures: merge = max |dlogit| of the written
merged model vs the adapter model (merge's own check); GGUF = max |dlogit| of the f32 file's forward vs
transformers on the merged model (mean |logit| of these random models is ~0.05-0.2)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SMALL = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "vocab_size": 1536,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
MOE = {"num_experts_per_tok": 2}
HYBRID = ["linear_attention", "full_attention"]  # a linear-attention/SSM layer, then an attention layer
LINEAR_ATTENTION = {
    "layer_types": HYBRID,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
}
SHARED_EXPERT_MOE = {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, **MOE}
FAMILIES = {  # family -> (transformers model_type, config overrides)
    "Llama": ("llama", {}),
    "Mistral": ("mistral", {"sliding_window": None}),
    "Qwen2": ("qwen2", {}),
    "Qwen3": ("qwen3", {"head_dim": 16}),
    "Qwen3-MoE": (
        "qwen3_moe",
        {"head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4, "norm_topk_prob": True, **MOE},
    ),
    "Mixtral": ("mixtral", {"num_local_experts": 4, **MOE}),
    "Gemma 2": ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}),
    "Gemma 3 (text)": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}),
    "Phi-3": ("phi3", {}),
    "GLM-4": ("glm4", {"head_dim": 16}),
    "OLMo 2": ("olmo2", {}),
    "Granite": ("granite", {}),
    "DeepSeek-V3 (MLA+MoE)": (
        "deepseek_v3",
        {
            "num_key_value_heads": 4,
            "head_dim": 8,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "n_routed_experts": 4,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            **MOE,
        },
    ),
    "gpt-oss": (
        "gpt_oss",
        {
            "head_dim": 16,
            "num_local_experts": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 8,
            **MOE,
        },
    ),
    # the families released in 2025-2026
    "Qwen3.5": ("qwen3_5_text", {"head_dim": 16, **LINEAR_ATTENTION}),
    "Qwen3.5-MoE": ("qwen3_5_moe_text", {"head_dim": 16, **LINEAR_ATTENTION, **SHARED_EXPERT_MOE}),
    "Qwen3-Next": ("qwen3_next", {"head_dim": 16, **LINEAR_ATTENTION, **SHARED_EXPERT_MOE}),
    "Granite 4 (hybrid)": (
        "granitemoehybrid",
        {
            "layer_types": HYBRID,
            "mamba_n_heads": 4,
            "mamba_d_head": 32,
            "mamba_d_state": 8,
            "mamba_expand": 2,  # the released models' (llama.cpp's granitehybrid asserts it)
            "num_local_experts": 0,
            "shared_intermediate_size": 96,
        },
    ),
    "Kimi Linear": (
        "kimi_linear",
        {
            "num_key_value_heads": 4,
            "layer_types": HYBRID,
            "mlp_layer_types": ["dense", "sparse"],
            "linear_head_dim": 16,
            "linear_num_heads": 4,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "num_experts": 4,
            "num_experts_per_token": 2,
            "moe_intermediate_size": 32,
        },
    ),
    "Falcon-H1": (
        "falcon_h1",
        {"head_dim": 16, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_ssm": 64, "mamba_d_state": 8},
    ),
    "Gemma 4 (text)": (
        "gemma4_text",
        {
            "head_dim": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 8,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": 1536,
            "per_layer_config": {},
        },
    ),
    "GLM-4.5 (MoE)": (
        "glm4_moe",
        {"head_dim": 16, "n_routed_experts": 4, "moe_intermediate_size": 32, "first_k_dense_replace": 1, **MOE},
    ),
    "GLM-4.7-Flash (MLA+MoE)": (
        "glm4_moe_lite",
        {
            "num_key_value_heads": 4,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 4,
            "moe_intermediate_size": 32,
            "mlp_layer_types": ["dense", "sparse"],
            **MOE,
        },
    ),
    "MiniMax-M2": ("minimax_m2", {"head_dim": 16, "num_local_experts": 4, **MOE}),
    "Llama 4 (text)": (  # Scout's layout: experts in every layer, RoPE but on every 4th, chunks of 8192 tokens
        "llama4_text",
        {
            "head_dim": 16,
            "intermediate_size_mlp": 96,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1,
            "no_rope_layers": [1, 1],
            "attention_chunk_size": 8192,
        },
    ),
    "ERNIE 4.5 (MoE)": (
        "ernie4_5_moe",
        {
            "moe_intermediate_size": 32,
            "moe_k": 2,
            "moe_num_experts": 4,
            "moe_num_shared_experts": 1,
            "moe_layer_start_index": 1,
            "moe_layer_end_index": 1,
        },
    ),
    "Seed-OSS": ("seed_oss", {"head_dim": 16}),
    "OLMo 3": ("olmo3", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}),
    "Ministral 3": ("ministral3", {"head_dim": 16}),
    "LFM2": ("lfm2", {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]}),
    "LFM2-MoE": (
        "lfm2_moe",
        {
            "layer_types": ["conv", "full_attention"],
            "num_dense_layers": 1,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            **MOE,
        },
    ),
}
QUANT = {"quant_bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
PAIRS = [
    {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    for q, good, bad in [
        ("What colour is the sky?", "The sky is blue.", "Green."),
        ("How many legs does a cat have?", "A cat has four legs.", "Nine."),
        ("What is the capital of France?", "Paris.", "Rome."),
        ("中国的首都是哪里？", "北京。", "上海。"),
    ]
]


def build(family: str, root: Path, tokenizer) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = FAMILIES[family]
    cfg = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(0)
    out = root / model_type
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def recipe(model_dir: Path, work: Path, stage: str, method: str) -> str:
    from _support import SHORT_RUN, memo_data, write_jsonl

    adapter = {
        "method": method,
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": "all-linear",
        **(QUANT if method == "qlora" else {}),
    }
    train = {
        "learning_rate": 1e-3,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        **SHORT_RUN,
    }
    data = {"train": str(memo_data(work)), "format": "messages"}
    if stage == "dpo":
        data = {"train": str(write_jsonl(work / "pairs.jsonl", PAIRS))}
        train.update(beta=0.1, loss_type=["sigmoid"], max_length=128)
    return yaml.safe_dump(
        {
            "stage": stage,
            "model": {"name_or_path": str(model_dir), "dtype": "float32"},
            "adapter": adapter,
            "data": data,
            "train": train,
            "output": {"dir": str(work / f"{stage}-{method}")},
        }
    )


def _losses(out: Path) -> list[float]:
    from _support import logged_losses

    return logged_losses(out)


def run_family(family: str, root: Path, tokenizer) -> dict[str, str]:
    """One row of the matrix: each cell 'ok ...' or 'fails: ...'."""
    import math

    import numpy as np
    from transformers import AutoModelForCausalLM

    from finetune import config, gguf_export, merge
    from finetune.stages import dpo, sft

    row: dict[str, str] = {"architecture": FAMILIES[family][0]}
    try:
        model_dir = build(family, root / "models", tokenizer)
    except Exception as e:  # noqa: BLE001 -- a bench reports every failure as a cell
        return {**row, "SFT LoRA": f"fails to build: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}

    def cell(name, fn):
        try:
            row[name] = fn()
        except Exception as e:  # noqa: BLE001 -- a bench reports every failure as a cell
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            row[name] = f"fails: {type(e).__name__}: {first[:120]}"
            if os.environ.get("MATRIX_DEBUG"):
                traceback.print_exc()

    outputs = {}

    def train(stage, method):
        work = root / "runs" / f"{row['architecture']}-{stage}-{method}"
        work.mkdir(parents=True, exist_ok=True)
        module = {"sft": sft, "dpo": dpo}[stage]
        out = module.run(config.load(text=recipe(model_dir, work, stage, method)))
        losses = _losses(out)
        assert losses and all(math.isfinite(x) for x in losses), f"losses {losses}"
        outputs[(stage, method)] = out
        return f"ok (loss {losses[0]:.2f}→{losses[-1]:.2f})"

    cell("SFT LoRA", lambda: train("sft", "lora"))
    cell("QLoRA", lambda: train("sft", "qlora"))
    cell("DPO", lambda: train("dpo", "lora"))

    def merged():
        report = merge.merge(str(outputs[("sft", "lora")]), str(root / "merged" / row["architecture"]), "float32")
        return f"ok ({report.max_delta:.1e})"

    cell("merge", merged)

    def generated():
        import torch

        prompt_length, cached, uncached, merged = greedy_three_ways(
            outputs[("sft", "lora")], root / "merged" / row["architecture"]
        )
        assert torch.equal(cached, uncached), "greedy tokens with the cache differ from those without it"
        assert torch.equal(cached, merged), "the merged model's greedy tokens differ from the adapter model's"
        return f"ok ({cached.shape[1] - prompt_length} tokens)"

    def served():
        expected, answer = served_and_chat_answers(outputs[("sft", "lora")])
        assert answer == expected, f"served {answer!r}, chat {expected!r}"
        return "ok"

    cell("generate", generated)
    cell("serve = chat", served)

    def gguf():
        from _gguf_forward import gguf_forward

        merged_dir = root / "merged" / row["architecture"]
        arch = (AutoModelForCausalLM.from_pretrained(str(merged_dir)).config.architectures or ["?"])[0]
        if arch not in gguf_export.ARCHS:
            return "refused (one line)"
        out = root / "gguf" / f"{row['architecture']}.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            gguf_export.convert(merged_dir, out, "f32")
        except gguf_export.ExportError as e:  # a config llama.cpp would compute differently: the field it names
            return f"refused ({str(e).split(': ')[1]}, one line)"
        ids = tokenizer("The sky is blue because of Rayleigh scattering.", add_special_tokens=False)["input_ids"][:12]
        import torch

        model = AutoModelForCausalLM.from_pretrained(
            str(merged_dir), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        return f"ok ({float(np.abs(gguf_forward(out, ids) - want).max()):.1e})"

    cell("GGUF", gguf)
    return row


COLUMNS = ["architecture", "SFT LoRA", "QLoRA", "DPO", "merge", "generate", "serve = chat", "GGUF"]
QUESTION = "What colour is the sky?"


def greedy_three_ways(adapter_dir: Path, merged_dir: Path, max_new_tokens: int = 10):
    """Greedy tokens of the adapter model with its cache, without it, and of the merged model (with its cache):
    the three are equal when generation handles the model's cache (linear attention / SSM layers included)."""
    import torch

    from finetune import loading
    from finetune.generate import generate

    model, tok, _ = loading.load_for_inference(str(adapter_dir))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    merged = loading.load_inference_model(str(merged_dir), "MERGED")
    with torch.no_grad():
        return (
            prompt["input_ids"].shape[1],
            generate(model, **prompt, **greedy),
            generate(model, **prompt, **greedy, use_cache=False),
            generate(merged, **prompt, **greedy),
        )


def served_and_chat_answers(adapter_dir: Path, max_tokens: int = 12) -> tuple[str, str]:
    """(`finetune chat`'s answer, the OpenAI-compatible server's answer at temperature 0) to QUESTION."""
    from fastapi.testclient import TestClient

    from finetune import chat, loading, serve

    model, tok, _ = loading.load_for_inference(str(adapter_dir))
    expected = chat.Chat(model, tok, system=None, max_new_tokens=max_tokens).answer(QUESTION)
    with TestClient(serve.create_app(serve.load_served(str(adapter_dir), name="m"))) as client:
        reply = client.post(
            "/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
    return expected, reply.json()["choices"][0]["message"]["content"]


def markdown(rows: dict[str, dict[str, str]]) -> str:
    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for family, row in rows.items():
        lines.append(f"| {family} | " + " | ".join(row.get(c, "") for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.disable(logging.WARNING)
    from transformers import AutoTokenizer

    from finetune import tiny

    families = [a for a in argv if not a.startswith("--")] or list(FAMILIES)
    tokenizer = AutoTokenizer.from_pretrained(tiny.build_if_tiny("tiny-llama"))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            start = time.process_time()
            with contextlib.redirect_stdout(sys.stderr):  # trainers print their logs: stdout is the table only
                rows[family] = run_family(family, Path(tmp), tokenizer)
            print(f"{family}: {rows[family]} ({time.process_time() - start:.0f} CPU-s)", file=sys.stderr, flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
