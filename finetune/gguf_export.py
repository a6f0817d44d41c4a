"""HF model dir -> GGUF (llama.cpp / Ollama), laid out as llama.cpp's convert_hf_to_gguf.py does it.

Llama / Mistral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (text), Phi-3, and of the 2025-26 families
Seed-OSS, OLMo 2 / OLMo 3, ERNIE 4.5 (dense and MoE), SmolLM3, GLM-4.5, Llama 4 (text), LFM2, LFM2-MoE,
MiniMax-M2, Gemma 4 (text: per-layer embeddings, layers sharing earlier layers' keys and values, a wider head
and proportional RoPE on global layers, MoE), the gated delta-net hybrids Qwen3-Next, Qwen3.5 and Qwen3.5-MoE,
the Mamba-2 hybrids Granite 4 (dense and MoE) and Falcon-H1, the multi-head latent attention families
GLM-4.7-Flash and DeepSeek-V3 (as deepseek2, YaRN included) and Kimi Linear (KDA linear attention + MLA), and
Ministral 3 (mistral3: YaRN, Llama 4's query temperature), Mixtral (llama with experts), Granite (its embedding,
residual, attention and logit multipliers), GLM-4 (glm4: post-norms, partial GPT-J-style RoPE, fused gate_up) and
gpt-oss (attention sinks, sliding layers, biased experts de-interleaved, a biased router):
the same metadata keys and tensor names
(gguf.TensorNameMap) as llama.cpp's converter, with its per-architecture quirks: the q/k row permutation of
its Llama-style graphs (their RoPE rotates adjacent pairs; HF's rotates halves), Gemma's RMSNorm weights
stored as 1 + w, MoE experts stacked into one 3-D tensor per projection (with the router's selection bias,
shared experts and leading dense layers where the graph has them), Phi-3's fused qkv and gate_up kept
fused, the sliding-window / soft-capping / per-layer rope keys, and the delta-net layers' transforms (A_log
-> -exp, fused projections regrouped, value heads reordered, ssm.* keys), the Mamba-2 layers' (A and D as
(heads, 1), the gated norm per group; Granite's multipliers as scale keys, Falcon-H1's folded into the weights),
MLA's kv_b_proj split per head into attn_k_b / attn_v_b for the absorbed attention, and KDA's q/k/v convolution
kernels. A configuration llama.cpp would compute
differently (a sliding-window or NoPE layout, bias or attention scale it does not read from the file) is
refused, not written. The vocab is byte-level BPE (`gpt2`, with merges and the llama.cpp pre-tokenizer
that splits text as the tokenizer actually does: probed, not read from tokenizer.json) or SentencePiece-style
BPE with byte fallback (`llama`, scores ranking the merges), with token types, special ids, add_bos_token as
training saw it, and the chat template (gguf.SpecialVocab). Every file is read back with
gguf.GGUFReader and compared with the source tensors before it is handed over.
Vision-language models (Gemma 3, Qwen2-VL, Qwen2.5-VL): finetune/gguf_mmproj.py stages the language model for
this writer (Qwen's as llama.cpp's qwen2vl) and writes the vision tower + projector as the mmproj file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import FinetuneError

ARCHS = {
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
    "Qwen3ForCausalLM": "QWEN3",
    "Qwen3MoeForCausalLM": "QWEN3MOE",
    "Gemma2ForCausalLM": "GEMMA2",
    "Gemma3ForCausalLM": "GEMMA3",
    "Phi3ForCausalLM": "PHI3",
    "SeedOssForCausalLM": "SEED_OSS",
    "Olmo2ForCausalLM": "OLMO2",
    "Olmo3ForCausalLM": "OLMO2",
    "Ernie4_5ForCausalLM": "ERNIE4_5",
    "SmolLM3ForCausalLM": "SMOLLM3",
    "Glm4MoeForCausalLM": "GLM4_MOE",
    "Llama4ForCausalLM": "LLAMA4",
    "Lfm2ForCausalLM": "LFM2",
    "Ernie4_5_MoeForCausalLM": "ERNIE4_5_MOE",
    "MiniMaxM2ForCausalLM": "MINIMAXM2",
    "Lfm2MoeForCausalLM": "LFM2MOE",
    "Gemma4ForCausalLM": "GEMMA4",
    "Qwen3NextForCausalLM": "QWEN3NEXT",
    "Qwen3_5ForCausalLM": "QWEN35",
    "Qwen3_5MoeForCausalLM": "QWEN35MOE",
    "GraniteMoeHybridForCausalLM": "GRANITE_HYBRID",
    "FalconH1ForCausalLM": "FALCON_H1",
    "Qwen2VLForConditionalGeneration": "QWEN2VL",  # its language model (finetune/gguf_mmproj.py stages it)
    "Qwen2_5_VLForConditionalGeneration": "QWEN2VL",  # the same
    "Glm4MoeLiteForCausalLM": "DEEPSEEK2",  # GLM-4.7-Flash: llama.cpp's converter writes it as deepseek2
    "DeepseekV3ForCausalLM": "DEEPSEEK2",
    "KimiLinearForCausalLM": "KIMI_LINEAR",  # KDA linear attention + MLA without RoPE + MoE
    "Ministral3ForCausalLM": "MISTRAL3",
    "MixtralForCausalLM": "LLAMA",  # llama.cpp's llama graph runs the experts its file has
    "GraniteForCausalLM": "GRANITE",
    "Glm4ForCausalLM": "GLM4",
    "GptOssForCausalLM": "GPT_OSS",
}
PERMUTED = ("LLAMA", "SMOLLM3")  # architectures whose q/k rows llama.cpp wants permuted
PERMUTED += ("MISTRAL3", "GRANITE")  # their converters are LlamaModel's subclasses
NORM_PLUS_ONE = ("GEMMA2", "GEMMA3")  # HF's Gemma RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
# llama.cpp's sliding-window layout when the file names none: every n-th layer (n-1, 2n-1, ...) is global
SWA_PATTERN = {"GEMMA2": 2, "GEMMA3": 6, "OLMO2": 4}
# architectures whose llama.cpp loader reads another period from attention.sliding_window_pattern (a scalar)
SWA_PATTERN_KEY = ("GEMMA3", "OLMO2")
# Gemma's attention scale in llama.cpp: 1/sqrt(hidden/heads) for the 27B (known by its layer count), else
# 1/sqrt(head_dim); transformers' is 1/sqrt(query_pre_attn_scalar)
GEMMA_27B_LAYERS = {"GEMMA2": 46, "GEMMA3": 62}
# llama.cpp's NoPE layout, fixed in its graph (no GGUF key): layer il skips RoPE when (il + 1) % n == 0
NOPE_STEP = {"SMOLLM3": 4}
# config flags that add biases llama.cpp's graph for the architecture has no tensor for
NO_BIAS = {
    "SEED_OSS": ("mlp_bias",),
    "ERNIE4_5": ("use_bias",),
    "OLMO2": ("attention_bias",),
    "LFM2": ("conv_bias",),
    "ERNIE4_5_MOE": ("use_bias",),
    "LFM2MOE": ("conv_bias",),
    "GEMMA4": ("attention_bias",),
}
# architectures exported with plain RoPE only (llama.cpp's converter writes per-arch keys for their scaling)
PLAIN_ROPE = ("SEED_OSS", "OLMO2", "ERNIE4_5", "SMOLLM3", "GLM4_MOE", "LFM2", "ERNIE4_5_MOE", "MINIMAXM2", "LFM2MOE")
MOE = ("QWEN3MOE", "GLM4_MOE", "LLAMA4", "ERNIE4_5_MOE", "MINIMAXM2", "LFM2MOE", "QWEN3NEXT", "QWEN35MOE")
# multi-head latent attention (MLA: low-rank q and compressed kv, RoPE on a per-head slice; none in Kimi Linear,
# whose other layers are KDA linear attention) with DeepSeek-V3's router
MLA = ("DEEPSEEK2", "KIMI_LINEAR")
MOE += MLA
# llama.cpp's deepseek2 takes a model of these layer counts (or 48 layers and a 128256-token vocab) for a "Lite"
# one, whose q projection is not low-rank: it reads no q_lora_rank there, and requires it everywhere else
MLA_LITE_LAYERS = (26, 27)
# architectures whose llama.cpp graph runs routed experts only where the config has them (Mixtral on llama)
MOE_WHEN_EXPERTS = ("LLAMA",)
PLAIN_ROPE += ("GRANITE", "GLM4")
# architectures with LFM2's gated short-convolution layers (shortconv.*, per-layer head_count_kv)
SHORTCONV = ("LFM2", "LFM2MOE")
# hybrids of gated delta-net (linear attention) layers and gated full-attention layers, zero-centred RMSNorm
DELTA_NET = ("QWEN3NEXT", "QWEN35", "QWEN35MOE")
# of those, the ones whose converter reorders the value heads from grouped (per key head) to tiled order,
# because their llama.cpp graph repeats the key heads tiled (qwen3next's repeats them interleaved, as HF does)
DELTA_NET_TILED_V = ("QWEN35", "QWEN35MOE")
# llama.cpp's qwen35 / qwen35moe M-RoPE sections when the config names none (text positions fill t, h and w)
MROPE_SECTIONS = [11, 11, 10, 0]
# architectures whose fused experts transformers stores as (n_expert, in, out), not (n_expert, out, in)
EXPERTS_IN_OUT = ("LLAMA4",)
# Llama 4's attention in llama.cpp, fixed in its graph: NoPE every 4th layer, chunks of 8192 tokens on the
# others, temperature tuning of NoPE layers' queries from position 8192 on (floor 8192, scale 0.1)
LLAMA4_FIXED = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1, "attn_temperature_tuning": True}
# llama.cpp's tokenizer.ggml.pre names -> the split regex llama-vocab.cpp runs for them (None: GPT-2's
# byte-level regex); tried in this order, the first that splits as the tokenizer does is written (Qwen2's
# digit-free vocab tokenizes the same under qwen2 and llama-bpe: qwen2 is then the faithful name)
PRE_TOKENIZERS = {
    "gpt-2": None,
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    # Qwen3.5's: qwen2's with combining marks (\p{M}) kept in words
    "qwen35": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
# strings on which those pre-tokenizers split differently
PROBES = [
    "In 2024, 1234567 people paid $3.14159 each.",
    "I'M sure they'LL say we'd DON'T",
    "你好，世界！今天是2024年。",
    "a\n\n  b\t\tc   d\r\n",
    "$hello (world) #tag @user ...!!!",
    " leading   and trailing  ",
    "Äpfel ½ 🦙.cpp",
    "ภาษาไทย สวัสดี مَرْحَبًا नमस्ते",  # combining marks (Thai vowels, Arabic harakat, Devanagari)
]
OUTTYPES = ("f32", "f16", "q8_0")


class ExportError(FinetuneError):
    """The model cannot be exported to the asked format."""


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: per head, rows (x0..x_{d/2-1}, y0..) -> (x0, y0, x1, y1, ...)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The inverse of `permute`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFReport:
    path: Path
    arch: str
    outtype: str
    tensors: int
    max_rel_error: float  # max over tensors of max |read back - source| / max |source|
    vocab: int
    pre: str
    chat_template: bool
    add_bos: bool

    def lines(self) -> list[str]:
        return [
            (
                f"GGUF written to {self.path} ({self.arch}, {self.outtype}, {self.tensors} tensors, "
                f"vocab {self.vocab}, pre-tokenizer {self.pre}{', chat template' if self.chat_template else ''}, "
                f"add_bos_token {str(self.add_bos).lower()}: as training saw it)"
            ),
            (
                f"read back: names, shapes and metadata match; max |Δ| / max |w| = {self.max_rel_error:.3g} "
                f"(tolerance {TOLERANCE[self.outtype]:g} for {self.outtype})"
            ),
        ]


# max |read back - source| / max |source| per tensor: fp16 rounds at 2^-11 relative; q8_0 blocks of 32
# share one scale amax/127 (error <= half a step, plus the scale's own fp16 rounding).
TOLERANCE = {"f32": 0.0, "f16": 1e-3, "q8_0": 1.0 / 127}


def model_config(model_dir: Path) -> tuple[dict, str]:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return cfg, check_config(cfg, str(model_dir / "config.json"))


def check_architecture(arch: str, where: str) -> str:
    """The gguf MODEL_ARCH name for a transformers architecture, or a one-line error."""
    if arch not in ARCHS:
        raise ExportError(
            f"{where}: GGUF export supports {', '.join(ARCHS)}; this model is {arch} "
            "(use llama.cpp's convert_hf_to_gguf.py on the merged safetensors dir)"
        )
    return ARCHS[arch]


def check_config(cfg: dict, where: str) -> str:
    """The gguf MODEL_ARCH name, after refusing (one line) a configuration that llama.cpp's graph for that
    architecture would compute differently from transformers: it reads these from no GGUF key."""
    if isinstance(cfg.get("vision_config"), dict):  # finetune/gguf_mmproj.py checks a VLM, then its language model
        raise ExportError(f"{where}: a vision-language model: its GGUF is written by finetune/gguf_mmproj.py")
    arch = check_architecture((cfg.get("architectures") or ["?"])[0], where)

    def refuse(field: str, why: str):
        raise ExportError(
            f"{where}: {field}: {why}; llama.cpp's {arch.lower()} graph would compute a different "
            "model, so no GGUF is written"
        )

    if arch in SWA_PATTERN:
        swa_period(cfg, arch, refuse)
    if arch in NORM_PLUS_ONE:
        head_dim = _head_dim(cfg)
        want = _gemma_attention_dim(cfg, arch)
        if cfg.get("query_pre_attn_scalar", head_dim) != want:
            refuse(
                "query_pre_attn_scalar",
                f"{cfg['query_pre_attn_scalar']} is not {want} (llama.cpp scales by head_dim, or by "
                f"hidden/heads for a {GEMMA_27B_LAYERS[arch]}-layer 27B)",
            )
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        if act not in (None, "gelu_pytorch_tanh"):
            refuse("hidden_activation", f"{act} (llama.cpp uses tanh-approximated GELU)")
        if arch == "GEMMA2" and not cfg.get("tie_word_embeddings", True):
            refuse("tie_word_embeddings", "false (llama.cpp's Gemma 2 has no separate output matrix)")
        if arch == "GEMMA3" and cfg.get("attn_logit_softcapping"):
            refuse("attn_logit_softcapping", "set (llama.cpp's Gemma 3 has none)")
    for flag in NO_BIAS.get(arch, ()):
        if cfg.get(flag):
            refuse(flag, "true (llama.cpp's graph has no such biases)")
    if arch in NOPE_STEP:
        n = NOPE_STEP[arch]
        want = [int((i + 1) % n != 0) for i in range(cfg["num_hidden_layers"])]
        if cfg.get("no_rope_layers", want) != want:
            refuse("no_rope_layers", f"not llama.cpp's layout (every {n}th layer without RoPE)")
        if cfg.get("use_sliding_window"):
            refuse("use_sliding_window", "true (llama.cpp's graph has no sliding window)")
    if arch == "OLMO2":
        if _head_dim(cfg) * cfg["num_attention_heads"] != cfg["hidden_size"]:
            refuse("head_dim", "heads x head_dim is not hidden_size (llama.cpp's olmo2 assumes it is)")
        if cfg.get("tie_word_embeddings"):
            refuse("tie_word_embeddings", "true (llama.cpp's olmo2 needs a separate output matrix)")
    if arch == "LLAMA4":
        _check_llama4(cfg, refuse)
    if arch in DELTA_NET:
        _check_delta_net(cfg, arch, refuse)
    if arch in SHORTCONV and set(cfg.get("layer_types") or []) - {"conv", "full_attention"}:
        refuse("layer_types", "other than conv and full_attention (llama.cpp's lfm2 has these two)")
    if arch == "GLM4_MOE" and cfg.get("topk_group", 1) < cfg.get("n_group", 1):
        refuse("topk_group", "fewer than n_group (llama.cpp's glm4moe routes over all experts, no group limit)")
    if arch in FAMILY_CHECKS:
        FAMILY_CHECKS[arch](cfg, refuse)
    if arch == "QWEN3MOE":
        if not cfg.get("norm_topk_prob", False):
            refuse("norm_topk_prob", "false (llama.cpp renormalises the top-k router weights)")
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            refuse("mlp_only_layers / decoder_sparse_step", "some layers are dense (llama.cpp expects experts in all)")
    if arch == "GEMMA4":  # its rope is per layer kind (proportional on global layers): checked there
        return _check_gemma4(cfg, refuse) or arch
    rope = _rope_scaling(cfg)
    if rope["rope_type"] not in ("default", "linear", "yarn", "llama3"):
        refuse(
            "rope_scaling",
            f"rope type {rope['rope_type']} is not exported by finetune (use llama.cpp's convert_hf_to_gguf.py)",
        )
    if arch in ("PHI3", *PLAIN_ROPE) and rope["rope_type"] != "default":
        refuse("rope_scaling", f"{rope['rope_type']} on {arch.lower()} is not exported by finetune")
    return arch


def _llama4_all_global(cfg: dict) -> bool:
    return all(t == "full_attention" for t in cfg.get("layer_types") or ["chunked_attention"])


def _check_llama4(cfg: dict, refuse) -> None:
    """Refuse a Llama 4 text config that llama.cpp's llama4 graph would compute differently (LLAMA4_FIXED)."""
    n_layer, n_expert = cfg["num_hidden_layers"], _n_experts(cfg)
    step = cfg.get("interleave_moe_layer_step", 1)
    if cfg.get("moe_layers") is not None and cfg["moe_layers"] != [i for i in range(n_layer) if (i + 1) % step == 0]:
        refuse("moe_layers", f"{cfg['moe_layers']} (llama.cpp: experts in every {step}th layer, the interleave step)")
    if cfg.get("use_qk_norm") != (n_expert != 128):  # llama.cpp knows the 128-expert model has none
        refuse("use_qk_norm", f"{cfg.get('use_qk_norm')} with {n_expert} experts (llama.cpp: only 128 have none)")
    if _llama4_all_global(cfg):
        if not all(cfg.get("no_rope_layers") or [1]):
            refuse("no_rope_layers", "NoPE layers without chunked ones (llama.cpp then ropes every layer)")
        return
    if cfg.get("layer_types") != [
        "chunked_attention" if (i + 1) % 4 else "full_attention" for i in range(n_layer)
    ] or cfg.get("no_rope_layers") != [int((i + 1) % 4 != 0) for i in range(n_layer)]:
        refuse("layer_types / no_rope_layers", "not llama.cpp's layout (every 4th layer global and without RoPE)")
    for field, want in LLAMA4_FIXED.items():
        if cfg.get(field) != want:
            refuse(field, f"{cfg.get(field)} (llama.cpp's llama4 uses {want})")


# Gemma 4's rope types per layer kind that llama.cpp computes: plain RoPE on sliding layers; on global layers
# RoPE over the first partial_rotary_factor of the head's frequencies ("proportional"), the rest left
# unrotated by a rope_freqs factor of 1e30 (its converter's trick: ggml's NEOX rope rotates a prefix only)
GEMMA4_ROPE = {"sliding_attention": ("default",), "full_attention": ("default", "proportional")}
GEMMA4_LAYER_FIELDS = {"head_dim", "num_key_value_heads"}  # the per_layer_config overrides llama.cpp can carry


def _gemma4_layer_types(cfg: dict) -> list[str]:
    """Gemma 4's layer kinds as transformers builds them: every 6th layer global by default, the last always."""
    n_layer = cfg["num_hidden_layers"]
    types = list(
        cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layer)]
    )
    types[-1] = "full_attention"
    return types


def _gemma4_attention(cfg: dict) -> list[tuple[int, int]]:
    """(head_dim, kv heads) per layer as transformers builds Gemma 4's attention: the global layers take
    per_layer_config's overrides (what transformers writes), or in a config without it global_head_dim
    (default 512) and, with attention_k_eq_v, num_global_key_value_heads."""
    types = _gemma4_layer_types(cfg)
    per_layer = cfg.get("per_layer_config")
    if per_layer is None:
        over = {"head_dim": cfg.get("global_head_dim", 512)}
        if cfg.get("attention_k_eq_v") and cfg.get("num_global_key_value_heads") is not None:
            over["num_key_value_heads"] = cfg["num_global_key_value_heads"]
        per_layer = {str(i): over for i, t in enumerate(types) if t == "full_attention"}
    head_dim, n_kv = cfg.get("head_dim") or 256, cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    out = []
    for i in range(len(types)):
        over = per_layer.get(str(i)) or per_layer.get(i) or {}
        out.append((over.get("head_dim", head_dim), over.get("num_key_value_heads", n_kv)))
    return out


def _gemma4_kv_producers(cfg: dict) -> tuple[list[int | None], list[int | None]]:
    """Per layer, the layer whose keys and values it reuses (None: its own): transformers' (the last earlier
    unshared layer of the same kind) and llama.cpp's (the last unshared layer if global, the one before if
    sliding)."""
    types, n_shared = _gemma4_layer_types(cfg), cfg.get("num_kv_shared_layers") or 0
    first = len(types) - n_shared
    hf = [
        None if i < first else max([j for j in range(first) if types[j] == t], default=-1) for i, t in enumerate(types)
    ]
    cpp = [None if i < first else first - (2 if t == "sliding_attention" else 1) for i, t in enumerate(types)]
    return hf, cpp


def _check_gemma4(cfg: dict, refuse) -> None:
    """Refuse a Gemma 4 text config that llama.cpp's gemma4 graph would compute differently."""
    types = _gemma4_layer_types(cfg)
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if act not in (None, "gelu_pytorch_tanh"):
        refuse("hidden_activation", f"{act} (llama.cpp uses tanh-approximated GELU)")
    if cfg.get("use_bidirectional_attention") == "all":
        refuse("use_bidirectional_attention", "all (llama.cpp's gemma4 attends causally)")
    if set(types) - {"sliding_attention", "full_attention"} or "sliding_attention" not in types:
        refuse("layer_types", "not sliding and global layers both (llama.cpp's gemma4 has the two)")
    for i, over in (cfg.get("per_layer_config") or {}).items():
        if set(over) - GEMMA4_LAYER_FIELDS:
            refuse("per_layer_config", f"layer {i} overrides {sorted(set(over) - GEMMA4_LAYER_FIELDS)}")
    dims = _gemma4_attention(cfg)
    for kind in ("sliding_attention", "full_attention"):
        if len({dims[i][0] for i, t in enumerate(types) if t == kind}) > 1:
            refuse("per_layer_config", f"{kind} layers of different head_dim (llama.cpp has one per kind)")
        rope = _rope_params(cfg, kind)
        if rope.get("rope_type", "default") not in GEMMA4_ROPE[kind]:
            refuse("rope_parameters", f"{rope.get('rope_type')} on {kind} layers is not what llama.cpp's gemma4 runs")
    if _rope_params(cfg, "sliding_attention").get("factor", 1.0) != 1.0:
        refuse("rope_parameters", "a factor on sliding_attention layers (llama.cpp's gemma4 scales none)")
    if cfg.get("hidden_size_per_layer_input") and cfg.get("vocab_size_per_layer_input") != cfg["vocab_size"]:
        refuse("vocab_size_per_layer_input", "not vocab_size (llama.cpp looks both up by the same token id)")
    hf, cpp = _gemma4_kv_producers(cfg)
    if hf != cpp:
        refuse(
            "num_kv_shared_layers",
            "the last unshared layers are not sliding then global (llama.cpp's shared layers reuse those two)",
        )


def _gemma4_hparams(writer, cfg: dict) -> None:
    """Gemma 4's keys as llama.cpp's Gemma4Model converter writes them and its loader reads them: a head dim,
    kv head count and rotary width per layer kind, the sliding layout as one flag per layer, the layers
    sharing earlier layers' keys and values, the per-layer embedding width, the MoE block's sizes."""
    types, dims = _gemma4_layer_types(cfg), _gemma4_attention(cfg)
    swa = [t == "sliding_attention" for t in types]
    n_layer, n_shared = len(types), cfg.get("num_kv_shared_layers") or 0
    d_swa, d_full = dims[swa.index(True)][0], dims[swa.index(False)][0]
    writer.add_block_count(n_layer)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    ff = [
        cfg["intermediate_size"] * (2 if cfg.get("use_double_wide_mlp") and i >= n_layer - n_shared else 1)
        for i in range(n_layer)
    ]
    writer.add_feed_forward_length(ff if len(set(ff)) > 1 else ff[0])
    writer.add_head_count(cfg["num_attention_heads"])
    n_kv = [kv for _, kv in dims]
    writer.add_head_count_kv(n_kv if len(set(n_kv)) > 1 else n_kv[0])
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_key_length(d_full)
    writer.add_value_length(d_full)
    writer.add_key_length_swa(d_swa)
    writer.add_value_length_swa(d_swa)
    writer.add_rope_dimension_count(d_full)  # all of it: rope_freqs leaves the unrotated part in place
    writer.add_rope_dimension_count_swa(d_swa)
    writer.add_rope_freq_base(float(_rope_theta(cfg, "full_attention") or 1_000_000.0))
    writer.add_rope_freq_base_swa(float(_rope_theta(cfg, "sliding_attention") or 10_000.0))
    writer.add_sliding_window(cfg["sliding_window"])
    writer.add_sliding_window_pattern(swa)
    writer.add_shared_kv_layers(n_shared)
    writer.add_embedding_length_per_layer_input(cfg.get("hidden_size_per_layer_input") or 0)
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if cfg.get("enable_moe_block"):
        writer.add_expert_count(cfg["num_experts"])
        writer.add_expert_used_count(cfg["top_k_experts"])
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def _gemma4_rope_factors(cfg: dict) -> np.ndarray:
    """The global layers' rope_freqs: each rotated frequency divided by the rope factor, the unrotated ones
    by 1e30 (so they stay in place), as transformers' proportional RoPE computes them."""
    rope = _rope_params(cfg, "full_attention")
    head_dim = _gemma4_attention(cfg)[-1][0]  # the last layer is always global
    share = rope.get("partial_rotary_factor", 1.0) if rope.get("rope_type") == "proportional" else 1.0
    n_rot = int(share * head_dim // 2)
    return np.array([rope.get("factor", 1.0)] * n_rot + [1e30] * (head_dim // 2 - n_rot), dtype=np.float32)


def _gemma4_tensor_name(hf_name: str, name_map) -> str | None:
    """A Gemma 4 tensor's GGUF name as its converter gives it: the router's input scale and per-expert output
    scale as `.scale` tensors beside the router and the down experts; weight-less names get `.weight`."""
    import re

    layer = re.search(r"\.layers\.(\d+)\.", hf_name)
    if hf_name.endswith("router.scale"):
        return f"blk.{layer.group(1)}.ffn_gate_inp.scale"
    if hf_name.endswith("router.per_expert_scale"):
        return f"blk.{layer.group(1)}.ffn_down_exps.scale"
    if hf_name.endswith(("layer_scalar", "experts.gate_up_proj", "experts.down_proj")):
        hf_name += ".weight"
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def full_attention_interval(cfg: dict) -> int | None:
    """n where every n-th layer (n-1, 2n-1, ...) is full attention and the others linear attention: the
    only layout llama.cpp's delta-net hybrids read (qwen*.full_attention_interval); None for another layout."""
    n_layer = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if not types:
        return cfg.get("full_attention_interval", 4)
    for n in range(1, n_layer + 2):
        if types == ["linear_attention" if (i + 1) % n else "full_attention" for i in range(n_layer)]:
            return n
    return None


def _mrope_sections(cfg: dict) -> list[int]:
    """llama.cpp's qwen2vl / qwen35 rope.dimension_sections: the config's mrope_section padded to 4, or qwen35's
    default."""
    sections = _rope_params(cfg).get("mrope_section")
    return [*sections, *[0] * (4 - len(sections))] if sections else MROPE_SECTIONS


def _check_delta_net(cfg: dict, arch: str, refuse) -> None:
    """Refuse a Qwen3-Next / Qwen3.5 config that llama.cpp's delta-net hybrid graph would compute differently."""
    if full_attention_interval(cfg) is None:
        refuse("layer_types", "not llama.cpp's layout (every n-th layer full attention, the others linear)")
    if cfg["linear_key_head_dim"] != cfg["linear_value_head_dim"]:
        refuse("linear_value_head_dim", "differs from linear_key_head_dim (llama.cpp's state is square)")
    if cfg["linear_num_value_heads"] % cfg["linear_num_key_heads"]:
        refuse("linear_num_value_heads", "not a multiple of linear_num_key_heads")
    if cfg.get("attention_bias"):
        refuse("attention_bias", "true (llama.cpp's graph has no such biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"{cfg['hidden_act']} (llama.cpp uses SiLU)")
    if _rope_scaling(cfg)["rope_type"] != "default":
        refuse("rope_parameters", f"rope type {_rope_scaling(cfg)['rope_type']} is not exported by finetune")
    if arch == "QWEN3NEXT":
        if not cfg.get("norm_topk_prob", True):
            refuse("norm_topk_prob", "false (llama.cpp renormalises the top-k router weights)")
        if not _n_experts(cfg) or cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            refuse("num_experts / mlp_only_layers / decoder_sparse_step", "dense layers (llama.cpp: experts in all)")
    if arch in DELTA_NET_TILED_V:  # interleaved M-RoPE: a rotated pair outside the t/h/w sections takes position 0
        sections = _mrope_sections(cfg)
        pairs = int(_head_dim(cfg) * _partial_rotary_factor(cfg, 0.25)) // 2
        if any(i % sum(sections) >= 3 * sections[i % sum(sections) % 3] for i in range(pairs)):
            refuse("mrope_section", f"{sections[:3]} leaves rotated dims to llama.cpp's 4th section (position 0)")


def swa_period(cfg: dict, arch: str, refuse=None) -> int | None:
    """The period n of the config's sliding-window layout (layers n-1, 2n-1, ... global), None without a
    sliding window. A layout llama.cpp cannot be told (not periodic, or another period where its loader reads
    no attention.sliding_window_pattern) is refused through `refuse`."""
    default, n_layer = SWA_PATTERN[arch], cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if not cfg.get("sliding_window") or (types and "sliding_attention" not in types):
        if arch not in SWA_PATTERN_KEY and refuse is not None:  # its loader slides whatever the file says
            refuse("sliding_window", f"no sliding layers (llama.cpp's {arch.lower()} always has them)")
        return None
    if not types:
        return default
    for n in range(2, n_layer + 2):
        if types == ["sliding_attention" if i % n < n - 1 else "full_attention" for i in range(n_layer)]:
            if n == default or arch in SWA_PATTERN_KEY:
                return n
            break
    if refuse is not None:
        refuse("layer_types", f"not llama.cpp's layout (every {default}th layer global)")
    return default


def _gemma_attention_dim(cfg: dict, arch: str) -> int:
    """The dimension llama.cpp divides Gemma's attention scores by the root of (see GEMMA_27B_LAYERS)."""
    if cfg["num_hidden_layers"] == GEMMA_27B_LAYERS[arch]:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return _head_dim(cfg)


def _rope_params(cfg: dict, layer_type: str = "full_attention") -> dict:
    """The rope parameters of one layer type (transformers 5 nests them per type for Gemma 3)."""
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    if isinstance(rope.get(layer_type), dict):
        rope = dict(rope[layer_type])
    elif any(isinstance(v, dict) for v in rope.values()):
        rope = {}
    return rope


def _rope_theta(cfg: dict, layer_type: str = "full_attention") -> float | None:
    return _rope_params(cfg, layer_type).get("rope_theta", cfg.get("rope_theta"))


def _rope_scaling(cfg: dict) -> dict:
    rope = _rope_params(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return {**rope, "rope_type": rope_type}


def _ffn_length(cfg: dict, arch: str) -> int:
    """The dense feed-forward width as the architecture's MLP builds it (LFM2 derives it from the config)."""
    if arch == "LLAMA4":
        return cfg["intermediate_size_mlp"]
    if arch == "GRANITE_HYBRID" and not _n_experts(cfg):  # its dense MLP is the shared one (n_ff in llama.cpp)
        return cfg["shared_intermediate_size"]
    ff = cfg["intermediate_size"]
    if arch == "LFM2" and cfg.get("block_auto_adjust_ff_dim"):
        ff = int(2 * ff / 3)
        if cfg.get("block_ffn_dim_multiplier") is not None:
            ff = int(cfg["block_ffn_dim_multiplier"] * ff)
        multiple = cfg["block_multiple_of"]
        ff = multiple * ((ff + multiple - 1) // multiple)
    return ff


def _partial_rotary_factor(cfg: dict, default: float = 1.0) -> float:
    """The share of each head's dims RoPE rotates (transformers 5 keeps it in the rope parameters)."""
    return _rope_params(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", default))


def _n_experts(cfg: dict) -> int | None:
    return (
        cfg.get("num_experts")
        or cfg.get("num_local_experts")
        or cfg.get("n_routed_experts")
        or cfg.get("moe_num_experts")
    )


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _tensors(model_dir: Path):
    """(HF name, float32 array) for every weight in the dir's safetensors files."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no .safetensors weights (GGUF export reads safetensors only)")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def _llama3_rope_factors(cfg: dict, rope: dict) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter adds for Llama-3.1-style rope scaling."""
    base, dim = _rope_theta(cfg), _head_dim(cfg)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# The 2025-26 MoE families: what llama.cpp's graph for each fixes (no GGUF key), refused when the config differs,
# and the keys its loader reads.


def _check_silu(cfg: dict, refuse) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"{cfg['hidden_act']} (llama.cpp's experts use SiLU)")


def _check_ernie4_5_moe(cfg: dict, refuse) -> None:
    """llama.cpp's ernie4_5-moe: experts in layer il when il >= moe_layer_start_index and (il + 1) is a multiple
    of moe_layer_interval, up to the last layer; a softmax router whose selection bias picks, top-k renormalised."""
    _check_silu(cfg, refuse)
    n_layer, start, step = (
        cfg["num_hidden_layers"],
        cfg.get("moe_layer_start_index", 1),
        cfg.get("moe_layer_interval", 1),
    )
    end = cfg.get("moe_layer_end_index", -1)
    end = n_layer - 1 if end == -1 else end
    if any(i > end and i >= start and (i + 1) % step == 0 for i in range(n_layer)):
        refuse("moe_layer_end_index", f"{end}: dense layers after it (llama.cpp puts experts up to the last layer)")


def _check_minimax_m2(cfg: dict, refuse) -> None:
    """llama.cpp's minimax-m2 computes transformers' MiniMax-M2: a sigmoid router with a selection bias, top-k
    renormalised, q/k RMS-normed over the whole projection, partial NeoX RoPE."""
    _check_silu(cfg, refuse)


def _check_lfm2moe(cfg: dict, refuse) -> None:
    """llama.cpp's lfm2moe: a sigmoid router with a selection bias, top-k renormalised, unscaled."""
    if not cfg.get("norm_topk_prob", True):
        refuse("norm_topk_prob", "false (llama.cpp's lfm2moe renormalises the top-k router weights)")
    if cfg.get("routed_scaling_factor", 1.0) != 1.0:
        refuse("routed_scaling_factor", f"{cfg['routed_scaling_factor']} (llama.cpp's lfm2moe does not scale)")
    if not cfg.get("use_expert_bias", True):
        refuse("use_expert_bias", "false (llama.cpp's lfm2moe router selects with its expert bias)")


FAMILY_CHECKS = {"ERNIE4_5_MOE": _check_ernie4_5_moe, "MINIMAXM2": _check_minimax_m2, "LFM2MOE": _check_lfm2moe}


def _ernie4_5_moe_hparams(writer, cfg: dict) -> None:
    """Ernie4_5MoeModel's keys; the shared experts' width is written as transformers builds it (moe_intermediate_size
    x moe_num_shared_experts): llama.cpp's converter derives intermediate_size / num_key_value_heads, the same
    number on the released models."""
    writer.add_interleave_moe_layer_step(cfg.get("moe_layer_interval", 1))
    writer.add_leading_dense_block_count(cfg.get("moe_layer_start_index", 1))
    n_shared = cfg.get("moe_num_shared_experts") or 0
    writer.add_expert_shared_count(n_shared)
    if n_shared:
        writer.add_expert_shared_feed_forward_length(cfg["moe_intermediate_size"] * n_shared)


def _minimax_m2_hparams(writer, cfg: dict) -> None:
    import gguf

    writer.add_rope_dimension_count(int(_head_dim(cfg) * _partial_rotary_factor(cfg)))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _lfm2moe_hparams(writer, cfg: dict) -> None:
    import gguf

    writer.add_leading_dense_block_count(cfg.get("num_dense_layers", 0))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


FAMILY_HPARAMS = {"ERNIE4_5_MOE": _ernie4_5_moe_hparams, "MINIMAXM2": _minimax_m2_hparams, "LFM2MOE": _lfm2moe_hparams}


# The Mamba-2 hybrids: Granite 4 (Mamba-2 layers between attention layers, NoPE, Granite's multipliers as keys, a
# shared MLP beside optional experts) and Falcon-H1 (a Mamba-2 mixer beside attention in every layer, its muP
# multipliers folded into the weights as llama.cpp's converter does). Both run llama.cpp's build_mamba2_layer:
# in_proj -> [z, xBC, dt]; causal depthwise conv (+ bias) and SiLU on xBC; the SSM scan with dt = softplus(dt +
# dt_bias), A = -exp(A_log), B and C shared by the heads of a group; y + D x; y * SiLU(z); RMSNorm per group.
MAMBA2 = ("GRANITE_HYBRID", "FALCON_H1")
MAMBA2_RECURRENT = ("linear_attention", "mamba")  # layer_types naming a Mamba-2 layer (transformers 5, original)


def _mamba2_inner(cfg: dict) -> int:
    return cfg.get("mamba_d_ssm") or int(cfg.get("mamba_expand", 2) * cfg["hidden_size"])


def _granite_mamba_layers(cfg: dict) -> list[bool]:
    """Per layer, whether it is a Mamba-2 layer (transformers' default: all of them)."""
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * cfg["num_hidden_layers"]
    return [t in MAMBA2_RECURRENT for t in types]


def _json_float(value) -> float:
    """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def _check_mamba2(cfg: dict, refuse) -> None:
    """What llama.cpp's build_mamba2_layer fixes: SiLU, a conv bias (added unconditionally), no in/out projection
    bias, dt unclamped, gated norm after the gate (Granite's always is)."""
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"{cfg['hidden_act']} (llama.cpp's Mamba-2 layers and MLP use SiLU)")
    if not cfg.get("mamba_conv_bias", True):
        refuse("mamba_conv_bias", "false (llama.cpp's Mamba-2 layer adds a conv bias)")
    if cfg.get("mamba_proj_bias"):
        refuse("mamba_proj_bias", "true (llama.cpp's Mamba-2 layer has no projection biases)")
    low, high = (_json_float(v) for v in cfg.get("time_step_limit") or (0.0, math.inf))
    if low > 0.0 or high != math.inf:
        refuse("time_step_limit", f"[{low}, {high}] (llama.cpp does not clamp the time step)")


def _check_granite_hybrid(cfg: dict, refuse) -> None:
    """llama.cpp's granitehybrid: NoPE (its converter writes rope.scaling.finetuned false), d_inner = 2 x hidden
    (its loader asserts it), head dim hidden / heads; a layer without attention heads is a Mamba-2 layer."""
    _check_mamba2(cfg, refuse)
    if cfg.get("position_embedding_type") == "rope":
        refuse("position_embedding_type", "rope (llama.cpp's granitehybrid runs without RoPE)")
    if _mamba2_inner(cfg) != 2 * cfg["hidden_size"]:
        refuse("mamba_expand", f"{cfg.get('mamba_expand')} (llama.cpp's granitehybrid expects 2)")
    if cfg.get("head_dim") and cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]:
        refuse("head_dim", "not hidden_size / num_attention_heads (llama.cpp's Granite ignores head_dim)")
    if not any(_granite_mamba_layers(cfg)):
        refuse("layer_types", "no Mamba-2 layers (llama.cpp's converter writes granite / granitemoe for these)")


def _check_falcon_h1(cfg: dict, refuse) -> None:
    """llama.cpp's falcon-h1: multipliers folded into the weights (biases would be scaled with them), no attention
    or projector biases, the gated norm after the gate, plain RoPE."""
    _check_mamba2(cfg, refuse)
    for flag in ("attention_bias", "projectors_bias"):
        if cfg.get(flag):
            refuse(flag, "true (llama.cpp's falcon-h1 has no such biases)")
    if cfg.get("mamba_rms_norm") and cfg.get("mamba_norm_before_gate", True):
        refuse("mamba_norm_before_gate", "true (llama.cpp norms after the gate)")
    tied = cfg.get("tie_word_embeddings")
    if tied and cfg.get("embedding_multiplier", 1.0) != cfg.get("lm_head_multiplier", 1.0):
        refuse("tie_word_embeddings", "true with embedding_multiplier != lm_head_multiplier (one tensor folds one)")
    if _rope_scaling(cfg)["rope_type"] != "default":
        refuse("rope_parameters", f"rope type {_rope_scaling(cfg)['rope_type']} is not exported by finetune")


def _mamba2_hparams(writer, cfg: dict) -> None:
    """The ssm.* keys llama.cpp's loader reads: time_step_rank is the number of Mamba-2 heads."""
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_ssm_conv_kernel(cfg["mamba_d_conv"])
    writer.add_ssm_inner_size(_mamba2_inner(cfg))
    writer.add_ssm_state_size(cfg["mamba_d_state"])
    writer.add_ssm_time_step_rank(cfg["mamba_n_heads"])
    writer.add_ssm_group_count(cfg["mamba_n_groups"])


def _granite_hybrid_hparams(writer, cfg: dict) -> None:
    """GraniteHybridModel's keys: the multipliers as scales (written when non-zero, as its converter does), NoPE,
    the shared MLP's width, experts. (head_count_kv per layer, 0 on Mamba-2 layers: write_hparams.)"""
    _mamba2_hparams(writer, cfg)
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_rope_scaling_finetuned(False)  # llama.cpp's switch for RoPE in Granite graphs
    for field, add in (
        ("attention_multiplier", writer.add_attention_scale),
        ("embedding_multiplier", writer.add_embedding_scale),
        ("residual_multiplier", writer.add_residual_scale),
        ("logits_scaling", writer.add_logit_scale),
    ):
        if cfg.get(field):
            add(float(cfg[field]))
    if cfg.get("shared_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(cfg["shared_intermediate_size"])
    if _n_experts(cfg):
        writer.add_expert_count(_n_experts(cfg))
        writer.add_expert_used_count(cfg["num_experts_per_tok"])


def _mamba2_tensors(source, cfg: dict, arch_name: str):
    """(HF name, array) as llama.cpp's Mamba2Model converter modifies them: A_log as -exp(A_log) and D, both
    (heads, 1); dt_bias renamed dt_proj.bias; the depthwise conv kernel squeezed to (channels, kernel); the gated
    norm's weight as (groups, inner / groups); after the family's own renames and folds."""
    n_group, d_inner = cfg["mamba_n_groups"], _mamba2_inner(cfg)
    family = _granite_hybrid_tensors if arch_name == "GRANITE_HYBRID" else _falcon_h1_tensors
    for hf_name, hf_data in source:
        for name, data in family(hf_name, hf_data, cfg):
            if name.endswith("mamba.A_log"):
                data = -np.exp(data).reshape(-1, 1)
            elif name.endswith("mamba.D"):
                data = data.reshape(-1, 1)
            elif name.endswith("mamba.dt_bias"):
                name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
            elif name.endswith("mamba.conv1d.weight"):
                data = np.ascontiguousarray(data.squeeze(1))
            elif name.endswith("mamba.norm.weight"):
                data = data.reshape(n_group, d_inner // n_group)
            yield name, data


def _granite_hybrid_tensors(name: str, data: np.ndarray, cfg: dict):
    """Granite's MoE block and shared MLP as its converter names them: fused [gate; up] projections split, the
    shared MLP as shared experts beside experts or as the dense MLP without; q/k rows permuted (its Llama lineage;
    a no-op under NoPE)."""
    if ".block_sparse_moe." in name:
        layer, _, part = name.partition("block_sparse_moe.")
        if part in ("input_linear.weight", "experts.gate_up_proj"):
            gate, up = np.split(data, 2, axis=-2)
            yield layer + "mlp.experts.gate_proj.weight", np.ascontiguousarray(gate)
            yield layer + "mlp.experts.up_proj.weight", np.ascontiguousarray(up)
        elif part in ("output_linear.weight", "experts.down_proj"):
            yield layer + "mlp.experts.down_proj.weight", data
        else:  # the router: router.layer.weight (original) or router.weight
            yield layer + "mlp.gate.weight", data
    elif ".shared_mlp." in name:
        layer, _, part = name.partition("shared_mlp.")
        mlp = layer + ("mlp.shared_expert." if _n_experts(cfg) else "mlp.")
        if part == "input_linear.weight":
            gate, up = np.split(data, 2, axis=0)
            yield mlp + "gate_proj.weight", np.ascontiguousarray(gate)
            yield mlp + "up_proj.weight", np.ascontiguousarray(up)
        else:
            yield mlp + "down_proj.weight", data
    elif name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        n_head = cfg["num_attention_heads"]
        yield name, permute(data, n_head, cfg.get("num_key_value_heads", n_head) if ".k_proj." in name else n_head)
    else:
        yield name, data


def _falcon_h1_tensors(name: str, data: np.ndarray, cfg: dict):
    """Falcon-H1's multipliers folded into the weights as its converter does: the embedding and lm head; q, k
    (times key_multiplier too) and v by attention_in_multiplier, o by attention_out_multiplier; the SSM's input
    projection by ssm_in_multiplier and per block of rows [z, x, B, C, dt] by ssm_multipliers, its output by
    ssm_out_multiplier; the MLP's gate and down projections by mlp_multipliers."""
    attn_in = cfg.get("attention_in_multiplier", 1.0)
    gate_mult, down_mult = cfg.get("mlp_multipliers") or (1.0, 1.0)
    scale = {
        "embed_tokens.weight": cfg.get("embedding_multiplier", 1.0),
        "lm_head.weight": cfg.get("lm_head_multiplier", 1.0),
        "self_attn.q_proj.weight": attn_in,
        "self_attn.k_proj.weight": attn_in * cfg.get("key_multiplier", 1.0),
        "self_attn.v_proj.weight": attn_in,
        "self_attn.o_proj.weight": cfg.get("attention_out_multiplier", 1.0),
        "mamba.out_proj.weight": cfg.get("ssm_out_multiplier", 1.0),
        "feed_forward.gate_proj.weight": gate_mult,
        "feed_forward.gate_proj.bias": gate_mult,
        "feed_forward.down_proj.weight": down_mult,
        "feed_forward.down_proj.bias": down_mult,
    }
    if name.endswith("mamba.in_proj.weight"):
        d_inner, n_bc = _mamba2_inner(cfg), cfg["mamba_n_groups"] * cfg["mamba_d_state"]
        z, x, b, c, dt = cfg.get("ssm_multipliers") or [1.0] * 5
        rows = [z] * d_inner + [x] * d_inner + [b] * n_bc + [c] * n_bc + [dt] * cfg["mamba_n_heads"]
        data = data * cfg.get("ssm_in_multiplier", 1.0) * np.array(rows, dtype=np.float32)[:, None]
    for suffix, factor in scale.items():
        if name.endswith(suffix):
            data = data * np.float32(factor)
    yield name, data


FAMILY_CHECKS["GRANITE_HYBRID"] = _check_granite_hybrid
FAMILY_CHECKS["FALCON_H1"] = _check_falcon_h1
FAMILY_HPARAMS["GRANITE_HYBRID"] = _granite_hybrid_hparams
FAMILY_HPARAMS["FALCON_H1"] = _mamba2_hparams


# Multi-head latent attention (GLM-4.7-Flash, DeepSeek-V3 as deepseek2; Kimi Linear) as llama.cpp runs it: the kv
# latent and the shared rope key cached as one head (MQA), each head's nope query absorbed into the latent through
# attn_k_b and the attended latent expanded through attn_v_b; RoPE on adjacent pairs (none in Kimi Linear); a
# sigmoid router whose selection bias picks the experts, limited to the best expert groups, its weights renormalised
# and scaled; shared experts and leading dense layers. Kimi Linear's other layers are KDA (Kimi delta attention).


def _mla_leading_dense(cfg: dict) -> int | None:
    """How many leading layers are dense (the rest MoE), as transformers builds them: mlp_layer_types (GLM-4.7-Flash,
    Kimi Linear) or first_k_dense_replace (DeepSeek-V3); None when the dense layers do not all lead."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        return cfg.get("first_k_dense_replace") or 0
    lead = types.count("dense")
    return lead if types == ["dense"] * lead + ["sparse"] * (len(types) - lead) else None


def _mla_lite(cfg: dict) -> bool:
    """Whether llama.cpp's deepseek2 loader takes this model for a Lite one (reads no q_lora_rank: MLA_LITE_LAYERS)."""
    n_layer = cfg["num_hidden_layers"]
    return n_layer in MLA_LITE_LAYERS or (n_layer == 48 and cfg["vocab_size"] == 128256)


def _first(cfg: dict, *names, default=None):
    """The first of `names` the config.json has (Kimi Linear's config writes other names for the same settings)."""
    return next((cfg[n] for n in names if cfg.get(n) is not None), default)


def _check_mla(cfg: dict, refuse) -> None:
    """Refuse an MLA config that llama.cpp's deepseek2 graph would compute differently, or could not load."""
    _check_silu(cfg, refuse)
    if cfg.get("rope_interleave") is False:
        refuse("rope_interleave", "false (llama.cpp's deepseek2 rotates adjacent pairs, as the interleaved layout)")
    if (rope_type := _rope_scaling(cfg)["rope_type"]) not in ("default", "yarn"):
        refuse("rope_parameters", f"rope type {rope_type} on deepseek2 is not exported by finetune")
    if rope_type == "yarn":
        _check_mla_yarn(_rope_scaling(cfg), refuse)
    if _partial_rotary_factor(cfg) != 1.0:
        refuse("partial_rotary_factor", "set (llama.cpp's deepseek2 rotates all qk_rope_head_dim dims)")
    if (cfg.get("q_lora_rank") is None) != _mla_lite(cfg):
        refuse(
            "q_lora_rank",
            f"{cfg.get('q_lora_rank')} with {cfg['num_hidden_layers']} layers (llama.cpp's deepseek2 reads a "
            f"low-rank q except on a {'/'.join(map(str, MLA_LITE_LAYERS))}-layer Lite model, by its layer count)",
        )
    _check_mla_moe(cfg, refuse)


def _check_mla_yarn(rope: dict, refuse) -> None:
    """YaRN as llama.cpp's deepseek2 runs it: ggml's ramp between interpolated and extrapolated frequencies over the
    correction dims of its default beta_fast 32 / beta_slow 1 (no key older llama.cpp reads), cos/sin left unscaled
    and the scores scaled by (0.1 mscale_all_dim ln(factor) + 1)^2: transformers computes the same when mscale equals
    mscale_all_dim (its cos/sin factor is their ratio)."""
    if not rope.get("mscale_all_dim") or rope.get("mscale") != rope.get("mscale_all_dim"):
        refuse("rope_parameters", "yarn with mscale other than mscale_all_dim (llama.cpp leaves cos/sin unscaled)")
    if (rope.get("beta_fast", 32), rope.get("beta_slow", 1)) != (32, 1) or rope.get("attention_factor") is not None:
        refuse("rope_parameters", "yarn beta_fast / beta_slow / attention_factor other than llama.cpp's defaults")
    if rope.get("truncate") is False:
        refuse("rope_parameters", "yarn truncate false (llama.cpp rounds the correction dims)")


def _check_mla_moe(cfg: dict, refuse) -> None:
    if cfg.get("attention_bias"):
        refuse("attention_bias", "true (llama.cpp's MLA graphs have no attention biases)")
    if _mla_leading_dense(cfg) is None:
        refuse("mlp_layer_types", "dense layers after MoE ones (llama.cpp has leading dense layers only)")
    if not _first(cfg, "n_shared_experts", "num_shared_experts"):
        refuse("n_shared_experts", "0 (llama.cpp's MLA graphs run a shared expert in every MoE layer)")


def _check_kimi_linear(cfg: dict, refuse) -> None:
    """Refuse a Kimi Linear config that llama.cpp's kimi-linear graph would compute differently, or could not load."""
    _check_silu(cfg, refuse)  # also the KDA convolution's activation in transformers
    if set(cfg.get("layer_types") or []) - {"linear_attention", "full_attention"}:
        refuse("layer_types", "other than linear_attention and full_attention (llama.cpp's kimi-linear has these two)")
    if cfg["linear_num_heads"] != cfg["num_attention_heads"]:
        refuse("linear_num_heads", "differs from num_attention_heads (llama.cpp's kimi-linear has one head count)")
    if not _first(cfg, "norm_topk_prob", "moe_renormalize", default=True):
        refuse("moe_renormalize", "false (llama.cpp's kimi-linear renormalises the top-k router weights)")
    if cfg.get("tie_word_embeddings"):
        refuse("tie_word_embeddings", "true (llama.cpp's kimi-linear needs a separate output matrix)")
    _check_mla_moe(cfg, refuse)


def _mla_hparams(writer, cfg: dict, arch_name: str) -> None:
    """The keys llama.cpp's converter (DeepseekV2Model, KimiLinearModel) writes and its loader reads: one kv head whose
    key is the kv latent plus the rope slice and whose value is the latent (MQA over the cache), the per-head sizes
    after decompression (key_length_mla / value_length_mla), the q/kv ranks, the rope slice's width; the router
    (sigmoid always: transformers' MLA families score that way), its groups, renormalisation and scale. Kimi Linear:
    head_count_kv 0 on its KDA layers (how llama.cpp tells them), the KDA head size and convolution width."""
    import gguf

    kv_lora, rope_dim = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(_first(cfg, "max_position_embeddings", "model_max_length"))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    if arch_name == "KIMI_LINEAR":
        writer.add_head_count_kv([int(t == "full_attention") for t in cfg["layer_types"]])
        writer.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
        writer.add_kda_head_dim(cfg["linear_head_dim"])
    else:
        writer.add_head_count_kv(1)
        writer.add_rope_freq_base(float(_rope_theta(cfg) or 10000.0))
        writer.add_expert_weights_norm(bool(cfg.get("norm_topk_prob")))  # kimi-linear's graph always renormalises
        if (rope := _rope_scaling(cfg))["rope_type"] == "yarn":  # the converter's keys; log_mul stored x 0.1
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(rope["factor"])
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_expert_count(_first(cfg, "n_routed_experts", "num_experts", "num_local_experts"))
    writer.add_expert_used_count(_first(cfg, "num_experts_per_tok", "num_experts_per_token"))
    if (n_group := _first(cfg, "n_group", "num_expert_group")) is not None:
        writer.add_expert_group_count(n_group)
        writer.add_expert_group_used_count(cfg["topk_group"])
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_leading_dense_block_count(_mla_leading_dense(cfg))
    if cfg.get("q_lora_rank") is not None:
        writer.add_q_lora_rank(cfg["q_lora_rank"])
    writer.add_kv_lora_rank(kv_lora)
    writer.add_key_length(kv_lora + rope_dim)
    writer.add_value_length(kv_lora)
    writer.add_key_length_mla(cfg["qk_nope_head_dim"] + rope_dim)
    writer.add_value_length_mla(cfg["v_head_dim"])
    writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    writer.add_expert_shared_count(_first(cfg, "n_shared_experts", "num_shared_experts"))
    writer.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    writer.add_rope_dimension_count(rope_dim)


def _mla_tensors(source, cfg: dict):
    """kv_b_proj split per head into k_b_proj (the nope key rows, transposed: (head, kv_lora, nope)) and v_b_proj
    ((head, v, kv_lora)), as llama.cpp's converter writes them for the absorbed attention. KDA layers (Kimi Linear,
    saved as its checkpoint names them): A_log as -exp(A_log), dt_bias as dt_proj.bias, each of the q/k/v depthwise
    convolution kernels as the converter's (1, channels, 1, kernel); transformers' runtime names (the forget gate's
    own module, one fused kernel) read as those."""
    import re

    n_head, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
    for name, data in source:
        name = name.replace(".forget_gate.", ".")
        # transformers saves Kimi Linear's dense MLP under block_sparse_moe. too (undoing its own mlp. renaming)
        name = re.sub(r"\.block_sparse_moe\.(gate_proj|up_proj|down_proj)\.", r".mlp.\1.", name)
        if name.endswith("kv_b_proj.weight"):
            kv_b = data.reshape(n_head, nope + cfg["v_head_dim"], data.shape[-1])
            yield name.replace("kv_b_proj", "k_b_proj"), np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
            yield name.replace("kv_b_proj", "v_b_proj"), np.ascontiguousarray(kv_b[:, nope:])
            continue
        if name.endswith(".A_log"):
            data = -np.exp(data)
        elif name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif name.endswith("self_attn.conv1d.weight"):  # fused [q, k, v] channels
            for part, kernel in zip(("q", "k", "v"), np.split(data, 3)):
                yield name.replace(".conv1d.", f".{part}_conv1d."), kernel.reshape(1, -1, 1, data.shape[-1])
            continue
        elif name.endswith(("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight")):
            data = data.reshape(1, -1, 1, data.shape[-1])
        yield name, data


FAMILY_CHECKS["DEEPSEEK2"] = _check_mla
FAMILY_CHECKS["KIMI_LINEAR"] = _check_kimi_linear


# Ministral 3, Mixtral, Granite and GLM-4: what llama.cpp's mistral3 / llama / granite / glm4 graphs fix, and the keys
# their converters write.


def _is_moe(cfg: dict, arch: str) -> bool:
    """Whether the file carries routed experts: always for the MoE architectures, and for those whose graph runs
    experts where the config has them (Mixtral on llama)."""
    return arch in MOE or (arch in MOE_WHEN_EXPERTS and bool(_n_experts(cfg)))


def _check_yarn(cfg: dict, refuse) -> None:
    """transformers' YaRN against llama.cpp's (llama-context.cpp): the cos/sin magnitude is
    mscale(factor) / mscale(factor, mscale_all_dim) with mscale taken as 1, or mscale(factor) without
    mscale_all_dim; an explicit attention_factor is not read; the correction range is always rounded."""
    rope = _rope_scaling(cfg)
    if rope["rope_type"] != "yarn":
        return
    if rope.get("attention_factor") is not None:
        refuse("rope_parameters.attention_factor", "set (llama.cpp derives the YaRN magnitude from the factor)")
    if rope.get("mscale") and rope.get("mscale_all_dim") and rope["mscale"] != 1.0:
        refuse("rope_parameters.mscale", f"{rope['mscale']} with mscale_all_dim (llama.cpp takes mscale as 1)")
    if rope.get("truncate", True) is False:
        refuse("rope_parameters.truncate", "false (llama.cpp rounds YaRN's correction range)")


def _check_swiglu(cfg: dict, refuse) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", f"{cfg['hidden_act']} (llama.cpp's graph uses SiLU)")


def _check_mistral3(cfg: dict, refuse) -> None:
    """llama.cpp's mistral3: full attention, YaRN RoPE and Llama 4's query temperature from the file's keys."""
    _check_swiglu(cfg, refuse)
    if cfg.get("sliding_window"):
        refuse("sliding_window", f"{cfg['sliding_window']} (llama.cpp's mistral3 attends over the whole context)")
    rope = _rope_scaling(cfg)
    if rope["rope_type"] not in ("default", "yarn"):
        refuse("rope_parameters", f"rope type {rope['rope_type']} (llama.cpp's converter writes YaRN for mistral3)")
    _check_yarn(cfg, refuse)


def _mistral3_hparams(writer, cfg: dict) -> None:
    """Ministral3Model's keys beyond LlamaModel's: YaRN's betas and mscale_all_dim, the query temperature scale
    (its period is the YaRN original context, which llama.cpp's loader takes it from)."""
    rope = _rope_scaling(cfg)
    if rope["rope_type"] == "yarn":
        for value, add in (
            (rope.get("beta_fast"), writer.add_rope_scaling_yarn_beta_fast),
            (rope.get("beta_slow"), writer.add_rope_scaling_yarn_beta_slow),
        ):
            if value is not None:
                add(float(value))
        if rope.get("mscale") and rope.get("mscale_all_dim"):  # else transformers uses mscale(factor), as llama.cpp
            writer.add_rope_scaling_yarn_log_mul(float(rope["mscale_all_dim"]))
    if beta := rope.get("llama_4_scaling_beta"):
        writer.add_attn_temperature_scale(float(beta))


def _check_llama_experts(cfg: dict, refuse) -> None:
    """llama.cpp's llama graph with experts (Mixtral): softmax router, top-k renormalised, SiLU experts."""
    if _n_experts(cfg):
        _check_silu(cfg, refuse)


# Granite's multipliers as llama.cpp's granite graph reads them; its converter writes each only when non-zero
GRANITE_SCALES = {
    "embedding_multiplier": "add_embedding_scale",
    "residual_multiplier": "add_residual_scale",
    "attention_multiplier": "add_attention_scale",
}


def _check_granite(cfg: dict, refuse) -> None:
    """llama.cpp's granite: heads of hidden/heads (its converter drops head_dim), the four multipliers from keys."""
    _check_swiglu(cfg, refuse)
    if _head_dim(cfg) * cfg["num_attention_heads"] != cfg["hidden_size"]:
        refuse("head_dim", "heads x head_dim is not hidden_size (llama.cpp's converter drops head_dim)")
    for field in (*GRANITE_SCALES, "logits_scaling"):
        if cfg.get(field, 1.0) == 0:
            refuse(field, "0 (llama.cpp reads 0 as not set)")


def _granite_hparams(writer, cfg: dict) -> None:
    for field, add in GRANITE_SCALES.items():
        if value := cfg.get(field, 1.0):
            getattr(writer, add)(float(value))
    writer.add_logit_scale(float(cfg.get("logits_scaling", 1.0)))


def _check_glm4(cfg: dict, refuse) -> None:
    """llama.cpp's glm4: GPT-J-style RoPE over the first partial_rotary_factor of each head, SwiGLU."""
    _check_swiglu(cfg, refuse)
    if _rope_params(cfg).get("mrope_section"):
        refuse("mrope_section", "set (finetune exports GLM-4's text model without M-RoPE)")


def _glm4_hparams(writer, cfg: dict) -> None:
    writer.add_rope_dimension_count(int(_head_dim(cfg) * _partial_rotary_factor(cfg, 0.5)))


FAMILY_CHECKS["MISTRAL3"] = _check_mistral3
FAMILY_CHECKS["LLAMA"] = _check_llama_experts
FAMILY_CHECKS["GRANITE"] = _check_granite
FAMILY_CHECKS["GLM4"] = _check_glm4
FAMILY_HPARAMS["MISTRAL3"] = _mistral3_hparams
FAMILY_HPARAMS["GRANITE"] = _granite_hparams
FAMILY_HPARAMS["GLM4"] = _glm4_hparams

# gpt-oss in llama.cpp (src/models/openai-moe-iswa.cpp): sliding layers 0, 2, 4, ... (its loader's fixed period 2),
# attention sinks, biased experts with the clamped SwiGLU (alpha and limit fixed in build_moe_ffn), a biased
# router whose top-k logits are softmaxed, NeoX YaRN RoPE with ggml's default betas
GPT_OSS_FIXED = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
GPT_OSS_YARN_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}


def _check_gpt_oss(cfg: dict, refuse) -> None:
    n_layer = cfg["num_hidden_layers"]
    if cfg.get("layer_types", []) != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]:
        refuse("layer_types", "not llama.cpp's layout (sliding and full layers alternating, sliding first)")
    for field, want in GPT_OSS_FIXED.items():
        if cfg.get(field, want) != want:
            refuse(field, f"{cfg[field]} (llama.cpp's gpt-oss uses {want})")
    if not cfg.get("attention_bias", True):
        refuse("attention_bias", "false (llama.cpp's gpt-oss loads q/k/v/o biases)")
    rope = _rope_scaling(cfg)
    if rope["rope_type"] != "yarn":
        refuse("rope_parameters", f"rope type {rope['rope_type']} (llama.cpp's converter writes YaRN for gpt-oss)")
    for field, want in GPT_OSS_YARN_BETAS.items():
        if rope.get(field, want) != want:
            refuse(f"rope_parameters.{field}", f"{rope[field]} (llama.cpp's gpt-oss uses {want})")
    _check_yarn(cfg, refuse)


def _gpt_oss_hparams(writer, cfg: dict) -> None:
    """GptOssModel's keys: the window, the experts (all as wide as intermediate_size)."""
    writer.add_sliding_window(cfg["sliding_window"])
    writer.add_expert_count(_n_experts(cfg))
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(cfg["intermediate_size"])
    rope = _rope_scaling(cfg)
    writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
    writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))


def _gpt_oss_tensors(source, cfg: dict):
    """gpt-oss's tensors as its converter modifies them: the fused experts (n_expert, in, out) transposed, gate
    and up de-interleaved (even columns gate, odd up), biases alike; the sinks named `.weight`."""
    for name, data in source:
        base = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):
            data = data.swapaxes(-1, -2)
            yield f"{base}.gate_proj.weight", np.ascontiguousarray(data[:, ::2])
            yield f"{base}.up_proj.weight", np.ascontiguousarray(data[:, 1::2])
        elif name.endswith("experts.gate_up_proj_bias"):
            yield f"{base}.gate_proj.bias", np.ascontiguousarray(data[..., ::2])
            yield f"{base}.up_proj.bias", np.ascontiguousarray(data[..., 1::2])
        elif name.endswith("experts.down_proj"):
            yield f"{name}.weight", np.ascontiguousarray(data.swapaxes(-1, -2))
        elif name.endswith("experts.down_proj_bias"):
            yield f"{base}.down_proj.bias", data
        elif name.endswith("self_attn.sinks"):
            yield f"{name}.weight", data
        else:
            yield name, data


FAMILY_CHECKS["GPT_OSS"] = _check_gpt_oss
FAMILY_HPARAMS["GPT_OSS"] = _gpt_oss_hparams
FAMILY_TENSORS = {"GPT_OSS": _gpt_oss_tensors}  # per-family tensor transforms before naming


def _pre_tokenizer(tok) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer does: the tokenizer transformers loads
    (whose class may replace tokenizer.json's pre-tokenizer) encodes probe strings (digits, apostrophes, CJK,
    whitespace runs, symbols), and each candidate regex, run in front of the same BPE model, must give the
    same ids on every probe."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    backend = tok.backend_tokenizer
    want = [tok.encode(text, add_special_tokens=False) for text in PROBES]
    state = backend.to_str()
    for name, regex in PRE_TOKENIZERS.items():
        trial = Tokenizer.from_str(state)
        split = [pre_tokenizers.Split(Regex(regex), behavior="isolated")] if regex else []
        trial.pre_tokenizer = pre_tokenizers.Sequence(
            [*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not regex)]
        )
        if [trial.encode(text, add_special_tokens=False).ids for text in PROBES] == want:
            return name
    raise ExportError(
        "tokenizer: splits text like none of the llama.cpp pre-tokenizers this exporter knows "
        f"({', '.join(PRE_TOKENIZERS)}), probed on digits, apostrophes, CJK and whitespace; "
        "convert with llama.cpp's convert_hf_to_gguf.py"
    )


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece-style BPE, byte fallback)
    tokens: list[str]
    types: list[int]
    pre: str
    tok: object  # the transformers tokenizer
    scores: list[float] | None = None  # llama: merge priority, higher first
    add_space_prefix: bool = False


def _vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """The vocab as llama.cpp's converter builds it: byte-level BPE (get_vocab_base), or SentencePiece-style BPE
    with byte fallback (Llama-2 / Phi-3 / Gemma style tokenizer.json) as a `llama` vocab whose scores rank the
    merges the way the tokenizer's merge list does."""
    import gguf
    from transformers import AutoTokenizer

    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ExportError(f"{model_dir}: no tokenizer.json (GGUF export needs a fast BPE tokenizer)")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    bpe = (tj.get("model") or {}).get("type") == "BPE"
    byte_level = (tj.get("decoder") or {}).get("type") == "ByteLevel"
    spm = bpe and not byte_level and tj["model"].get("byte_fallback") and not tj.get("pre_tokenizer")
    if not (bpe and byte_level) and not spm:
        raise ExportError(
            f"{tj_path}: only byte-level BPE (GPT-2 / Llama-3 / Qwen2 style) and SentencePiece-style BPE "
            "with byte fallback (Llama-2 / Phi-3 / Gemma style) tokenizers are exported; this one is "
            "neither: merge to safetensors and use llama.cpp's convert_hf_to_gguf.py"
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    pre = "default" if spm else _pre_tokenizer(tok)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    ranks = {}
    if spm:  # a token's score: minus the rank of the merge that makes it (llama.cpp merges the best score first)
        for rank, merge in enumerate(tj["model"].get("merges") or []):
            left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
            ranks.setdefault(left + right, rank)
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        token = reverse[i]
        score = -float(ranks.get(token, 0))
        if i in added:
            score = -1000.0
            if not added[i].normalized and not spm:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if token == tok.unk_token and spm:
                types.append(gguf.TokenType.UNKNOWN)
            elif added[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token if spm else token.replace("\u2581", " ")  # llama.cpp pre-normalises BPE user spaces
                types.append(gguf.TokenType.USER_DEFINED)
        elif spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(gguf.TokenType.BYTE)
            score = 0.0
        elif spm and token == tok.unk_token:
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
        scores.append(score)
    if not spm:
        return Vocab("gpt2", tokens, types, pre, tok)
    normalizers = tj.get("normalizer") or {}
    steps = normalizers.get("normalizers", [normalizers])
    prefix = any(step.get("type") == "Prepend" and step.get("prepend") == "\u2581" for step in steps)
    return Vocab("llama", tokens, types, pre, tok, scores, prefix)


def adds_bos(tok) -> bool:
    """Whether inference should prepend BOS (the GGUF's add_bos_token, which llama.cpp and Ollama's runner
    obey): exactly when training saw one, i.e. when the chat template writes BOS itself (the rendered prompt
    is then tokenized without adding another); with no chat template, when the tokenizer adds one."""
    if not tok.bos_token:
        return False
    if tok.chat_template:
        try:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # noqa: BLE001 -- a template that refuses this chat: fall back to the tokenizer's own habit
            prompt = None
        if prompt is not None:
            return prompt.startswith(tok.bos_token)
    ids = tok("x")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens some models fail to mark special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


# tensors llama.cpp's converter always stores in f32 (besides 1-D ones and norms): MoE routers, conv kernels
ALWAYS_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "shortconv.conv.weight", "ssm_conv1d.weight")
# and Kimi Linear's KDA decay and (4-D) convolution kernels, which are not 1-D there
ALWAYS_F32 += ("ssm_a", "ssm_conv1d_q.weight", "ssm_conv1d_k.weight", "ssm_conv1d_v.weight")


def _qtype(name: str, data: np.ndarray, outtype: str):
    """The stored type of one tensor, as llama.cpp's converter picks it: 1-D tensors (norms, biases,
    rope factors), routers and short-conv kernels stay f32; q8_0 needs rows in whole blocks of 32 (else f16)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if outtype == "f32" or data.ndim <= 1 or name.endswith(("_norm.weight", *ALWAYS_F32)):
        return Q.F32
    if not name.endswith(".weight"):  # the converter keeps tensors named without .weight in f32: ssm_a, ssm_d
        return Q.F32
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def _decode(tensor) -> np.ndarray:
    """A GGUFReader tensor as float32 in the source's (numpy) shape."""
    import gguf

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def convert(model_dir: Path, out_file: Path, outtype: str = "f16", name: str | None = None) -> GGUFReport:
    """Write `model_dir` (a plain HF model dir) as GGUF to `out_file`, then verify it by reading it back."""
    import gguf

    cfg, arch_name = model_config(model_dir)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    vocab = _vocab(model_dir, cfg["vocab_size"])
    tokens, types, pre, tok = vocab.tokens, vocab.types, vocab.pre, vocab.tok

    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or model_dir.name)
    write_hparams(writer, cfg, arch_name)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    gguf_log = logging.getLogger("gguf")
    level, gguf_log.level = gguf_log.level, logging.ERROR  # its notes on post-processor templates are noise here
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(tokens))
        special.add_special_token["bos"] = add_bos = adds_bos(tok)
        special.add_to_gguf(writer, quiet=True)
    finally:
        gguf_log.setLevel(level)

    # Two passes over the weights, one tensor in memory at a time: the tensor infos (types, byte sizes)
    # go in the header, then the data streams after it.
    count = 0
    for new, data in gguf_tensors(model_dir, cfg, arch_name):
        qtype = _qtype(new, data, outtype)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(new, data.shape, np.dtype(dtype), data.size * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(data.shape, qtype)
            writer.add_tensor_info(new, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for new, data in gguf_tensors(model_dir, cfg, arch_name):
        writer.write_tensor_data(_encode(data, _qtype(new, data, outtype)))
    writer.close()
    worst = verify(
        out_file, gguf_tensors(model_dir, cfg, arch_name), outtype, tokens, special.chat_template, arch_name
    )
    return GGUFReport(
        out_file,
        gguf.MODEL_ARCH_NAMES[arch],
        outtype,
        count,
        worst,
        len(tokens),
        pre,
        bool(special.chat_template),
        add_bos,
    )


def write_hparams(writer, cfg: dict, arch_name: str) -> None:
    """The architecture's hyper-parameter keys, as llama.cpp's converter writes them for it."""
    import gguf

    if arch_name == "GEMMA4":
        return _gemma4_hparams(writer, cfg)
    if arch_name in MLA:
        return _mla_hparams(writer, cfg, arch_name)
    n_head = cfg["num_attention_heads"]
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    if cfg.get("intermediate_size") or cfg.get("intermediate_size_mlp"):  # Qwen3.5-MoE has experts only
        writer.add_feed_forward_length(_ffn_length(cfg, arch_name))
    writer.add_head_count(n_head)
    n_kv = cfg.get("num_key_value_heads") or n_head
    if arch_name in SHORTCONV:  # per layer: none on the short-convolution layers
        n_kv = [n_kv if t == "full_attention" else 0 for t in cfg["layer_types"]]
    if arch_name == "GRANITE_HYBRID":  # per layer: none on the Mamba-2 layers (llama.cpp's sign of one)
        n_kv = [0 if mamba else n_kv for mamba in _granite_mamba_layers(cfg)]
    writer.add_head_count_kv(n_kv)
    if (theta := _rope_theta(cfg)) is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", cfg.get("norm_eps")))
    if cfg.get("head_dim"):
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    if arch_name in (*PERMUTED, "LLAMA4"):  # llama.cpp's LlamaModel converter (SmolLM3, Llama 4) writes these
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(_head_dim(cfg))
    if arch_name == "QWEN2VL":
        writer.add_rope_dimension_sections(_mrope_sections(cfg))
    if arch_name in SHORTCONV:
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_shortconv_l_cache(cfg["conv_L_cache"])
    if arch_name == "PHI3":
        writer.add_rope_dimension_count(int(cfg.get("partial_rotary_factor", 1.0) * cfg["hidden_size"]) // n_head)
        writer.add_rope_scaling_orig_ctx_len(
            cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        )
        writer.add_sliding_window(cfg.get("sliding_window") or 0)
    if arch_name in SWA_PATTERN and (period := swa_period(cfg, arch_name)):
        writer.add_sliding_window(cfg["sliding_window"])
        if period != SWA_PATTERN[arch_name]:
            writer.add_sliding_window_pattern(period)
    if arch_name in NORM_PLUS_ONE:
        if (theta_swa := _rope_theta(cfg, "sliding_attention")) is not None and theta_swa != theta:
            writer.add_rope_freq_base_swa(float(theta_swa))
        if arch_name == "GEMMA2" and cfg.get("attn_logit_softcapping"):
            writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        if cfg.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if _is_moe(cfg, arch_name):
        writer.add_expert_count(_n_experts(cfg))
        writer.add_expert_used_count(cfg.get("num_experts_per_tok") or cfg["moe_k"])
        writer.add_expert_feed_forward_length(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    if arch_name == "LLAMA4":
        writer.add_interleave_moe_layer_step(cfg.get("interleave_moe_layer_step", 1))
        if _llama4_all_global(cfg):  # llama.cpp then ropes every layer and attends without chunks
            writer.add_sliding_window(0)
    if arch_name == "GLM4_MOE":  # a sigmoid router with a selection bias, shared experts, leading dense layers
        writer.add_rope_dimension_count(int(_head_dim(cfg) * _partial_rotary_factor(cfg, 0.5)))
        writer.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
        writer.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
        writer.add_expert_weights_norm(bool(cfg.get("norm_topk_prob")))
    if arch_name in FAMILY_HPARAMS:
        FAMILY_HPARAMS[arch_name](writer, cfg)
    if arch_name in DELTA_NET:
        _delta_net_hparams(writer, cfg, arch_name)
    rope = _rope_scaling(cfg)
    if rope["rope_type"] in ("linear", "yarn") and rope.get("factor"):
        writer.add_rope_scaling_type(
            gguf.RopeScalingType.LINEAR if rope["rope_type"] == "linear" else gguf.RopeScalingType.YARN
        )
        writer.add_rope_scaling_factor(rope["factor"])
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def _delta_net_hparams(writer, cfg: dict, arch_name: str) -> None:
    """The gated delta-net keys llama.cpp's qwen3next / qwen35 loaders read (its Qwen3NextModel converter)."""
    writer.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    writer.add_ssm_state_size(cfg["linear_key_head_dim"])
    writer.add_ssm_group_count(cfg["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    writer.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    writer.add_full_attention_interval(full_attention_interval(cfg))
    writer.add_rope_dimension_count(int(_head_dim(cfg) * _partial_rotary_factor(cfg, 0.25)))
    if arch_name in DELTA_NET_TILED_V:
        writer.add_rope_dimension_sections(_mrope_sections(cfg))
    if cfg.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])


def _tiled_v_heads(w: np.ndarray, axis: int, n_k: int, head: int) -> np.ndarray:
    """Value heads (n_k groups of r, each `head` wide along `axis`) from grouped order to tiled order
    [G0v0, G1v0, ..., G0v1, G1v1, ...], as llama.cpp's _LinearAttentionVReorderBase writes them."""
    w = np.moveaxis(w, axis, 0)
    r = w.shape[0] // (n_k * head)
    w = w.reshape(n_k, r, head, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
    return np.ascontiguousarray(np.moveaxis(w, 0, axis))


def _delta_net_tensors(source, cfg: dict, arch_name: str):
    """(HF name, array) of a Qwen3-Next / Qwen3.5 model as llama.cpp's converter modifies them before naming:
    norms stored as 1 + w (not the gated delta-net's own), A_log as -exp(A_log), dt_bias renamed dt_proj.bias,
    depthwise conv kernels squeezed to (channels, kernel), Qwen3-Next's per-key-head [q, k, v, z] rows of
    in_proj_qkvz regrouped into in_proj_qkv [q..., k..., v...] and in_proj_z, and for Qwen3.5 the value heads
    reordered to tiled order wherever they appear. MTP weights are left out (llama.cpp runs without them). A
    causal LM loaded from the vision-language checkpoint (how Qwen3.5 ships) saves its decoder under
    model.language_model.: read as model., the names llama.cpp's converter maps."""
    n_k, n_v = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    reorder = arch_name in DELTA_NET_TILED_V and n_k != n_v
    for name, data in source:
        if name.startswith("mtp."):
            continue
        name = name.replace("model.language_model.", "model.", 1)
        if reorder and ".linear_attn." in name:
            if ".in_proj_qkv." in name or ".conv1d." in name:  # only the value rows / channels
                data = np.concatenate([data[: 2 * n_k * dk], _tiled_v_heads(data[2 * n_k * dk :], 0, n_k, dv)])
            elif ".in_proj_z." in name:
                data = _tiled_v_heads(data, 0, n_k, dv)
            elif name.endswith(("in_proj_a.weight", "in_proj_b.weight", ".A_log", ".dt_bias")):
                data = _tiled_v_heads(data, 0, n_k, 1)
            elif ".out_proj." in name:
                data = _tiled_v_heads(data, 1, n_k, dv)
        if name.endswith(".A_log"):
            data = -np.exp(data)
        elif name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif name.endswith("linear_attn.conv1d.weight"):
            data = np.ascontiguousarray(data.squeeze(1))
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            data = data + 1.0
        if name.endswith("in_proj_qkvz.weight"):
            base = name.removesuffix("in_proj_qkvz.weight")
            per_head = data.reshape(n_k, 2 * dk + 2 * dv * n_v // n_k, data.shape[-1])
            q, k, v, z = np.split(per_head, np.cumsum([dk, dk, dv * n_v // n_k]), axis=1)
            rows = [part.reshape(-1, data.shape[-1]) for part in (q, k, v, z)]
            yield base + "in_proj_qkv.weight", np.ascontiguousarray(np.concatenate(rows[:3]))
            yield base + "in_proj_z.weight", np.ascontiguousarray(rows[3])
            continue
        yield name, data


def _stacked_experts(model_dir: Path, cfg: dict, arch_name: str):
    """(HF name, array) with each layer's per-expert projections stacked into one (n_expert, out, in) tensor
    named `...mlp.experts.{gate,up,down}_proj.weight`, as llama.cpp's converter does; a fused
    `experts.gate_up_proj` (n_expert, 2*ff, hidden) is split into gate and up (transposed first where the
    architecture stores it (n_expert, hidden, 2*ff))."""
    import re

    n_experts = _n_experts(cfg)
    pending: dict[str, dict[int, np.ndarray]] = {}
    per_expert = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
    for name, data in _tensors(model_dir):
        if arch_name in EXPERTS_IN_OUT and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            data = np.ascontiguousarray(data.swapaxes(-1, -2))
        m = per_expert.match(name)
        if m:
            key = f"{m.group(1)}.{m.group(3)}.weight"
            pending.setdefault(key, {})[int(m.group(2))] = data
            if len(pending[key]) == n_experts:
                parts = pending.pop(key)
                yield key, np.stack([parts[i] for i in range(n_experts)])
        elif name.endswith(("experts.gate_up_proj", "experts.gate_up_proj.weight")):
            base = name.removesuffix(".weight").removesuffix(".gate_up_proj")
            half = data.shape[-2] // 2
            yield f"{base}.gate_proj.weight", np.ascontiguousarray(data[..., :half, :])
            yield f"{base}.up_proj.weight", np.ascontiguousarray(data[..., half:, :])
        elif name.endswith(("experts.down_proj", "experts.down_proj.weight")):
            yield name.removesuffix(".weight") + ".weight", data
        else:
            yield name, data
    if pending:
        raise ExportError(f"{model_dir}: incomplete experts for {min(pending)} (expected {n_experts})")


def gguf_tensors(model_dir: Path, cfg: dict, arch_name: str):
    """(GGUF name, float32 array) as llama.cpp stores them: renamed, q/k rows permuted for Llama, plus
    Llama-3.1's rope_freqs, Gemma's norms shifted by one, MoE experts stacked. A generator, in a fixed
    order: the writer's two passes and the check each stream the weights once."""
    import re

    import gguf

    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    name_map = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    source = _stacked_experts(model_dir, cfg, arch_name) if _is_moe(cfg, arch_name) else _tensors(model_dir)
    if arch_name in DELTA_NET:
        source = _delta_net_tensors(source, cfg, arch_name)
    if arch_name in MAMBA2:
        source = _mamba2_tensors(source, cfg, arch_name)
    if arch_name in MLA:
        source = _mla_tensors(source, cfg)
    if arch_name in FAMILY_TENSORS:
        source = FAMILY_TENSORS[arch_name](source, cfg)
    tied = cfg.get("tie_word_embeddings", arch_name in NORM_PLUS_ONE)
    mtp = re.compile(r"model\.layers\.(\d+)\.")  # layers past num_hidden_layers: multi-token prediction
    for hf_name, data in source:
        if hf_name.endswith(".rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        if (m := mtp.match(hf_name)) and int(m.group(1)) >= cfg["num_hidden_layers"]:
            continue  # transformers drops them too; llama.cpp runs without them
        if hf_name.startswith("model.mtp_"):  # ERNIE 4.5's multi-token-prediction block, dropped as transformers does
            continue
        hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")  # the router's selection bias
        hf_name = hf_name + ".bias" if hf_name.endswith(".expert_bias") else hf_name  # LFM2-MoE's selection bias
        if arch_name == "GEMMA4":
            new = _gemma4_tensor_name(hf_name, name_map)
        else:
            new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:  # llama.cpp's converter names LFM2-MoE's stacked experts without the "model." prefix
            new = name_map.get_name(hf_name.removeprefix("model."), try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"{model_dir}: tensor {hf_name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
        if arch_name in PERMUTED:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute(data, n_head, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute(data, n_head, n_kv)
        if arch_name in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            data = data + 1.0
        if new.endswith("exp_probs_b.bias"):  # ERNIE's is (1, n_expert); the converter squeezes it
            data = data.reshape(-1)
        if arch_name in SHORTCONV and hf_name.endswith("conv.conv.weight"):  # depthwise (C, 1, L): ggml's is (C, L)
            data = np.ascontiguousarray(data.squeeze(1))
        yield new, data
    rope = _rope_scaling(cfg)
    if arch_name in ("LLAMA", "LLAMA4") and rope["rope_type"] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(cfg, rope)
    if arch_name == "GEMMA4":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _gemma4_rope_factors(cfg)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (qtype, numpy shape, raw bytes view)}) of a GGUF file, parsed per the GGUF spec.
    gguf.GGUFReader builds one numpy view per array item, which takes ~20 s on a 150k-token vocab; this reads
    the same header in well under a second and maps the tensor data."""
    import struct

    import gguf

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from(fmt, mv, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return bytes(mv[pos - n : pos]).decode("utf-8", errors="surrogateescape")

    def value(vtype):
        if vtype == 8:
            return string()
        if vtype == 9:
            item, count = take("<I"), take("<Q")
            if item in _SCALARS:
                nonlocal pos
                dtype = np.dtype(_SCALARS[item])
                arr = np.frombuffer(mv, dtype=dtype, count=count, offset=pos)
                pos += dtype.itemsize * count
                return arr.tolist()
            return [value(item) for _ in range(count)]
        return take(_SCALARS[vtype])

    if bytes(mv[:4]) != b"GGUF":
        raise ExportError(f"{path}: not a GGUF file")
    pos = 4
    _version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, dims, gguf.GGMLQuantizationType(take("<I")), take("<Q")))
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims)) // block * size
        tensors[name] = (qtype, tuple(reversed(dims)), buf[start + offset : start + offset + nbytes])
    return meta, tensors


def decode(qtype, shape, raw) -> np.ndarray:
    """One tensor of read_gguf as float32 in the source's (numpy) shape."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.frombuffer(raw, dtype=np.float32).reshape(shape)
    if qtype == Q.F16:
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32).reshape(shape)
    rows = np.asarray(raw).reshape(*shape[:-1], -1)
    return gguf.quants.dequantize(rows, qtype).reshape(shape)


def verify(path: Path, expected, outtype: str, tokens: list[str], chat_template, arch: str) -> float:
    """Read `path` back: the same tensor names, shapes, values within the outtype's tolerance, and metadata."""
    import gguf

    meta, got = read_gguf(path)
    seen, worst = set(), 0.0
    for name, want in expected:
        if name not in got:
            raise ExportError(f"{path}: tensor {name} did not read back")
        seen.add(name)
        back = decode(*got[name])
        if back.shape != want.shape:
            raise ExportError(f"{path}: {name}: shape {back.shape} read back, {want.shape} written")
        scale = float(np.abs(want).max()) or 1.0
        rel = float(np.abs(back - want).max()) / scale
        worst = max(worst, rel)
        if not rel <= TOLERANCE[outtype] * 1.01:
            raise ExportError(f"{path}: {name}: read back differs by {rel:.3g} of max |w| (> {TOLERANCE[outtype]:g})")
    if set(got) != seen:
        raise ExportError(f"{path}: unexpected tensors read back: {sorted(set(got) - seen)[:3]}")
    if meta.get(gguf.Keys.General.ARCHITECTURE) != gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)]:
        raise ExportError(f"{path}: general.architecture did not read back")
    if meta.get(gguf.Keys.Tokenizer.LIST) != tokens:
        raise ExportError(f"{path}: tokenizer.ggml.tokens did not read back equal")
    if chat_template and meta.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE) != chat_template:
        raise ExportError(f"{path}: tokenizer.chat_template did not read back equal")
    return worst
