"""GGUF of a vision-language model: `finetune export --format gguf` writes the language model and the vision tower +
projector (`<out>.mmproj.gguf`, llama.cpp's clip layout). The language model's file computes transformers' logits
(tests/_gguf_forward.py, llama.cpp's graph); the mmproj, read alone, computes transformers' image features the way
llama.cpp's tools/mtmd/clip.cpp graph does (clip_forward below: its preprocessing from the file's mean/std, the ViT,
the family's projector). A VLM finetune does not write is refused in one line naming what is supported."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from _gguf_forward import gguf_forward, read
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from finetune import cli, gguf_mmproj, tiny

# the tiny VLMs whose two files are written and checked; x10 q/k in the language model so that a RoPE or
# attention-scale mistake shows in the logits (random tiny weights otherwise attend almost uniformly), and noise on
# the vision tower and projector (Gemma 3's projector and its norm start at zero)
WRITTEN = {"tiny-gemma3-vlm": "Gemma3ForConditionalGeneration"}


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def clip_forward(path, image: Image.Image) -> np.ndarray:
    """Image embeddings for the language model, computed from the mmproj file alone as llama.cpp's clip.cpp does:
    the image (already at clip.vision.image_size) normalised with the file's mean/std, conv patch embedding,
    learned positions, pre-norm ViT blocks (LayerNorm, biased attention scaled by 1/sqrt(d_head), GELU MLP),
    post-norm, then the projector of clip.projector_type (gemma3: average-pool of n_merge x n_merge patches,
    RMSNorm, input projection)."""
    t, meta, _ = read(path)
    size, patch = meta["clip.vision.image_size"], meta["clip.vision.patch_size"]
    eps, n_head = meta["clip.vision.attention.layer_norm_epsilon"], meta["clip.vision.attention.head_count"]
    assert image.size == (size, size)
    mean, std = np.array(meta["clip.vision.image_mean"]), np.array(meta["clip.vision.image_std"])
    x = ((np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 - mean) / std).transpose(2, 0, 1)  # (3, H, W)
    n = size // patch
    patches = x.reshape(3, n, patch, n, patch).transpose(1, 3, 0, 2, 4).reshape(n * n, -1)  # row-major (y, x)
    w = t["v.patch_embd.weight"]
    h = patches @ w.reshape(w.shape[0], -1).T + t["v.patch_embd.bias"] + t["v.position_embd.weight"]
    act = _gelu_tanh if meta.get("clip.use_gelu") else (lambda g: g / (1 + np.exp(-1.702 * g)))  # else quick GELU

    def lin(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    for i in range(meta["clip.vision.block_count"]):
        p = f"v.blk.{i}."
        a = _layer_norm(h, t[p + "ln1.weight"], t[p + "ln1.bias"], eps)
        q, k, v = (lin(a, p + f"attn_{s}").reshape(len(a), n_head, -1) for s in "qkv")
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        s = np.exp(s - s.max(-1, keepdims=True))
        h = h + lin(np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(len(a), -1), p + "attn_out")
        f = _layer_norm(h, t[p + "ln2.weight"], t[p + "ln2.bias"], eps)
        h = h + lin(act(lin(f, p + "ffn_up")), p + "ffn_down")
    h = _layer_norm(h, t["v.post_ln.weight"], t["v.post_ln.bias"], eps)
    assert meta["clip.projector_type"] == gguf.VisionProjectorType.GEMMA3
    k = meta.get("clip.vision.projector.scale_factor", gguf_mmproj.GEMMA3_DEFAULT_SCALE)
    pooled = h.reshape(n // k, k, n // k, k, -1).mean(axis=(1, 3)).reshape((n // k) ** 2, -1)
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
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(source)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(10.0)
            elif "language_model" not in name and "lm_head" not in name:  # the projector starts at zero
                param.add_(torch.randn_like(param) * 0.1)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    out = root / "m.gguf"
    assert cli.main(["export", str(model_dir), "--format", "gguf", "--out", str(out), "--outtype", "f32"]) == 0
    return model_dir, model, processor, out, gguf_mmproj.mmproj_path(out)


def test_the_language_model_file_computes_transformers_logits(vlm, capsys):
    model_dir, model, processor, out, mmproj = vlm
    tensors, meta, _ = read(out)
    assert meta["general.architecture"] == "gemma3" and not any(n.startswith(("v.", "mm.")) for n in tensors)
    ids = processor.tokenizer("What colour is the square? It is red.")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    got = gguf_forward(out, ids)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want).max() > 0.1  # not trivially small logits


def test_the_mmproj_alone_computes_transformers_image_features(vlm):
    model_dir, model, processor, out, mmproj = vlm
    tensors, meta, _ = read(mmproj)
    assert meta["general.architecture"] == "clip" and meta["general.type"] == "mmproj"
    assert meta["clip.has_vision_encoder"]
    assert meta["clip.vision.projection_dim"] == model.config.text_config.hidden_size
    assert all(n.startswith(("v.", "mm.")) for n in tensors)
    image = shape_image(meta["clip.vision.image_size"])
    enc = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=enc["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    want = torch.cat(list(feats)).reshape(-1, model.config.text_config.hidden_size).double().numpy()
    got = clip_forward(mmproj, image)
    assert got.shape == want.shape == (model.config.mm_tokens_per_image, model.config.text_config.hidden_size)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want).max() > 0.1


def test_a_vlm_finetune_does_not_write_is_refused_in_one_line(finetune_cache, tmp_path, capsys):
    source = tiny.build_if_tiny("tiny-llava")
    out = tmp_path / "m.gguf"
    assert cli.main(["export", source, "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "LlavaForConditionalGeneration is a vision-language model" in err
    assert all(arch in err for arch in gguf_mmproj.WRITTEN) and "--mmproj" in err
    assert not out.exists() and not gguf_mmproj.mmproj_path(out).exists() and list(tmp_path.iterdir()) == []
