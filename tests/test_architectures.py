"""Model families beyond Llama: DeepSeek-V3 (MLA + MoE, no router auxiliary loss) trains through TRL's SFT
and DPO trainers, and LoRA `all-linear` on a mixture-of-experts model stays off the experts and the router.
The full family matrix (SFT LoRA, QLoRA, DPO, merge, GGUF for 14 families) is bench/model_matrix.py, whose
output is the README's supported-models table; one family of it runs here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from finetune.adapters import peft_config
from finetune.config import AdapterSection
from finetune.stages.common import align_router_aux_loss

TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def test_deepseek_v3_trains_sft_and_dpo_without_a_router_aux_loss(tmp_path, tiny_tokenizer):
    """TRL 1.12 crashed in compute_loss (`aux_loss` None): DeepSeek-V3 has a MoE config but no aux loss."""
    import model_matrix

    row = model_matrix.run_family("DeepSeek-V3 (MLA+MoE)", tmp_path, tiny_tokenizer)
    for cell in ("SFT LoRA", "QLoRA", "DPO", "merge"):
        assert row[cell].startswith("ok"), (cell, row[cell])
    assert row["GGUF"].startswith("ok (")  # GGUF as llama.cpp's deepseek2 (tests/test_gguf_arch.py)


@pytest.mark.parametrize(
    "model_type,extra,expert_names",
    [
        (
            "qwen3_moe",
            {"head_dim": 8, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2},
            ["gate_proj", "up_proj", "down_proj"],
        ),
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, ["w1", "w2", "w3"]),
    ],
)
def test_lora_all_linear_stays_off_fused_experts_and_the_router(model_type, extra, expert_names):
    from peft import get_peft_model

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY, **extra}))
    lora = get_peft_model(model, peft_config(AdapterSection(method="lora", r=2, target_modules="all-linear"), model))
    wrapped = {
        n.split("layers.0.")[-1] for n, _ in lora.named_modules() if n.endswith(".base_layer") and "layers.0." in n
    }
    assert wrapped == {
        "self_attn.q_proj.base_layer",
        "self_attn.k_proj.base_layer",
        "self_attn.v_proj.base_layer",
        "self_attn.o_proj.base_layer",
    }
    named = get_peft_model(
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY, **extra})),
        peft_config(AdapterSection(method="lora", r=2, dropout=0.0, target_modules=["q_proj", *expert_names])),
    )
    assert any(".mlp.experts" in n and "lora_A" in n for n, _ in named.named_parameters())  # experts when named


def test_a_model_without_router_aux_loss_turns_trl_s_switch_off():
    from trl import SFTConfig

    cfg = AutoConfig.for_model(
        "deepseek_v3",
        **{
            **TINY,
            "num_key_value_heads": 4,
            "head_dim": 8,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "n_group": 1,
            "topk_group": 1,
        },
    )
    args = SFTConfig(output_dir="/nonexistent", use_cpu=True, bf16=False)
    assert args.router_aux_loss_coef > 0 and cfg.output_router_logits is not None  # TRL would ask for an aux loss
    assert align_router_aux_loss(AutoModelForCausalLM.from_config(cfg), args) and args.router_aux_loss_coef == 0.0
    mixtral = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **{**TINY, "num_local_experts": 4}))
    args = SFTConfig(output_dir="/nonexistent", use_cpu=True, bf16=False)
    assert not align_router_aux_loss(mixtral, args) and args.router_aux_loss_coef > 0
    torch.manual_seed(0)
    assert math.isfinite(float(mixtral(input_ids=torch.tensor([[1, 2, 3]]), output_router_logits=True).aux_loss))
