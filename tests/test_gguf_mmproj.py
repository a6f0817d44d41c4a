"""GGUF of a vision-language model: `finetune export --format gguf` writes the language model and the vision tower +
projector (`<out>.mmproj.gguf`, llama.cpp's clip layout). The language model's file computes transformers' logits
(tests/_gguf_forward.py, llama.cpp's graph); the mmproj, read alone, computes transformers' image features the way
llama.cpp's tools/mtmd/clip.cpp graph does (clip_forward below: its preprocessing from the file's mean/std, the ViT,
the family's projector). A VLM finetune does not write is refused in one line naming what is supported."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from _gguf_forward import gguf_forward, read
from PIL import Image, ImageDraw
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from finetune import cli, gguf_export, gguf_mmproj, tiny, video_stub

# the tiny VLMs whose two files are written and checked; x3 q/k in the language model so that a RoPE or
# attention-scale mistake shows in the logits (random tiny weights otherwise attend almost uniformly; x10 on
# tiny-qwen2-vl's trained ones makes attention so sharp that transformers' float32 RoPE frequencies alone move
# the logits by 8e-5), and noise on the vision tower and projector (Gemma 3's projector starts at zero)
# tiny model -> the side of the test image (Gemma 3: its fixed image size; Qwen2-VL: 4x4 patches, 4 image tokens;
# Qwen2.5-VL: 16x16 patches, 64 image tokens in 2x2 windows of 112 pixels)
WRITTEN = {"tiny-gemma3-vlm": 28, "tiny-qwen2-vl": 56, "tiny-vlm": 224}
# tiny-vlm's vision windows are 56 pixels (refused: llama.cpp's are 112); here the same weights with 112
VISION_CHANGES = {"tiny-vlm": {"window_size": 112}}


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _vision_rope(x, ys, xs, base=10000.0):
    """qwen2vl.cpp's 2-D RoPE (ggml_rope_multi, vision mode): the first half of each head's dims rotate by the
    patch's row, the second by its column, each quarter at frequencies base^(-4k/d_head), NEOX-paired."""
    d = x.shape[-1]
    f = base ** (-4.0 * np.arange(d // 4) / d)
    theta = np.concatenate([ys[:, None] * f, xs[:, None] * f], axis=1)[:, None, :]  # (N, 1, d/2)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)], axis=-1)


def clip_forward(path, image: Image.Image, projector_gelu: str = "tanh") -> np.ndarray:
    """Image embeddings for the language model, computed from the mmproj file alone as llama.cpp's clip.cpp does:
    the image normalised with the file's mean/std, conv patch embedding, pre-norm ViT blocks (LayerNorm, biased
    attention scaled by 1/sqrt(d_head), MLP with the file's activation), post-norm, then the projector of
    clip.projector_type. gemma3 (siglip.cpp): learned positions; average-pool of n_merge x n_merge patches,
    RMSNorm, input projection. qwen2vl_merger (qwen2vl.cpp): two Conv2Ds (the two frames of one image) added,
    patches in 2x2-merge order, 2-D RoPE; 4 neighbouring patches concatenated, fc, GELU, fc (ggml_gelu's tanh
    form; `projector_gelu="erf"`: transformers' exact one)."""
    t, meta, _ = read(path)
    kind, patch = meta["clip.projector_type"], meta["clip.vision.patch_size"]
    eps, n_head = meta["clip.vision.attention.layer_norm_epsilon"], meta["clip.vision.attention.head_count"]
    mean, std = np.array(meta["clip.vision.image_mean"]), np.array(meta["clip.vision.image_std"])
    x = ((np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 - mean) / std).transpose(2, 0, 1)  # (3, H, W)
    ny, nx = x.shape[1] // patch, x.shape[2] // patch
    patches = x.reshape(3, ny, patch, nx, patch).transpose(1, 3, 0, 2, 4)  # (ny, nx, 3, p, p)
    ys, xs = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    qwen = kind in (gguf.VisionProjectorType.QWEN2VL, gguf.VisionProjectorType.QWEN25VL)
    if qwen:  # 2x2 merge blocks row-major, row-major inside each block

        def merge_order(a):
            return a.reshape(ny // 2, 2, nx // 2, 2, *a.shape[2:]).swapaxes(1, 2).reshape(ny * nx, *a.shape[2:])

        patches, ys, xs = merge_order(patches), merge_order(ys), merge_order(xs)
        w = t["v.patch_embd.weight"] + t["v.patch_embd.weight.1"]
        h = patches.reshape(ny * nx, -1) @ w.reshape(w.shape[0], -1).T
    else:
        w = t["v.patch_embd.weight"]
        h = patches.reshape(ny * nx, -1) @ w.reshape(w.shape[0], -1).T + t["v.patch_embd.bias"]
        h = h + t["v.position_embd.weight"]
        ys, xs = ys.reshape(-1), xs.reshape(-1)
    if meta.get("clip.use_gelu"):
        act = _gelu_tanh
    elif meta.get("clip.use_silu"):
        act = lambda g: g / (1 + np.exp(-g))  # noqa: E731
    else:  # clip.cpp's default: quick GELU
        act = lambda g: g / (1 + np.exp(-1.702 * g))  # noqa: E731

    def lin(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    def norm(x, name):  # LayerNorm, or RMSNorm where the file has no bias (qwen2.5vl)
        if name + ".bias" in t:
            return _layer_norm(x, t[name + ".weight"], t[name + ".bias"], eps)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * t[name + ".weight"]

    # qwen2.5vl: windows of clip.cpp's attn_window_size (112 pixels) over the 2x2-merged grid; global layers
    # every clip.vision.n_wa_pattern-th
    n_wa = meta.get("clip.vision.n_wa_pattern", 0)
    grid = 112 // patch // 2
    window = (ys // 2 // grid) * (nx // 2) + xs // 2 // grid
    for i in range(meta["clip.vision.block_count"]):
        p = f"v.blk.{i}."
        a = norm(h, p + "ln1")
        q, k, v = (lin(a, p + f"attn_{s}").reshape(len(a), n_head, -1) for s in "qkv")
        if qwen:
            q, k = _vision_rope(q, ys, xs), _vision_rope(k, ys, xs)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        if n_wa and (i + 1) % n_wa:  # a windowed layer: patches attend within their window only
            s = s + np.where(window[:, None] == window[None, :], 0.0, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        h = h + lin(np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(len(a), -1), p + "attn_out")
        f = norm(h, p + "ln2")
        if p + "ffn_gate.weight" in t:  # SwiGLU
            h = h + lin(act(lin(f, p + "ffn_gate")) * lin(f, p + "ffn_up"), p + "ffn_down")
        else:
            h = h + lin(act(lin(f, p + "ffn_up")), p + "ffn_down")
    h = norm(h, "v.post_ln")
    if qwen:
        gelu = _gelu_tanh if projector_gelu == "tanh" else _gelu_erf
        return lin(gelu(lin(h.reshape(len(h) // 4, -1), "mm.0")), "mm.2")
    assert kind == gguf.VisionProjectorType.GEMMA3
    k = meta.get("clip.vision.projector.scale_factor", gguf_mmproj.GEMMA3_DEFAULT_SCALE)
    pooled = h.reshape(ny // k, k, nx // k, k, -1).mean(axis=(1, 3)).reshape(-1, h.shape[-1])
    normed = pooled / np.sqrt((pooled**2).mean(-1, keepdims=True) + eps) * t["mm.soft_emb_norm.weight"]
    return normed @ t["mm.input_projection.weight"]


def shape_image(size: int) -> Image.Image:
    """A small generated image: a red square and a blue circle on white."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([2, 3, size // 2, size // 2 + 4], fill=(220, 30, 40))
    draw.ellipse([size // 2, size // 3, size - 2, size - 3], fill=(30, 60, 200))
    return image


@pytest.fixture(scope="module", params=list(WRITTEN))
def vlm(request, tmp_path_factory, finetune_cache):
    """(model dir with x10 q/k in its language model, model, processor, exported GGUF, mmproj) per family."""
    root = tmp_path_factory.mktemp(request.param)
    source = tiny.build_if_tiny(request.param)
    config = AutoConfig.from_pretrained(source)
    for field, value in VISION_CHANGES.get(request.param, {}).items():
        setattr(config.vision_config, field, value)
    model = AutoModelForImageTextToText.from_pretrained(source, config=config, dtype=torch.float32).eval()
    with video_stub.images_only():  # no torchvision here
        processor = AutoProcessor.from_pretrained(source)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(3.0)
            elif "language_model" not in name and "lm_head" not in name:  # the projector starts at zero
                param.add_(torch.randn_like(param) * 0.1)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = root / "m.gguf"
    assert cli.main(["export", str(model_dir), "--format", "gguf", "--out", str(out), "--outtype", "f32"]) == 0
    # the reference in float64: the tiny language models' sharp attention (x10 q/k) magnifies float32 rounding
    return model_dir, model.double(), processor, out, gguf_mmproj.mmproj_path(out)


def test_the_language_model_file_computes_transformers_logits(vlm, capsys):
    model_dir, model, processor, out, mmproj = vlm
    tensors, meta, _ = read(out)
    assert meta["general.architecture"] != "clip" and not any(n.startswith(("v.", "mm.")) for n in tensors)
    ids = processor.tokenizer("What colour is the square? It is red.")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = gguf_forward(out, ids)
    assert np.abs(got - want).max() < 1e-4
    if meta["general.architecture"] == "qwen2vl":  # llama.cpp's M-RoPE sections, padded to four
        sections = model.config.text_config.rope_parameters["mrope_section"]
        assert meta["qwen2vl.rope.dimension_sections"] == [*sections, 0]
    assert np.abs(want).max() > 0.1  # not trivially small logits


def test_the_mmproj_alone_computes_transformers_image_features(vlm, request):
    model_dir, model, processor, out, mmproj = vlm
    tensors, meta, _ = read(mmproj)
    assert meta["general.architecture"] == "clip" and meta["general.type"] == "mmproj"
    assert meta["clip.has_vision_encoder"]
    assert meta["clip.vision.projection_dim"] == model.config.text_config.hidden_size
    assert all(n.startswith(("v.", "mm.")) for n in tensors)
    side = WRITTEN[request.node.callspec.params["vlm"]]
    image = shape_image(side)
    pixels = {"shortest_edge": side * side, "longest_edge": side * side}  # Qwen's processors: keep the image's size
    resized = {"size": pixels} if "longest_edge" in processor.image_processor.size else {}
    enc = processor.image_processor(images=[image], return_tensors="pt", **resized)
    inputs = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw")}
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        feats = model.get_image_features(**inputs)
    feats = getattr(feats, "pooler_output", feats)
    want = torch.cat(list(feats)).reshape(-1, model.config.text_config.hidden_size).double().numpy()
    assert np.abs(want).max() > 0.1
    # the file's layout: with transformers' exact GELU in the projector, its features
    exact = clip_forward(mmproj, image, projector_gelu="erf")
    assert exact.shape == want.shape
    assert len(exact) == ((side // 28) ** 2 if resized else model.config.mm_tokens_per_image)
    assert np.abs(exact - want).max() < 1e-4
    # as llama.cpp computes: Qwen2-VL's merger through ggml_gelu (the tanh form; transformers: erf), within the
    # forms' difference (max 4.7e-4 at |x| ~ 2.4, carried through the merger's last layer); Gemma 3: the same
    got = clip_forward(mmproj, image)
    assert np.abs(got - want).max() < (1e-4 if meta["clip.projector_type"] == "gemma3" else 2e-3)


def test_a_vlm_finetune_does_not_write_is_refused_in_one_line(finetune_cache, tmp_path, capsys):
    source = tiny.build_if_tiny("tiny-llava")
    capsys.readouterr()  # a first build's progress lines
    out = tmp_path / "m.gguf"
    assert cli.main(["export", source, "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "LlavaForConditionalGeneration is a vision-language model" in err
    assert all(arch in err for arch in gguf_mmproj.WRITTEN) and "--mmproj" in err
    assert not out.exists() and not gguf_mmproj.mmproj_path(out).exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "field, value",
    [("hidden_act", "gelu"), ("spatial_merge_size", 4), ("rope_parameters", {"rope_theta": 5e4})],
)
def test_a_vision_tower_llama_cpp_would_compute_differently_is_refused_naming_the_field(field, value):
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "vision_config": {"hidden_act": "quick_gelu", "spatial_merge_size": 2, field: value},
        "text_config": {},
    }
    with pytest.raises(gguf_export.ExportError) as e:
        gguf_mmproj.check_config(cfg, "m/config.json")
    shown = "rope_theta" if field == "rope_parameters" else field
    assert str(e.value).startswith(f"m/config.json: vision_config.{shown}: ") and "\n" not in str(e.value)


def test_an_adapter_dir_is_merged_on_the_fly_into_both_files(finetune_cache, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny.build_if_tiny("tiny-qwen2-vl"), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out" / "m.gguf"
    assert cli.main(["export", str(tmp_path / "adapter"), "--format", "gguf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"GGUF written to {out} (qwen2vl, f16" in printed
    assert f"mmproj written to {gguf_mmproj.mmproj_path(out)}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf", "m.mmproj.gguf"]  # nothing staged is left
    ids = [1, 5, 77, 300, 12, 9]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        with model.disable_adapter():
            before = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    got = gguf_forward(out, ids)
    assert np.abs(got - want).max() < 0.05 < np.abs(got - before).max()  # f16 weights, the LoRA merged in


def test_ollama_is_refused_for_a_vlm_before_any_work(vlm, tmp_path, capsys):
    model_dir = vlm[0]
    out = tmp_path / "m.gguf"
    assert cli.main(["export", str(model_dir), "--format", "gguf", "--out", str(out), "--ollama"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("finetune: error: --ollama: ") and "--mmproj m.mmproj.gguf" in err
    assert list(tmp_path.iterdir()) == []
