"""Canonical examples -> `input_ids` + `labels` (-100 where no loss is taken).

Chat: the conversation is rendered once with the tokenizer's chat template; each assistant
turn's character span is found by rendering the prefix with `add_generation_prompt=True`
and the prefix plus that turn. Tokens overlapping an assistant span carry labels: the
answer and the template's end-of-turn (e.g. `</s>`, `<|im_end|>`), nothing of the prompt.
This needs no `{% generation %}` markers, so it works with every prefix-consistent chat
template (Llama 3, Qwen 2.5, ChatML, ...), not only the ones that have them.
Completion: only `completion` + EOS is trained. Text: every token, + EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _render(tok, messages, add_generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans of its assistant turns."""
    full = _render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], add_generation_prompt=True)
        upto = _render(tok, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                "the chat template is not prefix-consistent (rendering a conversation's first turns does not "
                "give the start of the whole), so the assistant turns cannot be located; set model.chat_template"
            )
        # The turn's text and its end-of-turn token; not the newline some templates put after it.
        spans.append((len(before), len(before) + len(upto[len(before):].rstrip("\n"))))
    return full, spans


def _labels_from_spans(ids, offsets, spans) -> list[int]:
    labels = []
    for tid, (start, end) in zip(ids, offsets):
        trained = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(tid if trained else IGNORE)
    return labels


def encode_chat(tok, messages: list[dict]) -> Encoded:
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return Encoded(enc["input_ids"], _labels_from_spans(enc["input_ids"], enc["offset_mapping"], spans))


def encode_completion(tok, prompt: str, completion: str) -> Encoded:
    """Prompt and completion are tokenized apart, as at inference (where the prompt is all
    the model is given), so no token straddles the boundary."""
    eos = tok.eos_token or ""
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tok(completion + ("" if completion.endswith(eos) else eos), add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids)


def encode_text(tok, text: str) -> Encoded:
    eos = tok.eos_token or ""
    ids = tok(text + ("" if text.endswith(eos) else eos), add_special_tokens=True)["input_ids"]
    return Encoded(ids, list(ids))


def encode(tok, example: dict, max_length: int | None = None) -> Encoded:
    """Encode one canonical example; keep the start when it is longer than `max_length`."""
    if "messages" in example:
        enc = encode_chat(tok, example["messages"])
    elif "prompt" in example:
        enc = encode_completion(tok, example["prompt"], example["completion"])
    else:
        enc = encode_text(tok, example["text"])
    if max_length is not None and len(enc.input_ids) > max_length:
        enc = Encoded(enc.input_ids[:max_length], enc.labels[:max_length], truncated=True)
    return enc
