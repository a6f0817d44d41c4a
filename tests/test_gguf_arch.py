"""GGUF export per architecture: a tiny random model of each family is written, read back (names, shapes,
metadata) and run by a numpy forward that computes as llama.cpp's graph does from the file alone; its
logits equal transformers' (fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _gguf_forward import gguf_forward, read
from transformers import AutoConfig, AutoModelForCausalLM

from finetune import gguf_export
from finetune.errors import FinetuneError

SMALL = {
    "vocab_size": 1536,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
# a linear-attention layer (2 key heads shared by 4 value heads: the head order matters) then a full-attention
# layer whose q projection carries a gate; zero-centred norms, a quarter of each head rotated
DELTA_NET_LAYERS = {
    "head_dim": 16,
    "layer_types": ["linear_attention", "full_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
}
# routed experts plus a shared expert behind a sigmoid gate
SHARED_EXPERT = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
}
# Mamba-2 mixers: 4 SSM heads in 2 groups (B and C shared by a group's heads, the gated norm per group), chunks of 8
# tokens (transformers' scan crosses a chunk boundary on the probe), a conv bias
MAMBA2_LAYERS = {
    "mamba_n_heads": 4,
    "mamba_n_groups": 2,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_chunk_size": 8,
}
# multi-head latent attention: q through a rank-32 bottleneck, a rank-32 kv latent, per head 16 nope + 8 rope dims
# of key and 12 of value; 4 routed experts (top 2) and a shared one. RMSNorm eps 1e-6: transformers builds the q_a and
# kv_a norms with 1e-6 whatever rms_norm_eps says, llama.cpp with rms_norm_eps (docs/export.md)
MLA_LAYERS = {
    "rms_norm_eps": 1e-6,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
}
CONFIGS = {
    "qwen3": {"model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": True},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "moe_intermediate_size": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
    },
    # sliding_window 4 < the probe's length: the local/global layer layout is exercised
    "gemma2": {
        "model_type": "gemma2",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
        "num_hidden_layers": 7,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    "phi3": {"model_type": "phi3", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # Gemma 2 27B-style: scores scaled by hidden/heads (16), not head_dim (32); llama.cpp knows the 27B by
    # its 46 layers
    "gemma2_27b": {
        "model_type": "gemma2",
        "head_dim": 32,
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
        "num_hidden_layers": 46,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    # a non-default sliding layout (every 2nd layer global): carried by attention.sliding_window_pattern
    "gemma3_period2": {
        "model_type": "gemma3_text",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    # the 2025-26 families: q/k/o biases and head_dim != hidden/heads; post-norms only and full-width q/k
    # norms; interleaved RoPE; NoPE every 4th layer with q/k biases under the Llama permutation
    "seed_oss": {"model_type": "seed_oss", "head_dim": 32, "attention_bias": True, "attention_out_bias": True},
    "olmo2": {"model_type": "olmo2", "tie_word_embeddings": False},
    "olmo3": {"model_type": "olmo3", "sliding_window": 4, "num_hidden_layers": 4, "tie_word_embeddings": False},
    "olmo3_period2": {
        "model_type": "olmo3",
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "tie_word_embeddings": False,
    },
    "ernie4_5": {"model_type": "ernie4_5", "head_dim": 32},
    # sigmoid routing with a selection bias and a scale, a shared expert, a leading dense layer, half-rotary
    # heads, q/k biases and norms
    "glm4_moe": {
        "model_type": "glm4_moe",
        "head_dim": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "attention_bias": True,
        "use_qk_norm": True,
    },
    # Llama 4 text: a dense and a MoE layer interleaved (top-1 sigmoid router weighting the expert's input,
    # a shared expert), NoPE and chunked attention on llama.cpp's layout, L2 q/k norms, Llama-3.1 rope scaling
    "llama4_text": {
        "model_type": "llama4_text",
        "head_dim": 16,
        "num_hidden_layers": 4,
        "intermediate_size": 24,
        "intermediate_size_mlp": 96,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # LFM2: a gated short-convolution layer, then an attention layer with q/k norms; the MLP width derived
    "lfm2": {
        "model_type": "lfm2",
        "layer_types": ["conv", "full_attention"],
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "smollm3": {
        "model_type": "smollm3",
        "num_hidden_layers": 4,
        "attention_bias": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # Gemma 4 (E2B-style): per-layer embeddings, the last two layers reusing the keys and values of the two
    # before (and their MLP double-wide), global layers with a wider head and proportional RoPE over a quarter
    # of it (scaled by a factor: transformers warns the key is unrecognised, and applies it), final soft-capping
    "gemma4_text": {
        "model_type": "gemma4_text",
        "head_dim": 16,
        "global_head_dim": 32,
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "sliding_window": 4,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 1536,
        "num_kv_shared_layers": 2,
        "use_double_wide_mlp": True,
        "final_logit_softcapping": 0.1,  # near the tiny logits, so that it shows
        "rope_parameters": {
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
                "factor": 2.0,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    # Gemma 4 (26B-A4B-style): a dense MLP beside routed experts in every layer (scaled router, per-expert
    # output scales); global layers with values = keys (attention_k_eq_v) and fewer kv heads; untied output
    "gemma4_moe": {
        "model_type": "gemma4_text",
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 4,
        "hidden_size_per_layer_input": 0,
        "enable_moe_block": True,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 32,
        "tie_word_embeddings": False,
    },
    # ERNIE 4.5 MoE: a dense layer, then a MoE layer (softmax router whose selection bias picks the experts, a
    # shared expert)
    "ernie4_5_moe": {
        "model_type": "ernie4_5_moe",
        "head_dim": 16,
        "moe_num_experts": 4,
        "moe_k": 2,
        "moe_intermediate_size": 32,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
    },
    # ERNIE 4.5 MoE with experts every 2nd layer from layer 0 (interleave_moe_layer_step) and no shared experts
    "ernie4_5_moe_interval2": {
        "model_type": "ernie4_5_moe",
        "head_dim": 16,
        "moe_num_experts": 4,
        "moe_k": 2,
        "moe_intermediate_size": 32,
        "moe_num_shared_experts": 0,
        "moe_layer_start_index": 0,
        "moe_layer_interval": 2,
    },
    # MiniMax-M2: experts in every layer (sigmoid router with a selection bias), q/k norms over the whole
    # projection, half-rotary heads
    "minimax_m2": {
        "model_type": "minimax_m2",
        "head_dim": 16,
        "rotary_dim": 8,
        "intermediate_size": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # LFM2-MoE: a short-convolution layer with a dense MLP, then an attention layer with experts (sigmoid router,
    # selection bias)
    "lfm2_moe": {
        "model_type": "lfm2_moe",
        "layer_types": ["conv", "full_attention"],
        "num_dense_layers": 1,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # gated delta-net hybrids (DELTA_NET_LAYERS); Qwen3-Next with fused in_proj_qkvz / in_proj_ba
    "qwen3_next": {"model_type": "qwen3_next", **DELTA_NET_LAYERS, **SHARED_EXPERT},
    "qwen3_5_text": {"model_type": "qwen3_5_text", **DELTA_NET_LAYERS},
    "qwen3_5_moe_text": {"model_type": "qwen3_5_moe_text", **DELTA_NET_LAYERS, **SHARED_EXPERT},
    # Granite 4 hybrid: a Mamba-2 layer, then an attention layer without RoPE; its embedding, residual, attention and
    # logit multipliers; experts beside a shared MLP
    "granitemoehybrid": {
        "model_type": "granitemoehybrid",
        **MAMBA2_LAYERS,
        "layer_types": ["linear_attention", "full_attention"],
        "intermediate_size": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 48,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.1,
        "logits_scaling": 4.0,
    },
    # Granite 4 dense (H-Micro-style): no experts, the shared MLP is the MLP
    "granitemoehybrid_dense": {
        "model_type": "granitemoehybrid",
        **MAMBA2_LAYERS,
        "layer_types": ["linear_attention", "full_attention"],
        "num_local_experts": 0,
        "shared_intermediate_size": 48,
    },
    # Falcon-H1: a Mamba-2 mixer (inner size not 2 x hidden) beside attention (head_dim not hidden / heads) in both
    # layers; every muP multiplier off 1, MLP biases, the gated norm after the gate
    "falcon_h1": {
        "model_type": "falcon_h1",
        **MAMBA2_LAYERS,
        "head_dim": 8,
        "mamba_d_ssm": 96,
        "mamba_rms_norm": True,
        "mamba_norm_before_gate": False,
        "mlp_bias": True,
        "embedding_multiplier": 2.0,
        "lm_head_multiplier": 0.5,
        "mlp_multipliers": [1.5, 0.7],
        "key_multiplier": 1.3,
        "attention_in_multiplier": 1.2,
        "attention_out_multiplier": 0.8,
        "ssm_multipliers": [0.9, 1.1, 1.2, 0.8, 1.3],
        "ssm_in_multiplier": 1.1,
        "ssm_out_multiplier": 0.9,
    },
    # multi-head latent attention (deepseek2): low-rank q, a kv latent with a shared rope key, v narrower than k;
    # GLM-4.7-Flash: a dense layer, then experts (sigmoid router with a selection bias, renormalised and scaled, a
    # shared expert)
    "glm4_moe_lite": {"model_type": "glm4_moe_lite", **MLA_LAYERS, "routed_scaling_factor": 1.8},
    # DeepSeek-V3: the same, routed within the 2 best of 4 expert groups
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        **MLA_LAYERS,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
    },
    # Kimi Linear: a KDA layer (per-channel decay, separate q/k/v convolutions, gated output norm) with a dense MLP,
    # then an MLA layer without RoPE and a full-rank q, with experts; config names as transformers writes them
    "kimi_linear": {
        "model_type": "kimi_linear",
        **{k: v for k, v in MLA_LAYERS.items() if k not in ("q_lora_rank", "n_routed_experts", "n_shared_experts")},
        "q_lora_rank": None,
        "layer_types": ["linear_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse"],
        "linear_num_heads": 4,
        "linear_head_dim": 16,
        "num_experts": 4,
        "num_shared_experts": 1,
        "routed_scaling_factor": 2.446,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # DeepSeek-V3 with its YaRN rope (the released model's kind): a ramp between interpolated and extrapolated
    # frequencies within the 8 rotated dims, scores scaled by mscale_all_dim's factor
    "deepseek_v3_yarn": {
        "model_type": "deepseek_v3",
        **MLA_LAYERS,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    # Ministral 3: YaRN (a ramp over the first pairs: betas chosen so it spans them at this tiny original context;
    # mscale_all_dim) and Llama 4's query temperature, whose period (the original context, 4) the probe crosses
    "ministral3": {
        "model_type": "ministral3",
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 100.0,
            "factor": 16.0,
            "original_max_position_embeddings": 4,
            "beta_fast": 0.5,
            "beta_slow": 0.05,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.5,
        },
    },
    # Mixtral: experts in every layer of llama's graph (softmax router, top-2 renormalised); weights large enough
    # that SiLU is far from linear, so the order of gate and up shows
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "initializer_range": 0.06},
    # Granite: embedding, residual, attention and logit multipliers; q/k/v/o and MLP biases under the permutation
    "granite": {
        "model_type": "granite",
        "embedding_multiplier": 3.0,
        "residual_multiplier": 2.0,
        "attention_multiplier": 0.5,
        "logits_scaling": 0.5,
        "attention_bias": True,
        "mlp_bias": True,
    },
    # GLM-4: post-attention and post-MLP norms, GPT-J-style RoPE over half of each head, fused gate_up, q/k/v biases
    "glm4": {"model_type": "glm4", "head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # gpt-oss: a sliding layer (window 4 < the probe) then a full one, attention sinks, biased experts and router
    # (top-k logits softmaxed), YaRN whose ramp spans the first pairs at this original context
    "gpt_oss": {
        "model_type": "gpt_oss",
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": True,
            "original_max_position_embeddings": 64,
        },
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
GGUF_ARCH = {
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gemma2_27b": "gemma2",
    "gemma3_period2": "gemma3",
    "seed_oss": "seed_oss",
    "olmo2": "olmo2",
    "olmo3": "olmo2",
    "olmo3_period2": "olmo2",
    "ernie4_5": "ernie4_5",
    "smollm3": "smollm3",
    "glm4_moe": "glm4moe",
    "llama4_text": "llama4",
    "lfm2": "lfm2",
    "gemma4_text": "gemma4",
    "gemma4_moe": "gemma4",
    "ernie4_5_moe": "ernie4_5-moe",
    "ernie4_5_moe_interval2": "ernie4_5-moe",
    "minimax_m2": "minimax-m2",
    "lfm2_moe": "lfm2moe",
    "qwen3_next": "qwen3next",
    "qwen3_5_text": "qwen35",
    "qwen3_5_moe_text": "qwen35moe",
    "granitemoehybrid": "granitehybrid",
    "granitemoehybrid_dense": "granitehybrid",
    "falcon_h1": "falcon-h1",
    "glm4_moe_lite": "deepseek2",
    "deepseek_v3": "deepseek2",
    "kimi_linear": "kimi-linear",
    "deepseek_v3_yarn": "deepseek2",
    "ministral3": "mistral3",
    "mixtral": "llama",
    "granite": "granite",
    "glm4": "glm4",
    "gpt_oss": "gpt-oss",
}


def tiny_model_dir(root: Path, family: str, tokenizer, **overrides) -> Path:
    kwargs = {**SMALL, **CONFIGS[family], **overrides}
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norm weights, so the Gemma +1 shift (or its absence) shows
                p.normal_(0.0, 0.3)
            # scores far from uniform and a short convolution that matters, so a wrong RoPE layout, NoPE layer,
            # attention scale or convolution shows in the logits
            if any(
                proj in name
                for proj in ("q_proj", "k_proj", "qkv_proj", "conv.in_proj", "linear_attn.in_proj", "conv1d")
            ):
                p.mul_(10.0)
            if name.endswith(("q_b_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight")):  # MLA's q and k
                p.mul_(10.0)
            if name.endswith(("router.scale", "per_expert_scale")):  # Gemma 4's router scales, ones at init
                p.uniform_(0.5, 1.5)
            if name.endswith((".A_log", ".dt_bias")):  # per-head decays that differ, so the head order shows
                p.normal_(0.0, 0.5)
            if name.endswith("mamba.D"):  # Mamba-2's per-head skip weights, ones at init
                p.uniform_(0.5, 1.5)
            # a Mamba-2 scan that outweighs the D skip, and a conv bias (zeros at init) that shows
            if name.endswith("mamba.in_proj.weight"):
                p.mul_(10.0)
            if name.endswith("mamba.conv1d.bias"):
                p.normal_(0.0, 0.5)
            # Granite's fused gate/up projections (experts, shared MLP) past SiLU's linear range, so gate and up differ
            if name.endswith(("block_sparse_moe.experts.gate_up_proj", "shared_mlp.input_linear.weight")):
                p.mul_(10.0)
            if name.endswith(("sinks", "down_proj_bias")):  # gpt-oss's, zeros at init
                p.normal_(0.0, 0.5)
            if name.endswith("gate_up_proj_bias"):  # gpt-oss's: some gates and ups beyond its SwiGLU's clamp at 7
                p.normal_(0.0, 6.0)
            # router logits far from zero, so the gating function (softmax or sigmoid) and the renormalisation of
            # the chosen experts' weights show too
            if name.endswith((".gate.weight", "router.weight")) and p.dim() == 2:
                p.mul_(10.0)
        for name, b in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):  # a selection bias that changes the experts
                b.normal_(0.0, 0.3)
            if name.endswith("layer_scalar"):  # Gemma 4's per-layer output scale, one at init
                b.uniform_(0.5, 1.5)
    out = root / family
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def hf_logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return tiny_tokenizer("The sky is blue because of Rayleigh scattering.", add_special_tokens=False)["input_ids"][
        :12
    ]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_architecture_exports_and_computes_what_transformers_computes(tmp_path, tiny_tokenizer, ids, family):
    assert len(ids) > 4
    model_dir = tiny_model_dir(tmp_path, family, tiny_tokenizer)
    out = tmp_path / f"{family}.gguf"
    report = gguf_export.convert(model_dir, out, "f32")
    assert report.max_rel_error == 0.0
    tensors, meta, _ = read(out)
    assert meta["general.architecture"] == GGUF_ARCH[family]
    got, want = gguf_forward(out, ids), hf_logits(model_dir, ids)
    deviation = float(np.abs(got - want).max())
    print(f"{family}: max |dlogit| {deviation:.2e} (mean |logit| {np.abs(want).mean():.3f})")
    assert deviation < 1e-4
    if family == "qwen3_moe":  # experts stacked: (n_expert, ff, hidden) per projection, router kept
        assert tensors["blk.0.ffn_gate_exps.weight"].shape == (4, 32, 64)
        assert tensors["blk.1.ffn_down_exps.weight"].shape == (4, 64, 32)
        assert meta["qwen3moe.expert_count"] == 4 and meta["qwen3moe.expert_used_count"] == 2
    if family.startswith(("gemma2", "gemma3")):  # norms stored as 1 + w; tied output
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
        assert np.allclose(tensors["blk.0.attn_norm.weight"], hf["model.layers.0.input_layernorm.weight"].numpy() + 1)
        assert "output.weight" not in tensors and meta[f"{GGUF_ARCH[family]}.attention.sliding_window"] == 4
    if family == "phi3":
        assert tensors["blk.0.attn_qkv.weight"].shape == (64 + 2 * 32, 64)
    if family == "glm4_moe":  # layer 0 dense; layer 1 routed experts, the router's bias and a shared expert
        assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_inp.weight" not in tensors
        assert tensors["blk.1.exp_probs_b.bias"].shape == (4,) and "blk.1.ffn_gate_shexp.weight" in tensors
        assert meta["glm4moe.rope.dimension_count"] == 8 and meta["glm4moe.expert_weights_scale"] == 2.5
    if family == "ernie4_5_moe":  # layer 0 dense; layer 1 experts, the router's bias (squeezed) and a shared expert
        assert "blk.0.ffn_gate.weight" in tensors and tensors["blk.1.exp_probs_b.bias"].shape == (4,)
        assert tensors["blk.1.ffn_up_exps.weight"].shape == (4, 32, 64) and "blk.1.ffn_up_shexp.weight" in tensors
        assert meta["ernie4_5-moe.leading_dense_block_count"] == 1
        assert meta["ernie4_5-moe.expert_shared_feed_forward_length"] == 32
    if family == "ernie4_5_moe_interval2":
        assert "blk.0.ffn_gate.weight" in tensors and "blk.1.ffn_gate_exps.weight" in tensors
        assert meta["ernie4_5-moe.interleave_moe_layer_step"] == 2 and "blk.1.ffn_up_shexp.weight" not in tensors
    if family == "minimax_m2":  # experts from w1/w2/w3, q/k norms over the projection, half-rotary heads
        assert tensors["blk.0.ffn_down_exps.weight"].shape == (4, 64, 32)
        assert tensors["blk.0.attn_q_norm.weight"].shape == (64,) and meta["minimax-m2.rope.dimension_count"] == 8
    if family == "lfm2_moe":  # a dense convolution layer, then an attention layer with experts
        assert "blk.0.shortconv.conv.weight" in tensors and "blk.0.ffn_gate.weight" in tensors
        assert tensors["blk.1.ffn_gate_exps.weight"].shape == (4, 32, 64) and "blk.1.exp_probs_b.bias" in tensors
        assert meta["lfm2moe.attention.head_count_kv"] == [0, 2]
    # the layout's period is written only where it is not llama.cpp's default for the architecture
    pattern = meta.get(f"{GGUF_ARCH[family]}.attention.sliding_window_pattern")
    assert family.startswith("gemma4") or pattern == (2 if family.endswith("_period2") else None)  # gemma4: flags
    if family == "olmo3":  # llama.cpp's default layout, its window kept
        assert meta["olmo2.attention.sliding_window"] == 4
    if family.startswith("gemma4"):
        _check_gemma4_layout(family, tensors, meta)
    if family in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"):  # the delta-net layer as the converter writes it
        arch = GGUF_ARCH[family]
        assert tensors["blk.0.attn_qkv.weight"].shape == (2 * 32 + 64, 64) and "blk.0.attn_gate.weight" in tensors
        assert tensors["blk.0.ssm_conv1d.weight"].shape == (128, 4) and (tensors["blk.0.ssm_a"] < 0).all()
        assert meta[f"{arch}.full_attention_interval"] == 2 and meta[f"{arch}.rope.dimension_count"] == 4
    if GGUF_ARCH[family] in ("granitehybrid", "falcon-h1"):
        _check_mamba2_layout(family, tensors, meta)
    if GGUF_ARCH[family] == "deepseek2":  # kv_b_proj split per head for the absorbed attention; one kv head
        assert tensors["blk.0.attn_k_b.weight"].shape == (4, 32, 16)  # (head, kv_lora, nope): transposed
        assert tensors["blk.0.attn_v_b.weight"].shape == (4, 12, 32)
        assert "blk.0.attn_kv_b.weight" not in tensors and tensors["blk.0.attn_kv_a_mqa.weight"].shape == (32 + 8, 64)
        assert meta["deepseek2.attention.head_count_kv"] == 1 and meta["deepseek2.attention.key_length"] == 32 + 8
        assert meta["deepseek2.attention.key_length_mla"] == 24 and meta["deepseek2.attention.value_length_mla"] == 12
        assert "blk.0.ffn_gate.weight" in tensors and tensors["blk.1.ffn_gate_exps.weight"].shape[1:] == (32, 64)
        assert meta.get("deepseek2.expert_group_used_count") == (2 if family == "deepseek_v3" else 1)
    if family == "deepseek_v3_yarn":  # the converter's keys; mscale_all_dim stored x 0.1
        assert meta["deepseek2.rope.scaling.type"] == "yarn" and meta["deepseek2.rope.scaling.factor"] == 4.0
        assert abs(meta["deepseek2.rope.scaling.yarn_log_multiplier"] - 0.1) < 1e-7
    if family == "kimi_linear":  # a KDA layer (no kv heads: how llama.cpp tells it), then MLA with a full-rank q
        assert meta["kimi-linear.attention.head_count_kv"] == [0, 1] and meta["kimi-linear.kda.head_dim"] == 16
        assert tensors["blk.0.ssm_conv1d_q.weight"].shape == (1, 64, 1, 4) and (tensors["blk.0.ssm_a"] < 0).all()
        assert "blk.1.attn_q.weight" in tensors and tensors["blk.1.attn_k_b.weight"].shape == (4, 32, 16)
    if family in ("ministral3", "mixtral", "granite", "glm4", "gpt_oss"):
        _check_llama_lineage_layout(family, tensors, meta)


def _check_llama_lineage_layout(family, tensors, meta):
    """Ministral 3, Mixtral, Granite and GLM-4 as their converters write them."""
    if family == "ministral3":  # YaRN with its betas and mscale_all_dim, the query temperature
        assert meta["mistral3.rope.scaling.type"] == "yarn" and meta["mistral3.rope.scaling.yarn_log_multiplier"] == 1
        assert meta["mistral3.rope.scaling.yarn_beta_slow"] == pytest.approx(0.05)
        assert meta["mistral3.attention.temperature_scale"] == 0.5 and meta["mistral3.rope.dimension_count"] == 16
    if family == "mixtral":  # fused experts split and stacked, the router kept
        assert tensors["blk.1.ffn_gate_exps.weight"].shape == (4, 96, 64) and meta["llama.expert_count"] == 4
        assert tensors["blk.0.ffn_gate_inp.weight"].shape == (4, 64) and meta["llama.expert_used_count"] == 2
    if family == "granite":
        assert meta["granite.logit_scale"] == 0.5 and meta["granite.embedding_scale"] == 3
        assert meta["granite.attention.scale"] == 0.5 and "blk.0.attn_q.bias" in tensors
    if family == "glm4":  # gate and up fused in ffn_up, the post-norms
        assert tensors["blk.0.ffn_up.weight"].shape == (192, 64) and "blk.0.ffn_gate.weight" not in tensors
        assert "blk.0.post_attention_norm.weight" in tensors and "blk.0.post_ffw_norm.weight" in tensors
        assert meta["glm4.rope.dimension_count"] == 8
    if family == "gpt_oss":  # experts de-interleaved and transposed, with biases; sinks; the router's bias
        assert tensors["blk.0.ffn_gate_exps.weight"].shape == (4, 96, 64) and tensors[
            "blk.0.ffn_up_exps.bias"
        ].shape == (4, 96)
        assert tensors["blk.1.ffn_down_exps.weight"].shape == (4, 64, 96) and tensors[
            "blk.0.attn_sinks.weight"
        ].shape == (4,)
        assert "blk.0.ffn_gate_inp.bias" in tensors and meta["gpt-oss.attention.sliding_window"] == 4


def _check_gemma4_layout(family, tensors, meta):
    """Gemma 4's file as llama.cpp's converter lays it out: norms stored as they are (no 1 + w), a head dim,
    kv head count and rotary width per layer kind, one sliding flag per layer, rope_freqs leaving the
    unrotated three quarters of each global head in place (1e30), the shared layers without k/v."""
    assert meta["gemma4.attention.sliding_window_pattern"] == [True, False] * (2 if family == "gemma4_text" else 1)
    assert meta["gemma4.attention.key_length"] == 32 and meta["gemma4.attention.key_length_swa"] == 16
    assert "blk.0.layer_output_scale.weight" in tensors
    if family == "gemma4_text":
        assert meta["gemma4.attention.shared_kv_layers"] == 2 and meta["gemma4.embedding_length_per_layer_input"] == 8
        assert "blk.1.attn_k.weight" in tensors and "blk.2.attn_k.weight" not in tensors
        assert meta["gemma4.feed_forward_length"] == [96, 96, 192, 192]
        assert tensors["per_layer_token_embd.weight"].shape == (1536, 4 * 8)
        assert list(tensors["rope_freqs.weight"]) == [2.0] * 4 + [1e30] * 12
    else:  # values = keys on the global layer: no attn_v there; one kv head
        assert meta["gemma4.attention.head_count_kv"] == [2, 1] and "blk.1.attn_v.weight" not in tensors
        assert tensors["blk.0.ffn_gate_up_exps.weight"].shape == (4, 64, 64) and "output.weight" in tensors
        assert tensors["blk.0.ffn_down_exps.scale"].shape == (4,)


def _check_mamba2_layout(family, tensors, meta):
    """The Mamba-2 layer as llama.cpp's converter writes it: A = -exp(A_log) and D as (heads, 1), the conv kernel
    squeezed to (channels, kernel), the gated norm as (groups, inner / groups); the ssm.* keys; Granite's Mamba-2
    layers without kv heads, its dense MLP as wide as the shared one, its multipliers as keys."""
    arch = GGUF_ARCH[family]
    d_inner = 96 if family == "falcon_h1" else 128
    assert tensors["blk.0.ssm_a"].shape == (4, 1) and (tensors["blk.0.ssm_a"] < 0).all()
    assert tensors["blk.0.ssm_d"].shape == (4, 1) and tensors["blk.0.ssm_dt.bias"].shape == (4,)
    assert tensors["blk.0.ssm_conv1d.weight"].shape == (d_inner + 2 * 2 * 16, 4)
    assert tensors["blk.0.ssm_norm.weight"].shape == (2, d_inner // 2)
    assert tensors["blk.0.ssm_in.weight"].shape == (2 * d_inner + 2 * 2 * 16 + 4, 64)
    assert [meta[f"{arch}.ssm.{k}"] for k in ("conv_kernel", "inner_size", "state_size", "time_step_rank")] == [
        4,
        d_inner,
        16,
        4,
    ]
    assert meta[f"{arch}.ssm.group_count"] == 2
    if family == "falcon_h1":  # every layer has both mixers
        assert meta["falcon-h1.attention.head_count_kv"] == 2 and meta["falcon-h1.attention.key_length"] == 8
        assert "blk.1.ssm_in.weight" in tensors and "blk.0.attn_q.weight" in tensors
        return
    assert meta["granitehybrid.attention.head_count_kv"] == [0, 2] and "blk.0.attn_q.weight" not in tensors
    assert meta["granitehybrid.rope.scaling.finetuned"] is False and "blk.1.ssm_in.weight" not in tensors
    if family == "granitemoehybrid":
        assert tensors["blk.0.ffn_gate_exps.weight"].shape == (4, 32, 64) and "blk.1.ffn_gate_inp.weight" in tensors
        assert tensors["blk.0.ffn_down_shexp.weight"].shape == (64, 48)
        assert meta["granitehybrid.attention.scale"] == pytest.approx(0.1)
        assert meta["granitehybrid.embedding_scale"] == 2.0 and meta["granitehybrid.logit_scale"] == 4.0
    else:
        assert tensors["blk.0.ffn_gate.weight"].shape == (48, 64) and meta["granitehybrid.feed_forward_length"] == 48


@pytest.mark.parametrize(
    "family,override,field",
    [
        ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
        ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar"),
        # hidden/heads is what llama.cpp uses for a 46-layer Gemma 2 only
        ("gemma2_27b", {"num_hidden_layers": 2}, "query_pre_attn_scalar"),
        ("ernie4_5", {"use_bias": True}, "use_bias"),
        ("smollm3", {"no_rope_layers": [1, 0, 1, 1]}, "no_rope_layers"),
        ("olmo3", {"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types"),
        ("glm4_moe", {"n_group": 2, "topk_group": 1}, "topk_group"),
        ("llama4_text", {"attention_chunk_size": 8}, "attention_chunk_size"),
        ("lfm2", {"conv_bias": True}, "conv_bias"),
        # one shared layer: a global layer would reuse layer 1 in transformers, layer 2 (sliding) in llama.cpp
        ("gemma4_text", {"num_kv_shared_layers": 1}, "num_kv_shared_layers"),
        ("ernie4_5_moe", {"moe_layer_end_index": 0}, "moe_layer_end_index"),
        ("minimax_m2", {"hidden_act": "gelu"}, "hidden_act"),
        ("lfm2_moe", {"routed_scaling_factor": 2.0}, "routed_scaling_factor"),
        ("qwen3_next", {"norm_topk_prob": False}, "norm_topk_prob"),
        ("qwen3_5_text", {"layer_types": ["full_attention", "linear_attention"]}, "layer_types"),
        ("granitemoehybrid", {"position_embedding_type": "rope"}, "position_embedding_type"),
        ("falcon_h1", {"mamba_norm_before_gate": True}, "mamba_norm_before_gate"),
        # a full-rank q on a 2-layer model: llama.cpp's deepseek2 reads q_lora_rank except on 26/27-layer Lite models
        ("deepseek_v3", {"q_lora_rank": None}, "q_lora_rank"),
        ("ministral3", {"sliding_window": 4}, "sliding_window"),
        # llama.cpp takes YaRN's mscale as 1 where mscale_all_dim is set
        ("ministral3", {"rope_parameters": {**CONFIGS["ministral3"]["rope_parameters"], "mscale": 2.0}}, "mscale"),
        ("granite", {"head_dim": 32}, "head_dim"),
        ("glm4", {"hidden_act": "gelu"}, "hidden_act"),
        # gpt-oss's own config leaves YaRN's correction range unrounded; ggml rounds it
        ("gpt_oss", {"rope_parameters": {**CONFIGS["gpt_oss"]["rope_parameters"], "truncate": False}}, "truncate"),
    ],
)
def test_a_configuration_llama_cpp_would_compute_differently_is_refused(
    tmp_path, tiny_tokenizer, family, override, field
):
    model_dir = tiny_model_dir(tmp_path, family, tiny_tokenizer, **override)
    with pytest.raises(FinetuneError, match=field) as e:
        gguf_export.convert(model_dir, tmp_path / "x.gguf", "f32")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()
    # an adapter on such a base is refused before anything is merged or written
    from _merge_support import make_adapter
    from peft import LoraConfig

    from finetune.export import export_gguf

    adapter = make_adapter(str(model_dir), tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(FinetuneError, match=field):
        export_gguf(str(adapter), str(tmp_path / "out" / "m.gguf"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "family,f32_tensor",
    [
        ("glm4_moe", "blk.1.ffn_gate_inp.weight"),
        ("lfm2", "blk.0.shortconv.conv.weight"),
        ("qwen3_5_text", "blk.0.ssm_conv1d.weight"),
        ("granitemoehybrid", "blk.0.ssm_a"),
        ("kimi_linear", "blk.0.ssm_conv1d_q.weight"),  # 4-D there, and its ssm_a too
    ],
)
def test_routers_and_conv_kernels_stay_f32_as_llama_cpp_stores_them(tmp_path, tiny_tokenizer, family, f32_tensor):
    import gguf

    model_dir = tiny_model_dir(tmp_path, family, tiny_tokenizer)
    gguf_export.convert(model_dir, tmp_path / "m.gguf", "q8_0")
    _, _, qtypes = read(tmp_path / "m.gguf")
    assert qtypes[f32_tensor] == gguf.GGMLQuantizationType.F32
    if family == "kimi_linear":
        assert qtypes["blk.0.ssm_a"] == gguf.GGMLQuantizationType.F32
    assert qtypes["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("k_eq_v", [True, False])
def test_gemma4_head_dims_read_from_an_original_config_as_transformers_reads_them(k_eq_v):
    """An original Gemma 4 config.json names global_head_dim and num_global_key_value_heads (the latter used
    only with attention_k_eq_v); transformers turns them into per_layer_config. The exporter reads the same
    head dim and kv heads per layer from either form."""
    from transformers import AutoConfig

    original = {
        **SMALL,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": k_eq_v,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "num_hidden_layers": 3,
    }
    cfg = AutoConfig.for_model("gemma4_text", **original)
    want = [(cfg.per_layer_config[i].head_dim, cfg.per_layer_config[i].num_key_value_heads) for i in range(3)]
    assert want == [(16, 2), (32, 1 if k_eq_v else 2), (32, 1 if k_eq_v else 2)]  # the last layer made global
    assert gguf_export._gemma4_attention(original) == want
    assert gguf_export._gemma4_attention(cfg.to_dict()) == want


def test_a_causal_lm_taken_from_a_vision_language_checkpoint_exports(tmp_path, tiny_tokenizer, ids):
    """Qwen3.5 ships as Qwen3_5ForConditionalGeneration: the causal LM loaded from it saves its decoder under
    model.language_model., and the file must still compute what transformers computes."""
    from transformers import AutoModelForImageTextToText

    text = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir(tmp_path, "qwen3_5_text", tiny_tokenizer)))
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 64}
    vlm = AutoModelForImageTextToText.from_config(
        AutoConfig.for_model("qwen3_5", text_config=text.config.to_dict(), vision_config=vision)
    )
    vlm.model.language_model.load_state_dict(text.model.state_dict())
    vlm.lm_head.load_state_dict(text.lm_head.state_dict())
    vlm.save_pretrained(str(tmp_path / "vlm"))
    model_dir = tmp_path / "lm"
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "vlm")).save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    gguf_export.convert(model_dir, tmp_path / "m.gguf", "f32")
    assert np.abs(gguf_forward(tmp_path / "m.gguf", ids) - hf_logits(model_dir, ids)).max() < 1e-4


@pytest.mark.parametrize(
    "family,override,field",
    [
        ("glm4_moe_lite", {"rope_interleave": False}, "rope_interleave"),  # halves rotated: llama.cpp rotates pairs
        ("glm4_moe_lite", {"mlp_layer_types": ["sparse", "dense"]}, "mlp_layer_types"),
        ("glm4_moe_lite", {"attention_bias": True}, "attention_bias"),
        ("deepseek_v3", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters"),
        ("deepseek_v3", {"num_hidden_layers": 27}, "q_lora_rank"),  # a low-rank q where llama.cpp expects a Lite
        ("deepseek_v3", {"n_shared_experts": 0}, "n_shared_experts"),
        (
            "deepseek_v3_yarn",
            {"rope_parameters": {**CONFIGS["deepseek_v3_yarn"]["rope_parameters"], "mscale": 0.7}},
            "rope",
        ),
        ("kimi_linear", {"linear_num_heads": 2}, "linear_num_heads"),  # llama.cpp: one head count for KDA and MLA
        ("kimi_linear", {"moe_renormalize": False}, "moe_renormalize"),
        ("kimi_linear", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_an_mla_configuration_llama_cpp_would_compute_differently_is_refused(family, override, field):
    """The config alone decides (no weights are read): transformers' own config passes, and with one field changed
    is refused in one line naming the field."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def config(**changed):
        kwargs = {**SMALL, **CONFIGS[family], **changed}
        model_type = kwargs.pop("model_type")
        cfg = AutoConfig.for_model(model_type, **kwargs).to_dict()
        return {**cfg, "architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]}

    cfg = config()
    assert gguf_export.check_config(cfg, "config.json") == gguf_export.ARCHS[cfg["architectures"][0]]
    with pytest.raises(FinetuneError, match=field) as e:
        gguf_export.check_config(config(**override), "config.json")
    assert "\n" not in str(e.value)
