"""One `generate()` for every loaded model: a plain model, any PEFT adapter, prompt-learning included.

Why not `model.generate` for prompt tuning and P-tuning: peft (0.21.2, the newest release) injects the
virtual-token embeddings in `PeftModelForCausalLM.prepare_inputs_for_generation` only while it sees no
`past_key_values`. transformers 5.24 hands the KV cache to that method as `cache` instead, so peft injects
the virtual tokens again at every decoding step and cached generation differs from uncached generation.
We take peft's own public pieces instead: the virtual-token embeddings (`get_prompt`) are put in front of
the prompt's embeddings and the base model generates from `inputs_embeds`. That is what peft does at the
first step, it works on every transformers version, and the KV cache then holds exactly what peft's
training forward saw. Prefix tuning keeps peft's path: its prefix lives in the cache, which 5.24 passes on
correctly, though not a left-padded batch's attention mask: on such versions a padded batch of a
prefix-tuning model is generated row by row. `tests/test_generate.py` checks all of this against peft's own
generation, with and without cache, batched and one by one.

Hybrid models (Qwen3.5, Qwen3-Next, Kimi Linear, Granite 4, Falcon-H1, LFM2) keep linear-attention/SSM state
beside the key/value cache. transformers (5.23) generates with such a cache as long as one layer of it is an
attention layer: it reads the sequence length there. A model whose every layer is a recurrent one (a cut-down
config, a pure-SSM stack) has none, and `generate` then stops with "`get_seq_length` can only be called on
Attention layers". We ask the model's own cache which layer types it holds (`cache_tracks_length`) and generate
such a model without a cache: the same tokens, recomputed at every step.
"""

from __future__ import annotations

import logging

import torch
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)

# peft types whose virtual tokens are input embeddings (not a KV-cache prefix)
EMBEDDING_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")


def peft_misses_the_cache() -> bool:
    """peft <= 0.21.2 looks for the cache as `past_key_values`; transformers >= 5.24 passes it as `cache`."""
    import peft
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("5.24") and Version(peft.__version__) <= Version("0.21.2")


def _peft_type(model) -> str | None:
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    return str(getattr(config.peft_type, "value", config.peft_type))


def uses_prompt_embeddings(model) -> bool:
    return _peft_type(model) in EMBEDDING_PROMPT_TYPES


_TOLD: set[str] = set()  # the cache kinds already warned about (once per process)


def cache_layer_types(model) -> list[str]:
    """The class of each layer of the cache `generate` would build for `model` (a PEFT model: its base's)."""
    from transformers.cache_utils import DynamicCache

    return [type(layer).__name__ for layer in DynamicCache(config=_text_config(model)).layers]


def cache_tracks_length(model) -> bool:
    """Whether the model's cache has a layer that counts the tokens it holds (an attention layer, alone or beside
    linear-attention state): transformers' cached generation needs one."""
    from transformers.cache_utils import CacheLayerMixin, DynamicCache

    cache = DynamicCache(config=_text_config(model))
    return not cache.layers or any(isinstance(layer, CacheLayerMixin) for layer in cache.layers)


def cache_tracks_each_layer(model) -> bool:
    """Whether every layer of the model's cache is a key/value (attention) layer: no linear-attention/SSM state."""
    from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

    return not any(
        isinstance(layer, LinearAttentionCacheLayerMixin) for layer in DynamicCache(config=_text_config(model)).layers
    )


def _text_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.get_text_config(decoder=True)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """`model.generate(input_ids=..., attention_mask=..., **kwargs)`: the prompt followed by the new tokens."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if kwargs.get("use_cache", True) and not cache_tracks_length(model):
        kinds = ", ".join(sorted(set(cache_layer_types(model))))
        (log.debug if kinds in _TOLD else log.warning)(
            "the model's cache holds only linear-attention/SSM layers (%s), which transformers cannot generate "
            "with: generating without a cache (slower, same tokens)",
            kinds,
        )
        _TOLD.add(kinds)
        kwargs["use_cache"] = False
    if (
        _peft_type(model) == "PREFIX_TUNING"
        and len(input_ids) > 1
        and not attention_mask.all()
        and peft_misses_the_cache()
    ):
        return _row_by_row(model, input_ids, attention_mask, **kwargs)
    if not uses_prompt_embeddings(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    batch = input_ids.shape[0]
    embeds = model.word_embeddings(input_ids)
    prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)
    mask = torch.cat([attention_mask.new_ones(batch, prompts.shape[1]), attention_mask], dim=1)
    streamer = kwargs.pop("streamer", None)
    if streamer is not None:  # it expects the prompt first (and skips it, as with input_ids)
        streamer.put(input_ids.cpu())
        kwargs["streamer"] = _SkipEmptyPrompt(streamer)
    new_tokens = model.get_base_model().generate(
        inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, **kwargs
    )
    return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)


def whole_characters(tokenizer, ids: list[int], **decode) -> str:
    """The text of generated `ids` without a half multi-byte character at its end: generation stopped between
    the bytes of a character (byte-level or byte-fallback tokens), which decode to U+FFFD. The server streams
    the same text (it waits for a character's last byte), so `chat` and `serve` answer alike."""
    ids = list(ids)
    text = tokenizer.decode(ids, **decode)
    while ids and text.endswith("\ufffd"):
        ids.pop()
        text = tokenizer.decode(ids, **decode)
    return text


def _row_by_row(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    """Each row without its padding; the answers right-padded to one width (pad_token_id) after the batch's prompts."""
    pad = kwargs.get("pad_token_id")
    if pad is None:
        pad = model.generation_config.pad_token_id
    answers = []
    for ids, mask in zip(input_ids, attention_mask):
        row = ids[mask.bool()].unsqueeze(0)
        answers.append(model.generate(input_ids=row, attention_mask=torch.ones_like(row), **kwargs)[0, row.shape[1] :])
    width = max(len(a) for a in answers)
    out = torch.full((len(answers), width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for i, answer in enumerate(answers):
        out[i, : len(answer)] = answer
    return torch.cat([input_ids, out], dim=1)


class _SkipEmptyPrompt(BaseStreamer):
    """Passes generated tokens on to a streamer, without the empty prompt `generate(inputs_embeds=...)` announces."""

    def __init__(self, streamer):
        self.streamer = streamer

    def put(self, value):
        if value.numel():
            self.streamer.put(value)

    def end(self):
        self.streamer.end()
