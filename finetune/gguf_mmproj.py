"""GGUF for vision-language models. llama.cpp runs one as two files: the language model, and the vision tower plus
projector (`mmproj`), which its convert_hf_to_gguf.py writes with `--mmproj` for the families in
LLAMA_CPP_MMPROJ (its registered MMPROJ classes). finetune's own GGUF writer (finetune/gguf_export.py) writes and
verifies text models only, so a vision-language model is refused in one line that names what is supported and
the way that works: export the merged model as safetensors (processor included) and convert that with llama.cpp.
"""

from __future__ import annotations

# transformers architecture -> the family name llama.cpp's converter knows it by (`--mmproj` writes its projector)
LLAMA_CPP_MMPROJ = {
    "Qwen2VLForConditionalGeneration": "Qwen2-VL",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL",
    "Gemma3ForConditionalGeneration": "Gemma 3",
    "Idefics3ForConditionalGeneration": "Idefics3",
    "SmolVLMForConditionalGeneration": "SmolVLM",
    "LlavaForConditionalGeneration": "LLaVA",
}


def is_vision_language(cfg: dict) -> bool:
    """A config with a vision tower (transformers' composite VLM configs carry a `vision_config`)."""
    return isinstance(cfg.get("vision_config"), dict)


def refusal(cfg: dict, where: str, text_archs) -> str:
    """The one line that refuses a vision-language model's GGUF export."""
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch in LLAMA_CPP_MMPROJ:
        how = (
            f"llama.cpp converts {LLAMA_CPP_MMPROJ[arch]}: `finetune export DIR --format safetensors --out M`, then "
            "its convert_hf_to_gguf.py on M, once plain (the language model) and once with --mmproj (the projector)"
        )
    else:
        families = ", ".join(sorted(set(LLAMA_CPP_MMPROJ.values())))
        how = f"llama.cpp's converter writes projectors (--mmproj) for {families}"
    return (
        f"{where}: {arch} is a vision-language model; finetune writes GGUF for text models only "
        f"({', '.join(text_archs)}); {how}"
    )
