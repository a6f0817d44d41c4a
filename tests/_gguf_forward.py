"""A numpy forward pass of a GGUF computed from the file alone, the way llama.cpp's graphs for the exported
architectures compute (llama, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3, seed_oss, olmo2, ernie4_5, smollm3,
glm4moe, llama4, lfm2, ernie4_5-moe, minimax-m2, lfm2moe, qwen3next, qwen35, qwen35moe, deepseek2, kimi-linear,
mistral3, granite, glm4, and gemma4, granitehybrid, falcon-h1 and gpt-oss in their own functions): their RoPE layouts
(YaRN as ggml computes it), Llama 4's query temperature from attention.temperature_scale, Granite's embedding,
residual, attention and logit scales, Gemma's embedding and attention scales, soft-capping, sliding-window
layouts, pre- and post-norms, q/k norms (per head, or over the whole projection as OLMo 2's and MiniMax-M2's),
NoPE layers, top-k MoE routing (softmax or sigmoid, with a selection bias; expert inputs or outputs weighted;
shared experts, gated or not; leading dense and interleaved MoE layers as the file's keys lay them out), gated
delta-net layers, Mamba-2 layers (Granite 4, Falcon-H1), multi-head latent attention and KDA, and Phi-3's fused
projections. Used to show an exported file computes what transformers computes."""

from __future__ import annotations

import gguf
import numpy as np

from finetune import gguf_export

# llama.cpp's LLAMA_ROPE_TYPE_NEOX archs
NEOX = {"qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3", "seed_oss", "olmo2", "glm4moe", "lfm2"}
NEOX |= {"minimax-m2", "lfm2moe"}
# llama.cpp's LLAMA_ROPE_TYPE_MROPE archs: on text tokens (all position components equal) M-RoPE is NEOX RoPE
NEOX |= {"qwen2vl"}
# llama.cpp's sliding-window periods when attention.sliding_window_pattern is absent: layer il is local
# unless il % n == n-1
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "olmo2": 4}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp scales the 27B's scores by 1/sqrt(hidden/heads)
NOPE_STEP = {"smollm3": 4, "llama4": 4}  # llama.cpp's graph skips RoPE on layer il when (il + 1) % n == 0
# gated delta-net hybrids; qwen35's graph repeats key heads tiled over the value heads, qwen3next's interleaved
DELTA_NET = {"qwen3next", "qwen35", "qwen35moe"}
TILED_HEADS = {"qwen35", "qwen35moe"}
# Mamba-2 hybrids: Mamba-2 layers between attention layers (granitehybrid) or beside attention in each (falcon-h1)
MAMBA2 = {"granitehybrid", "falcon-h1"}


def read(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: gguf_export._decode(t) for t in reader.tensors}
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return tensors, meta, {t.name: t.tensor_type for t in reader.tensors}


def rope(x, pos, base, neox, n_rot=None, scale=1.0, freq_factors=None, yarn=None):
    """x: (T, heads, d). NORM rotates adjacent pairs (x0, x1), NEOX rotates (x_i, x_{i+n_rot/2}); only the
    first n_rot dims rotate; positions are multiplied by `scale` (linear rope scaling), each frequency divided
    by its factor in rope_freqs (Llama-3.1-style scaling); `yarn` (yarn_params) mixes interpolated and
    extrapolated angles and scales cos/sin."""
    d = x.shape[-1]
    n_rot = n_rot or d
    theta = (pos * scale)[:, None] * base ** (-np.arange(0, n_rot, 2) / n_rot)
    if freq_factors is not None:
        theta = theta / freq_factors
    mscale = 1.0
    if yarn is not None:
        theta, mscale = yarn_theta(theta, base, n_rot, yarn), yarn["mscale"]
    cos, sin = mscale * np.cos(theta)[:, None, :], mscale * np.sin(theta)[:, None, :]
    r = x[..., :n_rot]
    a, b = (r[..., : n_rot // 2], r[..., n_rot // 2 :]) if neox else (r[..., 0::2], r[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = x.copy()
    if neox:
        out[..., : n_rot // 2], out[..., n_rot // 2 : n_rot] = ra, rb
    else:
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = ra, rb
    return out


def gguf_forward(path, ids):
    t, meta, _ = read(path)
    arch = meta["general.architecture"]
    if arch == "gemma4":
        return gemma4_forward(t, meta, ids)
    if arch in MAMBA2:
        return mamba2_hybrid_forward(t, meta, ids)
    if arch == "gpt-oss":
        return gpt_oss_forward(t, meta, ids)

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    n_head, n_kv, eps = (
        key("attention.head_count"),
        key("attention.head_count_kv"),
        key("attention.layer_norm_rms_epsilon"),
    )
    base, base_swa = key("rope.freq_base", 10000.0), key("rope.freq_base_swa", key("rope.freq_base", 10000.0))
    scale = 1.0 / key("rope.scaling.factor", 1.0) if key("rope.scaling.type") == "linear" else 1.0
    yarn = yarn_params(key)
    window, attn_cap, final_cap = (
        key("attention.sliding_window", 0),
        key("attn_logit_softcapping"),
        key("final_logit_softcapping"),
    )
    gemma = arch.startswith("gemma")
    period = key("attention.sliding_window_pattern", SWA_PATTERN.get(arch))

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def act(g):
        if gemma:  # GELU, tanh approximation
            return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
        return g / (1 + np.exp(-g))

    x = t["token_embd.weight"][ids].astype(np.float64)
    if gemma:
        x = x * np.sqrt(x.shape[-1])
    x = x * key("embedding_scale", 1.0)  # granite
    residual_scale = key("residual_scale", 1.0)  # granite: each branch's output, before the residual add
    T, pos = len(ids), np.arange(len(ids), dtype=np.float64)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    local = causal + np.where(pos[:, None] - pos[None, :] >= (window or T + 1), -np.inf, 0.0)
    for i in range(key("block_count")):
        p = f"blk.{i}."
        swa = arch in SWA_PATTERN and window and i % period < period - 1
        h = norm(x, t[p + "attn_norm.weight"]) if p + "attn_norm.weight" in t else x  # olmo2: post-norms only
        kv = n_kv[i] if isinstance(n_kv, list) else n_kv  # lfm2: per layer, 0 on its convolution layers
        if arch in DELTA_NET:
            recurrent = (i + 1) % key("full_attention_interval", 4) != 0  # llama.cpp's layout, from the key
            a = (gated_delta_net if recurrent else gated_attention)(t, p, h, key, arch)
        elif p + "attn_kv_a_mqa.weight" in t:  # deepseek2, kimi-linear: multi-head latent attention
            a = mla_attention(t, p, h, key, pos, rotate=arch != "kimi-linear")  # kimi-linear: no RoPE
        elif p + "ssm_f_a.weight" in t:  # kimi-linear: KDA linear attention
            a = kimi_delta_attention(t, p, h, key)
        elif p + "shortconv.conv.weight" in t:  # lfm2: gated short convolution, causal over the time axis
            b, c, xx = np.split(lin(h, p + "shortconv.in_proj"), 3, axis=-1)
            w = t[p + "shortconv.conv.weight"]  # (channels, L)
            bx = np.concatenate([np.zeros((w.shape[1] - 1, b.shape[1])), b * xx])
            conv = sum(bx[j : j + T] * w[:, j] for j in range(w.shape[1]))
            a = lin(c * conv, p + "shortconv.out_proj")
        else:
            if p + "attn_qkv.weight" in t:
                qkv = lin(h, p + "attn_qkv")
                d = qkv.shape[-1] // (n_head + 2 * kv)
                q, k, v = np.split(qkv, [n_head * d, (n_head + kv) * d], axis=-1)
            else:
                q, k, v = lin(h, p + "attn_q"), lin(h, p + "attn_k"), lin(h, p + "attn_v")
            d = key("attention.key_length") or q.shape[-1] // n_head
            qk_norm = p + "attn_q_norm.weight" in t
            if qk_norm and t[p + "attn_q_norm.weight"].shape[-1] == q.shape[-1]:  # olmo2: over the projection
                q, k, qk_norm = norm(q, t[p + "attn_q_norm.weight"]), norm(k, t[p + "attn_k_norm.weight"]), False
            q, k, v = q.reshape(T, n_head, d), k.reshape(T, kv, d), v.reshape(T, kv, d)
            if qk_norm:
                q, k = norm(q, t[p + "attn_q_norm.weight"]), norm(k, t[p + "attn_k_norm.weight"])
            n_rot = key("rope.dimension_count", d)
            layer_base, layer_scale = (base_swa, 1.0) if swa else (base, scale)
            # llama4 with attention.sliding_window 0 (no chunked layers) ropes every layer
            use_rope = arch not in NOPE_STEP or (i + 1) % NOPE_STEP[arch] != 0 or key("attention.sliding_window") == 0
            if use_rope:
                factors = t.get("rope_freqs.weight")
                q = rope(q, pos, layer_base, arch in NEOX, n_rot, layer_scale, factors, yarn)
                k = rope(k, pos, layer_base, arch in NEOX, n_rot, layer_scale, factors, yarn)
                q = q * attn_temperature(key, pos)[:, None, None]
                if arch == "llama4" and key("expert_count") != 128:  # weightless RMS (L2) norm after RoPE
                    q, k = norm(q, 1.0), norm(k, 1.0)
            # (llama4's temperature tuning of NoPE layers' queries starts at position 8192: a no-op here)
            k, v = np.repeat(k, n_head // kv, axis=1), np.repeat(v, n_head // kv, axis=1)
            scale_dim = d
            if gemma and key("block_count") == GEMMA_27B_LAYERS[arch]:
                scale_dim = key("embedding_length") // n_head
            s = np.einsum("qhd,khd->hqk", q, k) * key("attention.scale", 1 / np.sqrt(scale_dim))  # granite: the key
            if attn_cap:
                s = np.tanh(s / attn_cap) * attn_cap
            s = s + (local if swa or (window and arch == "phi3") else causal)
            s = np.exp(s - s.max(-1, keepdims=True))
            a = lin(np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(T, -1), p + "attn_output")
        # seed_oss's pre-FFN norm is named post_attention_norm; gemma and olmo2 norm the attention output with it
        has = {n for n in ("attn_norm", "ffn_norm", "post_attention_norm") if f"{p}{n}.weight" in t}
        pre_ffn = "post_attention_norm" if has == {"attn_norm", "post_attention_norm"} else "ffn_norm"
        if pre_ffn != "post_attention_norm" and "post_attention_norm" in has:
            a = norm(a, t[p + "post_attention_norm.weight"])
        x = x + a * residual_scale
        h = norm(x, t[f"{p}{pre_ffn}.weight"]) if f"{p}{pre_ffn}.weight" in t else x
        moe_layer(key, i, p + "ffn_gate_inp.weight" in t)
        if p + "ffn_gate_inp.weight" in t:  # top-k experts: softmax router, or sigmoid with a selection bias
            logits = lin(h, p + "ffn_gate_inp")
            if arch == "llama4" or key("expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID:
                probs = 1 / (1 + np.exp(-logits))
            else:
                probs = np.exp(logits - logits.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
            choice = probs + t.get(p + "exp_probs_b.bias", 0.0)  # the bias picks the experts, not their weights
            choice = best_groups(choice, key)  # limited to the best expert groups where the file names groups
            top = np.argsort(-choice, axis=-1)[:, : key("expert_used_count")]
            f = np.zeros_like(h)
            for row in range(T):
                w = probs[row, top[row]]
                if key("expert_weights_norm", arch != "llama4"):
                    w = w / w.sum()
                for e, we in zip(top[row], w * key("expert_weights_scale", 1.0)):
                    # llama4 weights each expert's input; the others its output (differs: SiLU is not linear)
                    x_in, w_out = (we * h[row], 1.0) if arch == "llama4" else (h[row], we)
                    g = t[p + "ffn_gate_exps.weight"][e] @ x_in
                    u = t[p + "ffn_up_exps.weight"][e] @ x_in
                    f[row] += w_out * (t[p + "ffn_down_exps.weight"][e] @ (act(g) * u))
            if p + "ffn_gate_shexp.weight" in t and shared_experts(arch, key):  # shared experts, on every token
                shared = lin(act(lin(h, p + "ffn_gate_shexp")) * lin(h, p + "ffn_up_shexp"), p + "ffn_down_shexp")
                if p + "ffn_gate_inp_shexp.weight" in t:  # qwen3next / qwen35moe: a sigmoid gate per token
                    shared = shared / (1 + np.exp(-lin(h, p + "ffn_gate_inp_shexp")))
                f += shared
        elif p + "ffn_gate.weight" in t:
            f = lin(act(lin(h, p + "ffn_gate")) * lin(h, p + "ffn_up"), p + "ffn_down")
        else:  # phi3: ffn_up holds gate and up, in that order
            g, u = np.split(lin(h, p + "ffn_up"), 2, axis=-1)
            f = lin(act(g) * u, p + "ffn_down")
        if p + "post_ffw_norm.weight" in t:
            f = norm(f, t[p + "post_ffw_norm.weight"])
        x = x + f * residual_scale
    out = t["output.weight"] if "output.weight" in t else t["token_embd.weight"]
    final_norm = t.get("output_norm.weight", t.get("token_embd_norm.weight"))  # lfm2 names it token_embd_norm
    logits = norm(x, final_norm) @ out.T / key("logit_scale", 1.0)  # granite divides by its logit scale
    if final_cap:
        logits = np.tanh(logits / final_cap) * final_cap
    return logits


def moe_layer(key, i, has_experts):
    """Where the file says how its layers are laid out (leading dense layers, then experts every n-th layer),
    llama.cpp's loader expects the experts' tensors exactly there."""
    lead, step = key("leading_dense_block_count"), key("interleave_moe_layer_step")
    if lead is not None or step is not None:
        want = i >= (lead or 0) and (i + 1) % (step or 1) == 0
        assert has_experts == want, f"layer {i}: experts {has_experts}, llama.cpp expects {want}"


def shared_experts(arch, key):
    """ernie4_5-moe runs its shared experts only when expert_shared_feed_forward_length is written and > 0."""
    return arch != "ernie4_5-moe" or key("expert_shared_feed_forward_length", 0) > 0


def gelu(g):
    """GELU, tanh approximation (ggml_gelu; transformers' gelu_pytorch_tanh)."""
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))


def gemma4_forward(t, meta, ids):
    """llama.cpp's gemma4 graph (src/models/gemma4.cpp): per layer kind a head dim, kv head count, rotary
    width and rope base; rope_freqs on global layers only; q/k norms, v RMS-normed without weight, attention
    scale 1; the last attention.shared_kv_layers layers reuse the keys and values of the last unshared layer
    (global) or the one before (sliding); v = the raw k projection where there is no attn_v; per-layer
    embeddings (a token table plus a projection of the embedding, normed, mixed) gating a residual branch
    after each layer's FFN; a dense FFN beside routed experts (router on the RMS-normed residual times its
    scale / sqrt(n_embd), softmax top-k renormalised, each expert's output times its per-expert scale),
    each branch post-normed; each layer's output times its scalar; final soft-capping."""

    def key(name, default=None):
        return meta.get(f"gemma4.{name}", default)

    n_layer, n_embd, n_head = key("block_count"), key("embedding_length"), key("attention.head_count")
    eps, window = key("attention.layer_norm_rms_epsilon"), key("attention.sliding_window")
    n_kv = key("attention.head_count_kv")
    n_kv = n_kv if isinstance(n_kv, list) else [n_kv] * n_layer
    swa_layers = key("attention.sliding_window_pattern")
    kv_from = n_layer - key("attention.shared_kv_layers", 0)
    n_pl = key("embedding_length_per_layer_input", 0)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def lin(x, name):
        return x @ t[name + ".weight"].T

    def ffn(h, p):
        return lin(gelu(lin(h, p + "ffn_gate")) * lin(h, p + "ffn_up"), p + "ffn_down")

    x = t["token_embd.weight"][ids].astype(np.float64) * np.sqrt(n_embd)
    T, pos = len(ids), np.arange(len(ids), dtype=np.float64)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    local = causal + np.where(pos[:, None] - pos[None, :] >= window, -np.inf, 0.0)
    if n_pl:  # per-layer inputs: (T, n_layer, n_pl)
        per_tok = t["per_layer_token_embd.weight"][ids].reshape(T, n_layer, n_pl) * np.sqrt(n_pl)
        proj = (lin(x, "per_layer_model_proj") / np.sqrt(n_embd)).reshape(T, n_layer, n_pl)
        per_layer = (norm(proj, t["per_layer_proj_norm.weight"]) + per_tok) / np.sqrt(2)
    kv_cache = {}
    for il in range(n_layer):
        p, swa = f"blk.{il}.", swa_layers[il]
        d = key("attention.key_length_swa") if swa else key("attention.key_length")
        n_rot = key("rope.dimension_count_swa") if swa else key("rope.dimension_count")
        base = key("rope.freq_base_swa") if swa else key("rope.freq_base")
        factors = None if swa else t["rope_freqs.weight"]
        h = norm(x, t[p + "attn_norm.weight"])
        q = norm(lin(h, p + "attn_q").reshape(T, n_head, d), t[p + "attn_q_norm.weight"])
        q = rope(q, pos, base, True, n_rot, 1.0, factors)
        if il < kv_from:
            k = lin(h, p + "attn_k").reshape(T, n_kv[il], d)
            v = lin(h, p + "attn_v").reshape(T, n_kv[il], d) if p + "attn_v.weight" in t else k
            k = rope(norm(k, t[p + "attn_k_norm.weight"]), pos, base, True, n_rot, 1.0, factors)
            kv_cache[il] = k, norm(v, 1.0)
        k, v = kv_cache[il if il < kv_from else kv_from - (2 if swa else 1)]
        rep = n_head // k.shape[1]
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) + (local if swa else causal)  # attention scale 1
        s = np.exp(s - s.max(-1, keepdims=True))
        a = lin(np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(T, -1), p + "attn_output")
        x = x + norm(a, t[p + "post_attention_norm.weight"])
        f = ffn(norm(x, t[p + "ffn_norm.weight"]), p)
        if p + "ffn_gate_inp.weight" in t:
            f = norm(f, t[p + "post_ffw_norm_1.weight"])
            router_in = norm(x, 1.0) / np.sqrt(n_embd) * t[p + "ffn_gate_inp.scale"]
            logits = lin(router_in, p + "ffn_gate_inp")
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            top = np.argsort(-probs, axis=-1)[:, : key("expert_used_count")]
            h2, moe = norm(x, t[p + "pre_ffw_norm_2.weight"]), np.zeros_like(x)
            for row in range(T):
                w = probs[row, top[row]] / probs[row, top[row]].sum()
                for e, we in zip(top[row], w):
                    g, u = np.split(t[p + "ffn_gate_up_exps.weight"][e] @ h2[row], 2)  # gate first
                    out = t[p + "ffn_down_exps.weight"][e] @ (gelu(g) * u)
                    moe[row] += we * out * t[p + "ffn_down_exps.scale"][e]
            f = f + norm(moe, t[p + "post_ffw_norm_2.weight"])
        x = x + norm(f, t[p + "post_ffw_norm.weight"])
        if n_pl:
            g = gelu(lin(x, p + "inp_gate")) * per_layer[:, il]
            x = x + norm(lin(g, p + "proj"), t[p + "post_norm.weight"])
        if p + "layer_output_scale.weight" in t:
            x = x * t[p + "layer_output_scale.weight"]
    out = t["output.weight"] if "output.weight" in t else t["token_embd.weight"]
    logits = norm(x, t["output_norm.weight"]) @ out.T
    if cap := key("final_logit_softcapping"):
        logits = np.tanh(logits / cap) * cap
    return logits


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def gated_attention(t, p, h, key, arch):
    """qwen3next / qwen35 full attention: attn_q yields per head [query, gate]; per-head q/k norms, RoPE on the
    first rope.dimension_count dims (NEOX; qwen35's interleaved M-RoPE, whose text positions are the same in
    its t, h and w sections and 0 in the 4th), and the output multiplied by sigmoid(gate) before attn_output."""
    n_head, n_kv, eps = (
        key("attention.head_count"),
        key("attention.head_count_kv"),
        key("attention.layer_norm_rms_epsilon"),
    )
    d, T = key("attention.key_length"), h.shape[0]
    qg = (h @ t[p + "attn_q.weight"].T).reshape(T, n_head, 2 * d)
    q, gate = qg[..., :d], qg[..., d:].reshape(T, -1)
    k = (h @ t[p + "attn_k.weight"].T).reshape(T, n_kv, d)
    v = (h @ t[p + "attn_v.weight"].T).reshape(T, n_kv, d)
    q, k = _rms(q, t[p + "attn_q_norm.weight"], eps), _rms(k, t[p + "attn_k_norm.weight"], eps)
    n_rot, base, pos = key("rope.dimension_count"), key("rope.freq_base", 10000.0), np.arange(T, dtype=np.float64)
    if arch in TILED_HEADS:
        q, k = (
            imrope(q, pos, base, n_rot, key("rope.dimension_sections")),
            imrope(k, pos, base, n_rot, key("rope.dimension_sections")),
        )
    else:
        q, k = rope(q, pos, base, True, n_rot), rope(k, pos, base, True, n_rot)
    k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + np.triu(np.full((T, T), -np.inf), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(T, -1)
    return (o / (1 + np.exp(-gate))) @ t[p + "attn_output.weight"].T


def imrope(x, pos, base, n_rot, sections):
    """ggml's interleaved M-RoPE (NEOX pairs) for text tokens: pair i rotates by the position of section
    i % 3 when i % sum(sections) < 3 * sections[i % 3] (the same position in t, h and w), else by the 4th
    section's position, 0 for text."""
    total = sum(sections)
    pairs = np.arange(n_rot // 2)
    sector = pairs % total
    in_thw = sector < 3 * np.asarray(sections[:3])[sector % 3]
    theta = np.where(in_thw[None, :], pos[:, None], 0.0) * base ** (-2 * pairs / n_rot)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    a, b = x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot]
    out = x.copy()
    out[..., : n_rot // 2], out[..., n_rot // 2 : n_rot] = a * cos - b * sin, a * sin + b * cos
    return out


def gated_delta_net(t, p, h, key, arch):
    """qwen3next / qwen35 linear attention as llama.cpp's graph computes it, with the gated delta rule as a
    plain per-token recurrence: attn_qkv -> causal depthwise conv (ssm_conv1d) -> SiLU -> q, k, v; q and k
    L2-normed (x / max(|x|, eps)), repeated over the value heads (qwen3next interleaved, qwen35 tiled), q scaled
    by 1/sqrt(head dim); beta = sigmoid(b), decay g = softplus(alpha + ssm_dt) * ssm_a (ssm_a = -exp(A_log));
    per head S <- S*exp(g); S <- S + k (beta (v - S^T k))^T; o = S^T q; then RMSNorm(o) * SiLU(z) -> ssm_out.
    qwen3next's ssm_ba holds per key head [beta (r), alpha (r)]; qwen35's ssm_beta / ssm_alpha are separate."""
    eps, T = key("attention.layer_norm_rms_epsilon"), h.shape[0]
    dk, n_k, n_v = key("ssm.state_size"), key("ssm.group_count"), key("ssm.time_step_rank")
    dv, r = key("ssm.inner_size") // n_v, n_v // n_k
    qkv, z = h @ t[p + "attn_qkv.weight"].T, (h @ t[p + "attn_gate.weight"].T).reshape(T, n_v, dv)
    if p + "ssm_ba.weight" in t:
        ba = (h @ t[p + "ssm_ba.weight"].T).reshape(T, n_k, 2 * r)
        b, alpha = ba[..., :r].reshape(T, n_v), ba[..., r:].reshape(T, n_v)
    else:
        b, alpha = h @ t[p + "ssm_beta.weight"].T, h @ t[p + "ssm_alpha.weight"].T
    beta = 1 / (1 + np.exp(-b))
    g = np.logaddexp(0.0, alpha + t[p + "ssm_dt.bias"]) * t[p + "ssm_a"]
    w = t[p + "ssm_conv1d.weight"]  # (channels, kernel)
    padded = np.concatenate([np.zeros((w.shape[1] - 1, qkv.shape[1])), qkv])
    conv = sum(padded[j : j + T] * w[:, j] for j in range(w.shape[1]))
    conv = conv / (1 + np.exp(-conv))
    q, k, v = np.split(conv, [n_k * dk, 2 * n_k * dk], axis=-1)
    q, k, v = q.reshape(T, n_k, dk), k.reshape(T, n_k, dk), v.reshape(T, n_v, dv)
    q = q / np.maximum(np.sqrt((q * q).sum(-1, keepdims=True)), eps)
    k = k / np.maximum(np.sqrt((k * k).sum(-1, keepdims=True)), eps)
    repeat = (lambda x: np.tile(x, (1, r, 1))) if arch in TILED_HEADS else (lambda x: np.repeat(x, r, axis=1))
    q, k = repeat(q) / np.sqrt(dk), repeat(k)
    state, out = np.zeros((n_v, dk, dv)), np.zeros((T, n_v, dv))
    for i in range(T):
        state = state * np.exp(g[i])[:, None, None]
        delta = (v[i] - np.einsum("hkv,hk->hv", state, k[i])) * beta[i][:, None]
        state = state + k[i][:, :, None] * delta[:, None, :]
        out[i] = np.einsum("hkv,hk->hv", state, q[i])
    out = _rms(out, t[p + "ssm_norm.weight"], eps) * (z / (1 + np.exp(-z)))
    return out.reshape(T, -1) @ t[p + "ssm_out.weight"].T


def mamba2_hybrid_forward(t, meta, ids):
    """llama.cpp's granitehybrid and falcon-h1 graphs (src/models/granite-hybrid.cpp, falcon-h1.cpp).
    granitehybrid: each layer Mamba-2 (head_count_kv 0) or attention (RoPE only when rope.scaling.finetuned, scores
    scaled by attention.scale), then a dense MLP or softmax top-k experts (renormalised) plus shared experts;
    embedding, residual (both branches) and logit scales from the file. falcon-h1: attention (NEOX RoPE) and
    Mamba-2 side by side on the same normed input, summed into the residual, then the MLP; its multipliers are in
    the weights."""
    arch = meta["general.architecture"]

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    n_layer, eps = key("block_count"), key("attention.layer_norm_rms_epsilon")
    n_kv = key("attention.head_count_kv")
    n_kv = n_kv if isinstance(n_kv, list) else [n_kv] * n_layer
    residual_scale = key("residual_scale") or 1.0

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def silu(g):
        return g / (1 + np.exp(-g))

    x = t["token_embd.weight"][ids].astype(np.float64) * (key("embedding_scale") or 1.0)
    T, pos = len(ids), np.arange(len(ids), dtype=np.float64)
    for il in range(n_layer):
        p = f"blk.{il}."
        h = _rms(x, t[p + "attn_norm.weight"], eps)
        if arch == "falcon-h1":  # both mixers on the same input
            a = _attention(t, p, h, key, n_kv[il], pos, rope_neox=True) + mamba2(t, p, h, key)
        elif n_kv[il] == 0:
            a = mamba2(t, p, h, key)
        else:
            a = _attention(t, p, h, key, n_kv[il], pos, rope_neox=None if not key("rope.scaling.finetuned") else False)
        x = x + a * residual_scale
        # falcon-h1's is named without .weight (its converter maps the full HF name; its loader asks for no suffix)
        h = _rms(x, t[p + "ffn_norm.weight"] if p + "ffn_norm.weight" in t else t[p + "ffn_norm"], eps)
        if p + "ffn_gate_inp.weight" in t:  # softmax over all experts, top-k, renormalised
            logits = h @ t[p + "ffn_gate_inp.weight"].T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            top = np.argsort(-probs, axis=-1)[:, : key("expert_used_count")]
            f = np.zeros_like(h)
            for row in range(T):
                w = probs[row, top[row]] / probs[row, top[row]].sum()
                for e, we in zip(top[row], w):
                    g, u = t[p + "ffn_gate_exps.weight"][e] @ h[row], t[p + "ffn_up_exps.weight"][e] @ h[row]
                    f[row] += we * (t[p + "ffn_down_exps.weight"][e] @ (silu(g) * u))
            if key("expert_shared_feed_forward_length", 0) > 0:
                f += lin(silu(lin(h, p + "ffn_gate_shexp")) * lin(h, p + "ffn_up_shexp"), p + "ffn_down_shexp")
        else:
            f = lin(silu(lin(h, p + "ffn_gate")) * lin(h, p + "ffn_up"), p + "ffn_down")
        x = x + f * residual_scale
    out = t["output.weight"] if "output.weight" in t else t["token_embd.weight"]
    return _rms(x, t["output_norm.weight"], eps) @ out.T / (key("logit_scale") or 1.0)


def _attention(t, p, h, key, kv, pos, rope_neox):
    """Causal attention with optional biases; RoPE over rope.dimension_count dims (NEOX or NORM pairs; None: no
    RoPE); scores scaled by attention.scale, or 1/sqrt(head dim) where the file has none."""
    n_head, T = key("attention.head_count"), h.shape[0]

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    q, k, v = lin(h, p + "attn_q"), lin(h, p + "attn_k"), lin(h, p + "attn_v")
    d = key("attention.key_length") or q.shape[-1] // n_head
    q, k, v = q.reshape(T, n_head, d), k.reshape(T, kv, d), v.reshape(T, kv, d)
    if rope_neox is not None:
        base, n_rot = key("rope.freq_base", 10000.0), key("rope.dimension_count", d)
        q, k = rope(q, pos, base, rope_neox, n_rot), rope(k, pos, base, rope_neox, n_rot)
    k, v = np.repeat(k, n_head // kv, axis=1), np.repeat(v, n_head // kv, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) * (key("attention.scale") or 1 / np.sqrt(d)) + np.triu(
        np.full((T, T), -np.inf), 1
    )
    s = np.exp(s - s.max(-1, keepdims=True))
    return lin(np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(T, -1), p + "attn_output")


def mamba2(t, p, h, key):
    """llama.cpp's build_mamba2_layer, the scan as a plain per-token recurrence: ssm_in -> [z, xBC, dt]; xBC
    through the causal depthwise conv (ssm_conv1d, + its bias) and SiLU -> x (heads x head_dim), B and C (groups x
    state, head h reading group h // (heads / groups)); dt = softplus(dt + ssm_dt.bias) (ggml: identity above 20);
    per head S <- S exp(dt A) + dt x B^T, y = S C; y + D x; y * SiLU(z); RMSNorm over each group (ssm_norm, when
    present); ssm_out."""
    eps, T = key("attention.layer_norm_rms_epsilon"), h.shape[0]
    d_inner, d_state = key("ssm.inner_size"), key("ssm.state_size")
    n_head, n_group = key("ssm.time_step_rank"), key("ssm.group_count")
    head_dim, n_bc = d_inner // n_head, n_group * d_state
    z, xbc, dt = np.split(h @ t[p + "ssm_in.weight"].T, [d_inner, 2 * d_inner + 2 * n_bc], axis=-1)
    w = t[p + "ssm_conv1d.weight"]  # (channels, kernel)
    padded = np.concatenate([np.zeros((w.shape[1] - 1, xbc.shape[1])), xbc])
    conv = sum(padded[j : j + T] * w[:, j] for j in range(w.shape[1])) + t.get(p + "ssm_conv1d.bias", 0.0)
    conv = conv / (1 + np.exp(-conv))
    x, b, c = np.split(conv, [d_inner, d_inner + n_bc], axis=-1)
    x = x.reshape(T, n_head, head_dim)
    group = np.arange(n_head) // (n_head // n_group)
    b, c = b.reshape(T, n_group, d_state)[:, group], c.reshape(T, n_group, d_state)[:, group]
    dt = dt + t[p + "ssm_dt.bias"]
    dt = np.where(dt <= 20.0, np.log1p(np.exp(np.minimum(dt, 20.0))), dt)
    a = t[p + "ssm_a"].reshape(-1)
    state, y = np.zeros((n_head, head_dim, d_state)), np.zeros((T, n_head, head_dim))
    for i in range(T):
        state = state * np.exp(dt[i] * a)[:, None, None] + (x[i] * dt[i][:, None])[:, :, None] * b[i][:, None, :]
        y[i] = np.einsum("hps,hs->hp", state, c[i])
    y = (y + x * t[p + "ssm_d"].reshape(-1)[None, :, None]).reshape(T, d_inner) * (z / (1 + np.exp(-z)))
    if p + "ssm_norm.weight" in t:
        norm = t[p + "ssm_norm.weight"]  # (groups, inner / groups)
        y = _rms(y.reshape(T, *norm.shape), norm, eps).reshape(T, d_inner)
    return y @ t[p + "ssm_out.weight"].T


def best_groups(choice, key):
    """llama.cpp's group-limited routing (expert_group_count > 1): experts in groups of equal size, a group scored
    by the sum of its two best selection scores, all experts outside the expert_group_used_count best groups
    masked out before the top-k."""
    n_group = key("expert_group_count", 1)
    if n_group <= 1:
        return choice
    T, n_expert = choice.shape
    groups = choice.reshape(T, n_group, n_expert // n_group)
    score = np.sort(groups, axis=-1)[..., -2:].sum(-1)
    keep = np.argsort(-score, axis=-1)[:, : key("expert_group_used_count")]
    mask = np.full((T, n_group), -np.inf)
    np.put_along_axis(mask, keep, 0.0, axis=-1)
    return (groups + mask[..., None]).reshape(T, n_expert)


def mla_attention(t, p, h, key, pos, rotate=True):
    """deepseek2's multi-head latent attention as llama.cpp computes it with the absorption: q from the low-rank
    attn_q_a -> attn_q_a_norm -> attn_q_b (or attn_q), per head [nope, rope]; attn_kv_a_mqa yields the kv latent
    (RMS-normed by attn_kv_a_norm) and one rope key shared by the heads; RoPE on adjacent pairs (NORM) over
    rope.dimension_count dims (kimi-linear: none); each head's nope query mapped into the latent by attn_k_b,
    scores against the latent plus the rope part, scaled by 1/sqrt(key_length_mla) (YaRN: frequencies mixed as
    yarn_factors, cos/sin unscaled, the scores times (1 + 0.1 mscale_all_dim ln factor)^2); the attended latent
    expanded per head by attn_v_b."""
    n_head, eps = key("attention.head_count"), key("attention.layer_norm_rms_epsilon")
    kv_lora, n_rot, d_k = key("attention.kv_lora_rank"), key("rope.dimension_count"), key("attention.key_length_mla")
    T, base = h.shape[0], key("rope.freq_base", 10000.0)
    if p + "attn_q_a.weight" in t:
        q = _rms(h @ t[p + "attn_q_a.weight"].T, t[p + "attn_q_a_norm.weight"], eps) @ t[p + "attn_q_b.weight"].T
    else:
        q = h @ t[p + "attn_q.weight"].T
    q = q.reshape(T, n_head, d_k)
    q_nope, q_pe = q[..., : d_k - n_rot], q[..., d_k - n_rot :]
    kv = h @ t[p + "attn_kv_a_mqa.weight"].T
    latent, k_pe = _rms(kv[:, :kv_lora], t[p + "attn_kv_a_norm.weight"], eps), kv[:, None, kv_lora:]
    scale, factors = 1 / np.sqrt(d_k), None
    if key("rope.scaling.type") == "yarn":
        factors = yarn_factors(n_rot, base, key("rope.scaling.factor"), key("rope.scaling.original_context_length"))
        mscale_all_dim = key("rope.scaling.yarn_log_multiplier") / 0.1  # the converter stores it x 0.1
        scale *= (1 + 0.1 * mscale_all_dim * np.log(key("rope.scaling.factor"))) ** 2
    if rotate:
        q_pe, k_pe = (rope(x, pos, base, False, freq_factors=factors) for x in (q_pe, k_pe))
    k_pe = k_pe[:, 0]
    q_latent = np.einsum("thn,hln->thl", q_nope, t[p + "attn_k_b.weight"])  # (head, kv_lora, nope)
    s = np.einsum("thl,sl->hts", q_latent, latent) + np.einsum("thr,sr->hts", q_pe, k_pe)
    s = s * scale + np.triu(np.full((T, T), -np.inf), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("hts,sl->thl", s / s.sum(-1, keepdims=True), latent)
    o = np.einsum("thl,hvl->thv", o, t[p + "attn_v_b.weight"])  # (head, v, kv_lora)
    return o.reshape(T, -1) @ t[p + "attn_output.weight"].T


def kimi_delta_attention(t, p, h, key):
    """kimi-linear's KDA layer as llama.cpp computes it, the delta rule as a plain per-token recurrence: attn_q /
    attn_k / attn_v, each through its causal depthwise convolution (ssm_conv1d_q/k/v) and SiLU; q and k L2-normed
    (x / max(|x|, eps)), q scaled by 1/sqrt(head dim); a decay per channel g = softplus(ssm_f_b(ssm_f_a(x)) + ssm_dt) *
    ssm_a (ssm_a = -exp(A_log), one per head), beta = sigmoid(ssm_beta(x)); per head S <- S * exp(g) (row-wise);
    S <- S + k (beta (v - S^T k))^T; o = S^T q; then RMSNorm(o) * sigmoid(ssm_g_b(ssm_g_a(x))) -> attn_output."""
    n_head, d, eps = key("attention.head_count"), key("kda.head_dim"), key("attention.layer_norm_rms_epsilon")
    T = h.shape[0]

    def conv(name, x):
        w = t[p + f"ssm_conv1d_{name}.weight"]  # (1, channels, 1, kernel)
        w = w.reshape(w.shape[1], w.shape[-1])
        padded = np.concatenate([np.zeros((w.shape[1] - 1, x.shape[1])), x])
        out = sum(padded[j : j + T] * w[:, j] for j in range(w.shape[1]))
        return (out / (1 + np.exp(-out))).reshape(T, n_head, d)

    q, k, v = (conv(n, h @ t[p + f"attn_{n}.weight"].T) for n in ("q", "k", "v"))
    q = q / np.maximum(np.sqrt((q * q).sum(-1, keepdims=True)), eps) / np.sqrt(d)
    k = k / np.maximum(np.sqrt((k * k).sum(-1, keepdims=True)), eps)
    f = h @ t[p + "ssm_f_a.weight"].T @ t[p + "ssm_f_b.weight"].T + t[p + "ssm_dt.bias"]
    g = np.logaddexp(0.0, f).reshape(T, n_head, d) * t[p + "ssm_a"].reshape(1, n_head, 1)
    beta = 1 / (1 + np.exp(-(h @ t[p + "ssm_beta.weight"].T)))
    state, out = np.zeros((n_head, d, d)), np.zeros((T, n_head, d))
    for i in range(T):
        state = state * np.exp(g[i])[:, :, None]
        delta = (v[i] - np.einsum("hkv,hk->hv", state, k[i])) * beta[i][:, None]
        state = state + k[i][:, :, None] * delta[:, None, :]
        out[i] = np.einsum("hkv,hk->hv", state, q[i])
    gate = (h @ t[p + "ssm_g_a.weight"].T @ t[p + "ssm_g_b.weight"].T).reshape(T, n_head, d)
    out = _rms(out, t[p + "ssm_norm.weight"], eps) / (1 + np.exp(-gate))
    return out.reshape(T, -1) @ t[p + "attn_output.weight"].T


def yarn_factors(n_rot, base, factor, n_ctx_orig, beta_fast=32.0, beta_slow=1.0):
    """ggml's YaRN as rope_freqs-style divisors: pair i turns at its interpolated frequency (divided by factor) or
    its extrapolated one, mixed by a ramp between the correction dims of beta_fast and beta_slow (rounded out,
    clamped to [0, n_rot - 1]); llama.cpp's deepseek2 cancels ggml's cos/sin magnitude factor (its attn_factor)."""

    def corr(beta):
        return n_rot * np.log(n_ctx_orig / (beta * 2 * np.pi)) / (2 * np.log(base))

    low, high = max(0.0, np.floor(corr(beta_fast))), min(n_rot - 1.0, np.ceil(corr(beta_slow)))
    ramp = 1 - np.clip((np.arange(n_rot // 2) - low) / max(0.001, high - low), 0, 1)
    return 1 / ((1 - ramp) / factor + ramp)


def yarn_params(key):
    """llama.cpp's YaRN from the file's keys (None without it): the ramp between interpolated and extrapolated
    angles over ggml's correction dims, and the cos/sin magnitude llama-context.cpp settles on:
    mscale(factor) / mscale(factor, yarn_log_multiplier) (or mscale(factor) without that key), where
    mscale(f, m) = 1 + 0.1 m ln f, times rope.scaling.attn_factor."""
    if key("rope.scaling.type") != "yarn":
        return None
    factor = key("rope.scaling.factor")

    def mscale(m):
        return 1.0 if factor <= 1 else 1 + 0.1 * m * np.log(factor)

    log_mul = key("rope.scaling.yarn_log_multiplier", 0.0)
    magnitude = mscale(1.0) / mscale(log_mul) if log_mul else mscale(1.0)
    return {
        "factor": factor,
        "orig_ctx": key("rope.scaling.original_context_length"),
        "beta_fast": key("rope.scaling.yarn_beta_fast", 32.0),
        "beta_slow": key("rope.scaling.yarn_beta_slow", 1.0),
        "mscale": magnitude * key("rope.scaling.attn_factor", 1.0),
    }


def yarn_theta(theta, base, n_rot, yarn):
    """ggml's rope_yarn: per pair i, theta/factor mixed with theta by ramp(i) over [low, high] (floor / ceil of
    rope_yarn_corr_dims)."""

    def corr_dim(n_rotations):
        return n_rot * np.log(yarn["orig_ctx"] / (n_rotations * 2 * np.pi)) / (2 * np.log(base))

    low = max(0.0, np.floor(corr_dim(yarn["beta_fast"])))
    high = min(n_rot - 1.0, np.ceil(corr_dim(yarn["beta_slow"])))
    ramp = 1 - np.clip((np.arange(n_rot // 2) - low) / max(0.001, high - low), 0, 1)
    return theta / yarn["factor"] * (1 - ramp) + theta * ramp


def attn_temperature(key, pos):
    """Llama 4's query temperature as llama.cpp's mistral3 applies it from attention.temperature_scale (1 without
    it): 1 + scale * ln(1 + floor(pos / n)), n the YaRN original context (offset 0, unlike llama4's graph)."""
    scale = key("attention.temperature_scale")
    if not scale:
        return np.ones_like(pos)
    return 1 + scale * np.log1p(np.floor(pos / key("rope.scaling.original_context_length")))


def gpt_oss_forward(t, meta, ids):
    """llama.cpp's gpt-oss graph (src/models/openai-moe-iswa.cpp): layers 0, 2, ... attend within the sliding
    window (the loader's fixed period 2); q/k/v/o biases, NeoX YaRN RoPE, scores scaled by 1/sqrt(n_rot) and
    softmaxed together with a per-head sink logit (dropped after); the post-attention norm feeds a router with a
    bias whose top-k logits are softmaxed (SOFTMAX_WEIGHT); each expert's gate and up (with biases) go through
    ggml's swiglu_oai: min(g, 7) * sigmoid(1.702 min(g, 7)) * (clip(u, -7, 7) + 1), then the biased down."""

    def key(name, default=None):
        return meta.get(f"gpt-oss.{name}", default)

    n_head, n_kv, eps = (
        key("attention.head_count"),
        key("attention.head_count_kv"),
        key("attention.layer_norm_rms_epsilon"),
    )
    n_rot = key("rope.dimension_count", key("attention.key_length"))  # llama.cpp: the head dim without the key
    base, window = key("rope.freq_base"), key("attention.sliding_window")
    yarn = yarn_params(key)

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    x = t["token_embd.weight"][ids].astype(np.float64)
    T, pos = len(ids), np.arange(len(ids), dtype=np.float64)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    local = causal + np.where(pos[:, None] - pos[None, :] >= window, -np.inf, 0.0)
    for il in range(key("block_count")):
        p = f"blk.{il}."
        h = _rms(x, t[p + "attn_norm.weight"], eps)
        q = rope(lin(h, p + "attn_q").reshape(T, n_head, n_rot), pos, base, True, n_rot, 1.0, None, yarn)
        k = rope(lin(h, p + "attn_k").reshape(T, n_kv, n_rot), pos, base, True, n_rot, 1.0, None, yarn)
        v = lin(h, p + "attn_v").reshape(T, n_kv, n_rot)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(n_rot) + (local if il % 2 == 0 else causal)
        sink = np.broadcast_to(t[p + "attn_sinks.weight"][:, None, None], (n_head, T, 1))
        s = np.concatenate([s, sink], axis=-1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = (s / s.sum(-1, keepdims=True))[..., :T]
        x = x + lin(np.einsum("hqk,khd->qhd", s, v).reshape(T, -1), p + "attn_output")
        h = _rms(x, t[p + "post_attention_norm.weight"], eps)
        logits = lin(h, p + "ffn_gate_inp")
        top = np.argsort(-logits, axis=-1)[:, : key("expert_used_count")]
        f = np.zeros_like(x)
        for row in range(T):
            w = np.exp(logits[row, top[row]] - logits[row, top[row]].max())
            for e, we in zip(top[row], w / w.sum()):
                g = np.minimum(t[p + "ffn_gate_exps.weight"][e] @ h[row] + t[p + "ffn_gate_exps.bias"][e], 7.0)
                u = np.clip(t[p + "ffn_up_exps.weight"][e] @ h[row] + t[p + "ffn_up_exps.bias"][e], -7.0, 7.0)
                a = g / (1 + np.exp(-1.702 * g)) * (u + 1)
                f[row] += we * (t[p + "ffn_down_exps.weight"][e] @ a + t[p + "ffn_down_exps.bias"][e])
        x = x + f
    return _rms(x, t["output_norm.weight"], eps) @ t.get("output.weight", t["token_embd.weight"]).T
