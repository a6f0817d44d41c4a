"""GGUF for vision-language models. llama.cpp runs one as two files: the language model, and the vision tower plus
projector (`mmproj`, general.architecture `clip`), which its convert_hf_to_gguf.py writes with `--mmproj` for the
families in LLAMA_CPP_MMPROJ (its registered MMPROJ classes).

finetune writes both for the families in WRITTEN: the language model through finetune/gguf_export.py's writer (the
VLM's text config and its language-model tensors, renamed as the converter renames them, staged as a plain text
model dir), and `<out>.mmproj.gguf` laid out as the converter's MmprojModel subclass for the family lays it out
(clip.* keys, clip.projector_type, v.* / mm.* tensor names, image mean/std, patch/image size, norm eps), read back
and compared with the source tensors like the language model. Any other VLM is refused in one line that names
what is supported and the way that works: export the merged model as safetensors and convert it with llama.cpp.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# transformers architecture -> the family name llama.cpp's converter knows it by (`--mmproj` writes its projector)
LLAMA_CPP_MMPROJ = {
    "Qwen2VLForConditionalGeneration": "Qwen2-VL",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
    "Gemma3ForConditionalGeneration": "Gemma 3",
    "Idefics3ForConditionalGeneration": "Idefics3",
    "SmolVLMForConditionalGeneration": "SmolVLM",
    "LlavaForConditionalGeneration": "LLaVA with a Pixtral vision tower",  # its LlavaVisionModel takes no other
}


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter writes one VLM architecture: the text architecture its language model is
    converted as (a key of gguf_export.ARCHS) and the clip.projector_type of its mmproj."""

    text_arch: str
    projector: str  # a gguf.VisionProjectorType attribute


# the VLM architectures finetune writes both files for (each verified against transformers in tests)
WRITTEN = {
    "Gemma3ForConditionalGeneration": Family("Gemma3ForCausalLM", "GEMMA3"),
    "Qwen2VLForConditionalGeneration": Family("Qwen2VLForConditionalGeneration", "QWEN2VL"),
    "Qwen2_5_VLForConditionalGeneration": Family("Qwen2_5_VLForConditionalGeneration", "QWEN25VL"),
}
# what llama.cpp's clip graphs fix (no GGUF key): vision_config field -> the value they compute with
FIXED = {
    "GEMMA3": {"hidden_act": "gelu_pytorch_tanh"},
    # qwen2vl.cpp: quick GELU (no use_gelu / use_silu key), 2x2 merge, two frames per patch, vision RoPE base 1e4
    "QWEN2VL": {"hidden_act": "quick_gelu", "spatial_merge_size": 2, "temporal_patch_size": 2, "rope_theta": 10000.0},
    # the same graph with RMSNorm, SwiGLU, and windows of 112 pixels (clip.cpp's attn_window_size)
    "QWEN25VL": {
        "hidden_act": "silu",
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "rope_theta": 10000.0,
        "window_size": 112,
    },
}
INDEX = "model.safetensors.index.json"  # names the source shards: not the staged dir's
# the converter's name prefixes of a VLM's vision tower and projector (the rest is the language model)
VISION_PREFIXES = ("vision_tower.", "visual.", "multi_modal_projector.", "vision_model.")
# the converter's Gemma 3 projector: the vision patches pooled to this many per side unless the file says otherwise
GEMMA3_DEFAULT_SCALE = 4


def is_vision_language(cfg: dict) -> bool:
    """A config with a vision tower (transformers' composite VLM configs carry a `vision_config`)."""
    return isinstance(cfg.get("vision_config"), dict)


def mmproj_path(out_file: Path) -> Path:
    """`m.gguf` -> `m.mmproj.gguf`: the projector file beside the language model's (llama.cpp's --mmproj)."""
    return out_file.with_name(out_file.stem + ".mmproj.gguf")


def _arch(cfg: dict) -> str:
    return (cfg.get("architectures") or ["?"])[0]


def refusal(cfg: dict, where: str, text_archs) -> str:
    """The one line that refuses a vision-language model's GGUF export."""
    arch = _arch(cfg)
    if arch in LLAMA_CPP_MMPROJ:
        how = (
            f"llama.cpp converts {LLAMA_CPP_MMPROJ[arch]}: `finetune export DIR --format safetensors --out M`, then "
            "its convert_hf_to_gguf.py on M, once plain (the language model) and once with --mmproj (the projector)"
        )
    else:
        families = ", ".join(sorted(set(LLAMA_CPP_MMPROJ.values())))
        how = f"llama.cpp's converter writes projectors (--mmproj) for {families}"
    return (
        f"{where}: {arch} is a vision-language model; finetune writes GGUF for text models "
        f"({', '.join(text_archs)}) and for the vision-language {', '.join(WRITTEN)} "
        f"(language model + mmproj); {how}"
    )


def check_config(cfg: dict, where: str) -> str:
    """The GGUF architecture of any model's file(s), after the one-line refusals: a vision-language model's own
    (finetune writes it, and its vision tower is what llama.cpp computes), then its language model's as a text
    model's (finetune/gguf_export.py)."""
    from finetune import gguf_export

    if is_vision_language(cfg):
        cfg = text_config(cfg, where, gguf_export.ARCHS)
    return gguf_export.check_config(cfg, where)


def model_config(model_dir: Path) -> tuple[dict, str]:
    """gguf_export.model_config for any model dir, a vision-language one included."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return cfg, check_config(cfg, str(model_dir / "config.json"))


def text_config(cfg: dict, where: str, text_archs) -> dict:
    """The config of a written VLM's language model as a plain text model (what gguf_export checks and writes),
    or the one-line refusal for a VLM finetune does not write."""
    from finetune.gguf_export import ExportError

    arch = _arch(cfg)
    if arch not in WRITTEN:
        raise ExportError(refusal(cfg, where, text_archs))
    vision = cfg["vision_config"]
    for field, want in FIXED[WRITTEN[arch].projector].items():
        got = {**vision, **(vision.get("rope_parameters") or {})}.get(field)
        if got is not None and got != want:
            raise ExportError(
                f"{where}: vision_config.{field}: {got}; llama.cpp's {WRITTEN[arch].projector.lower()} projector "
                f"graph computes with {want}, so no GGUF is written"
            )
    if WRITTEN[arch].projector == "QWEN25VL":
        n = wa_pattern(vision)
        if vision.get("fullatt_block_indexes") != [i for i in range(vision["depth"]) if (i + 1) % n == 0]:
            raise ExportError(
                f"{where}: vision_config.fullatt_block_indexes: {vision.get('fullatt_block_indexes')}; llama.cpp's "
                "qwen2.5vl graph attends globally every n-th layer (n-1, 2n-1, ...), so no GGUF is written"
            )
    text = dict(cfg.get("text_config") or {})
    text["architectures"] = [WRITTEN[arch].text_arch]
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    return text


def _language_model_name(name: str) -> str | None:
    """A VLM checkpoint's tensor name as the text model's (None: a vision tower or projector tensor). Checkpoints
    name the language model `language_model.model.*` / `language_model.lm_head.*` (transformers' saved layout) or
    `model.language_model.*` / `model.*` with `lm_head.*`."""
    if name.removeprefix("model.").startswith(VISION_PREFIXES):
        return None
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    for prefix in ("language_model.model.", "model.language_model.", "language_model."):
        if name.startswith(prefix):
            return "model." + name.removeprefix(prefix)
    return name


def stage_language_model(model_dir: Path, cfg: dict, where: str, text_archs, into: Path) -> Path:
    """A plain text-model dir (config, language-model weights renamed, tokenizer files) of a written VLM: the
    input gguf_export.convert reads. One safetensors shard in, one out: one shard in memory at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    into.mkdir(parents=True)
    (into / "config.json").write_text(json.dumps(text_config(cfg, where, text_archs), indent=1), encoding="utf-8")
    for f in sorted(model_dir.glob("*.safetensors")):
        out = {}
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if (new := _language_model_name(name)) is not None:
                    out[new] = st.get_tensor(name)
        if out:
            save_file(out, str(into / f.name))
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX):
            shutil.copy2(f, into / f.name)
    return into


def _vision_tensor_name(name: str) -> str | None:
    """A checkpoint name as the converter's TensorNameMap knows vision tensors (None: not a vision tensor, or
    one the converter skips: SigLIP's unused pooling head)."""
    short = name.removeprefix("model.")
    if not short.startswith(VISION_PREFIXES):
        return None
    short = short.replace("_weight", ".weight")  # Gemma 3's mm_input_projection_weight
    if short.startswith("vision_tower.") and not short.startswith("vision_tower.vision_model."):
        short = "vision_tower.vision_model." + short.removeprefix("vision_tower.")
    if ".head." in short:
        return None
    return short


def _converted(short: str, data: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The converter's splits, as (name for the TensorNameMap, or already the GGUF name; data): Qwen2-VL's fused
    qkv into q, k, v, and its patch Conv3D over two frames into two Conv2Ds (llama.cpp adds their outputs)."""
    import gguf

    if ".qkv." in short:
        return [(short.replace(".qkv.", f".{s}."), part) for s, part in zip("qkv", np.split(data, 3, axis=0))]
    if short.endswith("patch_embed.proj.weight"):
        patch = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH]
        return [(f"{patch}.weight", data[:, :, 0]), (f"{patch}.weight.1", data[:, :, 1])]
    return [(short, data)]


def mmproj_tensors(model_dir: Path, cfg: dict):
    """(GGUF name, float32 array, checkpoint name) of the vision tower and projector, as the converter writes
    them: renamed, split where it splits, Gemma 3's soft-embedding RMSNorm weight stored as 1 + w (llama.cpp
    multiplies by the weight)."""
    import gguf

    from finetune import gguf_export

    # the name map knows one projector layer per vision block: Qwen2-VL's merger ends in `mm.2`
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(vision_hparams(cfg)["n_layer"], 3))
    for hf_name, data in gguf_export._tensors(model_dir):
        short = _vision_tensor_name(hf_name)
        if short is None:
            continue
        if "soft_emb_norm.weight" in short:
            data = data + 1.0
        for part_name, part in _converted(short, data):
            new = part_name if part_name.startswith("v.") else name_map.get_name(part_name, (".weight", ".bias"))
            if new is None:
                raise gguf_export.ExportError(f"{model_dir}: tensor {hf_name} has no GGUF name for clip (mmproj)")
            yield new, np.ascontiguousarray(part), hf_name


def vision_hparams(cfg: dict) -> dict:
    """The vision tower's sizes under the converter's names (Qwen2-VL calls its width embed_dim and the merger's
    output hidden_size; its image size is nominal: 560)."""
    v = dict(cfg["vision_config"])
    if "embed_dim" in v:
        v["intermediate_size"], v["hidden_size"] = v["hidden_size"], v["embed_dim"]
    return {
        "image_size": v.get("image_size", 560),
        "patch_size": v["patch_size"],
        "n_embd": v["hidden_size"],
        "n_ff": v["intermediate_size"],
        "n_layer": v.get("num_hidden_layers", v.get("depth")),
        "n_head": v.get("num_attention_heads", v.get("num_heads")),
    }


def wa_pattern(vision: dict) -> int:
    """Qwen2.5-VL's period of global-attention layers, as the converter derives it (clip.vision.n_wa_pattern)."""
    return (vision.get("fullatt_block_indexes") or [0])[0] + 1


def _qtype(hf_name: str, new: str, data: np.ndarray, outtype: str):
    """The converter's choice for an mmproj tensor: its Gemma 3 class keeps the embeddings (patch and position)
    in f32 and the input projection in f16 (f32 in an f32 file here); its MmprojModel keeps the patch
    embedding in f16 for an f16 file, else f32; the rest as for text models."""
    import gguf

    from finetune import gguf_export

    Q = gguf.GGMLQuantizationType
    if outtype == "f32" or ".embeddings." in hf_name or ".position_embd." in new:
        return Q.F32
    if "input_projection" in hf_name:
        return Q.F16
    if ".patch_embd.weight" in new:
        return Q.F16 if outtype == "f16" else Q.F32
    return gguf_export._qtype(new, data, outtype)


def _image_processor_config(model_dir: Path) -> dict:
    """The image processor's settings as the converter reads them: preprocessor_config.json, then
    processor_config.json with its `image_processor` lifted to the top level."""
    merged: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            merged.update({**data, **(data.get("image_processor") or {})})
    return merged


def write_mmproj(model_dir: Path, cfg: dict, out_file: Path, outtype: str) -> tuple[int, float]:
    """Write the vision tower + projector of `model_dir` to `out_file` and verify it by reading it back;
    returns (tensor count, max relative error)."""
    import gguf

    from finetune import gguf_export

    family = WRITTEN[_arch(cfg)]
    vision, text = cfg["vision_config"], cfg["text_config"]
    pre = _image_processor_config(model_dir)
    where = f"{model_dir}: processor_config.json / preprocessor_config.json"
    for key in ("image_mean", "image_std"):
        if key not in pre:
            raise gguf_export.ExportError(f"{where}: no {key} (the mmproj stores the image normalisation)")
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(model_dir.name)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[outtype]))
    hp = vision_hparams(cfg)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(text["hidden_size"])
    writer.add_vision_image_size(hp["image_size"])
    writer.add_vision_patch_size(hp["patch_size"])
    writer.add_vision_embedding_length(hp["n_embd"])
    writer.add_vision_feed_forward_length(hp["n_ff"])
    writer.add_vision_block_count(hp["n_layer"])
    writer.add_vision_head_count(hp["n_head"])
    writer.add_vision_image_mean([float(v) for v in pre["image_mean"]])
    writer.add_vision_image_std([float(v) for v in pre["image_std"]])
    writer.add_clip_projector_type(getattr(gguf.VisionProjectorType, family.projector))
    if family.projector == "GEMMA3":
        writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-6))
        _gemma3_hparams(writer, vision, pre)
    else:  # the converter's Qwen2-VL reads the eps from the top level of config.json (HF's vision norms: 1e-6)
        if family.projector == "QWEN25VL":
            writer.add_vision_use_silu(True)
            writer.add_vision_n_wa_pattern(wa_pattern(vision))
        writer.add_vision_attention_layernorm_eps(cfg.get("rms_norm_eps", 1e-6))

    infos = []
    for new, data, hf_name in mmproj_tensors(model_dir, cfg):
        qtype = _qtype(hf_name, new, data, outtype)
        infos.append((new, qtype))
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(new, data.shape, dtype, data.size * dtype.itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(data.shape, qtype)
            writer.add_tensor_info(new, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (_, data, _), (_, qtype) in zip(mmproj_tensors(model_dir, cfg), infos):
        writer.write_tensor_data(gguf_export._encode(data, qtype))
    writer.close()
    worst = _verify(out_file, model_dir, cfg, outtype)
    return len(infos), worst


def _gemma3_hparams(writer, vision: dict, pre: dict) -> None:
    """The converter's Gemma 3 keys: GELU (tanh), and the pooling factor when it is not llama.cpp's default 4
    (patches per side over the soft tokens per side)."""
    writer.add_vision_use_gelu(True)
    per_side = int(pre.get("image_seq_length", 256) ** 0.5)
    scale = (vision["image_size"] // vision["patch_size"]) // per_side
    if scale > 0 and scale != GEMMA3_DEFAULT_SCALE:
        writer.add_vision_projector_scale_factor(scale)


def _verify(path: Path, model_dir: Path, cfg: dict, outtype: str) -> float:
    """Read the mmproj back: names, shapes, values within the outtype's tolerance (f16 for the tensors the
    converter forces to f16), and the architecture."""
    import gguf

    from finetune import gguf_export

    meta, got = gguf_export.read_gguf(path)
    if meta.get(gguf.Keys.General.ARCHITECTURE) != gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]:
        raise gguf_export.ExportError(f"{path}: general.architecture did not read back")
    seen, worst = set(), 0.0
    for name, want, hf_name in mmproj_tensors(model_dir, cfg):
        if name not in got:
            raise gguf_export.ExportError(f"{path}: tensor {name} did not read back")
        seen.add(name)
        back = gguf_export.decode(*got[name])
        if back.shape != want.shape:
            raise gguf_export.ExportError(f"{path}: {name}: shape {back.shape} read back, {want.shape} written")
        rel = float(np.abs(back - want).max()) / (float(np.abs(want).max()) or 1.0)
        worst = max(worst, rel)
        qtype = _qtype(hf_name, name, want, outtype)
        allowed = {gguf.GGMLQuantizationType.F32: 0.0, gguf.GGMLQuantizationType.F16: gguf_export.TOLERANCE["f16"]}
        if not rel <= allowed.get(qtype, gguf_export.TOLERANCE["q8_0"]) * 1.01:
            raise gguf_export.ExportError(f"{path}: {name}: read back differs by {rel:.3g} of max |w|")
    if set(got) != seen:
        raise gguf_export.ExportError(f"{path}: unexpected tensors read back: {sorted(set(got) - seen)[:3]}")
    return worst


@dataclass
class VLMReport:
    text: object  # gguf_export.GGUFReport of the language model
    path: Path  # where the language model's file goes
    mmproj: Path  # where the projector's file goes
    projector: str
    tensors: int
    max_rel_error: float

    def lines(self) -> list[str]:
        self.text.path = self.path
        return [
            *self.text.lines(),
            (
                f"mmproj written to {self.mmproj} (clip, projector {self.projector}, {self.tensors} tensors; "
                f"read back: max |Δ| / max |w| = {self.max_rel_error:.3g})"
            ),
            f"run both with llama.cpp: llama-mtmd-cli -m {self.path} --mmproj {self.mmproj} --image IMAGE -p PROMPT",
        ]


def convert(model_dir: Path, out_file: Path, mmproj_file: Path, outtype: str, name: str | None = None) -> VLMReport:
    """Write a VLM dir as the language model's GGUF (`out_file`) and its mmproj (`mmproj_file`), each verified by
    reading it back. The language model is staged beside `out_file` as a plain text model dir, then removed."""
    import gguf

    from finetune import gguf_export

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    check_config(cfg, str(model_dir / "config.json"))  # the one-line refusals, before any work
    staged = out_file.parent / f".{out_file.name}.language_model"
    try:
        stage_language_model(model_dir, cfg, str(model_dir / "config.json"), gguf_export.ARCHS, staged)
        text = gguf_export.convert(staged, out_file, outtype, name=name or model_dir.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    count, worst = write_mmproj(model_dir, cfg, mmproj_file, outtype)
    projector = getattr(gguf.VisionProjectorType, WRITTEN[_arch(cfg)].projector)
    return VLMReport(text, out_file, mmproj_file, projector, count, worst)
