"""The tiny vision-language models (`tiny-vlm` Qwen2.5-VL, `tiny-qwen2-vl`, `tiny-gemma3-vlm`, `tiny-llava`): built
by finetune.tiny.

Each is a real transformers VLM architecture at toy size, built from its config: tiny-llama's tokenizer
with the image tokens the family's processor expects, a chat template that writes the family's image
placeholder for `{"type": "image"}` parts, a random vision tower a few layers deep on 28x28-56x56 images
(a handful of image tokens each), and a language model. Where the language model has tiny-llama's
parameter names and shapes (a Llama or Qwen2 decoder), tiny-llama's pre-trained weights are copied in,
so LoRA on the language model learns as it does on tiny-llama (the tiny-model trap, docs/STACK_NOTES.md);
elsewhere the language model stays random. Image processors are the PIL ("slow") ones: no torchvision.

Styles, so tests meet the three ways processors put images into text:
- `qwen2_5_vl`, `qwen2_vl`: `<|vision_start|><|image_pad|><|vision_end|>`, the pad repeated per merged patch (the count
  follows the image's size; min/max pixels are processor settings), M-RoPE positions;
- `gemma3`: `<start_of_image>` expanded to a fixed `mm_tokens_per_image` soft tokens, bidirectional
  attention over them (token_type_ids);
- `llava`: `<image>` repeated per vision patch, a linear projector.
"""

from __future__ import annotations

import pathlib

PLACEHOLDERS = {  # what the chat template writes for an image part, per style
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
    "llava": "<image>",
}
PRETRAINED_TEXT = {"qwen2_5_vl": True, "qwen2_vl": True, "gemma3": False, "llava": True}


def chat_template(placeholder: str) -> str:
    """tiny-llama's template, with content given as a string or a list of text / image parts."""
    content = (
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}" + placeholder + "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )
    return (
        "{{ bos_token }}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}<|system|>\n" + content + "{{ '\\n' }}"
        "{% elif m['role'] == 'user' %}<|user|>\n" + content + "{{ '\\n' }}"
        "{% elif m['role'] == 'assistant' %}<|assistant|>\n"
        "{% generation %}" + content + "</s>{% endgeneration %}"
        "{% else %}{{ raise_exception('tiny chat template: unknown role ' + m['role']"
        " + ' (use system, user or assistant)') }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )


def _tokenizer(text_dir: pathlib.Path, style: str):
    from transformers import AutoTokenizer

    qwen = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    }
    named = {
        "qwen2_5_vl": qwen,
        "qwen2_vl": {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        "gemma3": {
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        "llava": {"image_token": "<image>"},
    }[style]
    tok = AutoTokenizer.from_pretrained(str(text_dir), extra_special_tokens=named)
    tok.chat_template = chat_template(PLACEHOLDERS[style])
    return tok


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _build(style: str, tok, text_cfg):
    """(config, model class, processor) of one style at toy size."""
    import transformers as tf

    vocab = len(tok)
    text = dict(
        vocab_size=vocab,
        hidden_size=text_cfg.hidden_size,
        intermediate_size=text_cfg.intermediate_size,
        num_hidden_layers=text_cfg.num_hidden_layers,
        num_attention_heads=text_cfg.num_attention_heads,
        num_key_value_heads=text_cfg.num_key_value_heads,
        max_position_embeddings=text_cfg.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    siglip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
    if style in ("qwen2_vl", "qwen2_5_vl"):
        image, video, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
        third = head_dim // 2 // 4
        config_class, model_class, processor_class = (
            (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor)
            if style == "qwen2_vl"
            else (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor)
        )
        vision = (
            dict(depth=1, embed_dim=32, hidden_size=text_cfg.hidden_size, num_heads=2, mlp_ratio=2, patch_size=14)
            if style == "qwen2_vl"
            else dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=text_cfg.hidden_size,
                patch_size=14,
                window_size=56,
                fullatt_block_indexes=[1],
            )
        )
        cfg = config_class(
            text_config={
                **text,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [head_dim // 2 - 2 * third, third, third],
                },
            },
            vision_config=vision,
            image_token_id=image,
            video_token_id=video,
            vision_start_token_id=start,
            vision_end_token_id=end,
            tie_word_embeddings=False,
        )
        # 28x28 .. 112x112 pixels: 1 .. 16 image tokens (one per 2x2 merged 14-pixel patches)
        images = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 112 * 112})
        from transformers.video_processing_utils import BaseVideoProcessor

        from finetune import video_stub

        with video_stub.images_only():  # this tiny model is for images; no torchvision needed
            processor = processor_class(image_processor=images, tokenizer=tok, video_processor=BaseVideoProcessor())
        return cfg, model_class, processor
    if style == "gemma3":
        image, boi, eoi = _ids(tok, "<image_soft_token>", "<start_of_image>", "<end_of_image>")
        cfg = tf.Gemma3Config(
            text_config={
                **text,
                "head_dim": text_cfg.hidden_size // text_cfg.num_attention_heads,
                "sliding_window": 64,
                "query_pre_attn_scalar": 32,
            },
            vision_config={**siglip, "image_size": 28},
            mm_tokens_per_image=4,
            image_token_index=image,
            boi_token_index=boi,
            eoi_token_index=eoi,
            tie_word_embeddings=False,
        )
        images = tf.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
        processor = tf.Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4)
        return cfg, tf.Gemma3ForConditionalGeneration, processor
    if style == "llava":
        (image,) = _ids(tok, "<image>")
        cfg = tf.LlavaConfig(
            vision_config={**siglip, "model_type": "siglip_vision_model", "image_size": 28},
            text_config={**text, "model_type": "llama"},
            image_token_index=image,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
        images = tf.SiglipImageProcessorPil(size={"height": 28, "width": 28})
        processor = tf.LlavaProcessor(
            image_processor=images, tokenizer=tok, patch_size=14, vision_feature_select_strategy="full"
        )
        return cfg, tf.LlavaForConditionalGeneration, processor
    raise ValueError(f"unknown tiny VLM style {style!r}; valid: {', '.join(PLACEHOLDERS)}")


def build_into(out: pathlib.Path, style: str, text_dir: pathlib.Path, seed: int) -> dict:
    """Write a complete VLM dir (weights, config, processor, tokenizer, chat template) into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    tok = _tokenizer(text_dir, style)
    text_model = AutoModelForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32)
    cfg, model_class, processor = _build(style, tok, text_model.config)
    model = model_class(cfg).float()
    copied = _copy_text_weights(text_model, model, len(tok)) if PRETRAINED_TEXT[style] else 0
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    processor.chat_template = tok.chat_template
    processor.save_pretrained(out)
    return {
        "style": style,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "text_weights_from": text_dir.name if copied else None,
        "text_tensors_copied": copied,
    }


def _copy_text_weights(source, target, vocab: int) -> int:
    """Copy the pre-trained text model's tensors into the VLM's language model wherever a target name
    ends with the source's name (after its `model.` prefix) and the shapes agree; embedding rows of the
    added image tokens keep their random init scaled to the trained rows. Returns how many were copied."""
    import torch

    src = source.state_dict()
    copied = 0
    with torch.no_grad():
        for name, param in target.named_parameters():
            if "vision" in name or "projector" in name or "merger" in name:
                continue
            for key, value in src.items():
                short = key.removeprefix("model.")
                if not name.endswith(short):
                    continue
                if value.shape == param.shape:
                    param.copy_(value)
                elif value.dim() == 2 and value.shape[1] == param.shape[1] and value.shape[0] < param.shape[0]:
                    param[: value.shape[0]].copy_(value)  # embeddings / lm_head with the image tokens added
                    param[value.shape[0] :].normal_(0.0, float(value.std()))
                else:
                    continue
                copied += 1
                break
            else:
                if name.endswith("bias"):  # a bias the text model lacks (Qwen2's q/k/v): zero keeps its function
                    param.zero_()
    return copied
