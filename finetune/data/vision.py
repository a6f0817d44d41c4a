"""Chat examples with images -> training sequences through a model's processor, and the batches a VLM trains on.

Labels are exactly text SFT's (finetune.data.encode): every trained assistant turn is trained on its inference
prompt, rendered by the processor's chat template, which writes the family's image placeholder for each image
part. The processor then expands each placeholder into the image's tokens (`<|image_pad|>` x the merged patches,
`<start_of_image>` + soft tokens, `<image>` x patches ...): a turn is trained where the expanded prompt is a
prefix of the expanded sequence and the expanded prompt + answer is too, so an image's tokens can only ever lie
in an untrained prompt (they never carry labels). Images are opened once here and checked: unreadable,
zero-size, and image tokens that `train.max_length` would cut (the forward would then fail with "Image features
and image tokens do not match") are one-line errors naming the record and the image, or counted and skipped
under `data.skip_bad_rows`.

Encoded rows keep their image references (`images`); the pixels are made per batch by `VisionCollator`, which
runs the processor on the batch's images the way that processor batches them (stacked, concatenated patches,
grid sizes, crop counts...) and builds the per-token inputs some families need (`token_type_ids`,
`mm_token_type_ids`) from the ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.data import encode as text_encode
from finetune.data import images as image_refs
from finetune.data.encode import IGNORE, Encoded, EncodeOptions
from finetune.errors import DataError


def is_processor(obj) -> bool:
    """A multimodal processor (image processor + tokenizer), as opposed to a tokenizer."""
    return hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def tokenizer_of(obj):
    return obj.tokenizer if is_processor(obj) else obj


@dataclass
class VisionEncoded(Encoded):
    images: list[str] | None = None  # the references of the images this sequence holds, in order
    error: str = ""  # data.skip_bad_rows: why the record was skipped (no tokens then)


def expand(processor, text: str, images: list) -> list[int]:
    """The token ids the model sees for `text` (a rendered chat, special tokens written by the template) with
    its image placeholders expanded for `images`."""
    try:
        out = processor(text=[text], images=[images] if images else None, add_special_tokens=False)
    except (ValueError, TypeError, IndexError) as e:  # e.g. placeholders and images that do not pair up
        raise DataError(f"the processor refuses this record: {str(e).strip().splitlines()[0][:200]}") from None
    ids = out["input_ids"][0]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def image_token_ids(processor) -> frozenset[int]:
    """The ids of every token a processor writes for an image (placeholders, soft tokens, begin/end markers):
    the special tokens of one expanded image that the unexpanded placeholder does not have."""
    from PIL import Image

    tok = processor.tokenizer
    probe = expand(processor, processor.image_token, [Image.new("RGB", (32, 32))])
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    return frozenset(i for i in probe if i in special)


def image_span_end(ids: list[int], image_ids: frozenset[int]) -> int:
    """The position after the last image token (0 without images)."""
    for k in range(len(ids) - 1, -1, -1):
        if ids[k] in image_ids:
            return k + 1
    return 0


def check_text_parts(messages: list[dict], placeholder: str, where: str) -> None:
    for i, m in enumerate(messages):
        content = m.get("content")
        texts = [p.get("text", "") for p in content] if isinstance(content, list) else [content or ""]
        if any(placeholder in t for t in texts):
            raise DataError(
                f"{where}: turn {i}: the text holds the model's image placeholder {placeholder!r}; give images "
                "as image parts (or `<image>` with an images column)"
            )


def encode_example(
    processor, example: dict, max_length: int | None, options: EncodeOptions, image_ids: frozenset[int], where: str
) -> list[VisionEncoded]:
    """The training sequences of one chat example with images (see the module docstring)."""
    tok = processor.tokenizer
    token = processor.image_token
    refs = example.get("images") or []
    messages = example["messages"]
    if image_refs.count_image_parts(messages) != len(refs):
        raise DataError(
            f"{where}: field 'images': {len(refs)} image(s) for {image_refs.count_image_parts(messages)} image parts"
        )
    check_text_parts(messages, token, where)
    opened = [image_refs.open_image(r, f"{where}: field 'images' item {k}") for k, r in enumerate(refs)]
    try:
        plan = text_encode._plan_chat(tok, messages, example.get("tools"), options)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    out: list[VisionEncoded] = []
    for seq in plan.sequences:
        n = seq.text.count(token)
        try:
            ids = expand(processor, seq.text, opened[:n])
        except DataError as e:
            raise DataError(f"{where}: field 'images': {e}") from None
        end = image_span_end(ids, image_ids)
        if max_length is not None and end > max_length:
            raise DataError(
                f"{where}: field 'images': the image tokens end at token {end} but train.max_length={max_length} "
                "cuts the sequence before that; raise train.max_length or lower data.image_max_pixels"
            )
        labels = [IGNORE] * len(ids)
        alone: list[VisionEncoded] = []
        for turn in seq.turns:
            k = turn.prompt.count(token)
            prompt_ids = expand(processor, turn.prompt, opened[:k])
            text_ids = ids if turn.text == seq.text else expand(processor, turn.text, opened[: turn.text.count(token)])
            if text_ids[: len(prompt_ids)] == prompt_ids and ids[: len(text_ids)] == text_ids:
                labels[len(prompt_ids) : len(text_ids)] = text_ids[len(prompt_ids) :]
            else:  # a token straddles the boundary: the prompt and the answer tokenized apart, as at inference
                answer = tok(turn.completion, add_special_tokens=False)["input_ids"]
                alone.append(VisionEncoded(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer, images=refs[:k]))
        if any(x != IGNORE for x in labels):
            out.append(VisionEncoded(ids, labels, images=refs[:n], note=plan.note))
        out += alone
    if max_length is not None:
        out = [
            VisionEncoded(e.input_ids[:max_length], e.labels[:max_length], True, e.note, e.images)
            if len(e.input_ids) > max_length
            else e
            for e in out
        ]
    return out


def encode_many(
    processor,
    examples: list[dict],
    max_length: int | None = None,
    *,
    options: EncodeOptions | None = None,
    where: list[str] | None = None,
    skip_bad: bool = False,
    image_ids: frozenset[int] | None = None,
) -> list[list[VisionEncoded]]:
    """`encode_example` of each example; with `skip_bad` a bad one gives one row carrying its error."""
    options = options or EncodeOptions()
    image_ids = image_token_ids(processor) if image_ids is None else image_ids
    out = []
    for n, example in enumerate(examples):
        at = where[n] if where else f"record {n}"
        try:
            if "messages" not in example:
                raise DataError(f"{at}: a vision-language model trains on chat data (messages, sharegpt, alpaca)")
            out.append(encode_example(processor, example, max_length, options, image_ids, at))
        except DataError as e:
            if not skip_bad:
                raise
            out.append([VisionEncoded([], [], images=[], error=str(e))])
    return out


# ----------------------------------------------------------------------------- batches


class VisionCollator:
    """Pads the encoded rows (right, labels with -100) and adds the vision inputs of their images, as the
    processor makes them for a batch. Per-token inputs besides the ids (Gemma 3's `token_type_ids`, Qwen's
    `mm_token_type_ids`) are learnt from a probe: which value each image token id gets."""

    TEXT_KEYS = ("input_ids", "attention_mask")

    def __init__(self, processor):
        from PIL import Image

        self.processor = processor
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_ids = image_token_ids(processor)
        probe = processor(
            text=[processor.image_token], images=[[Image.new("RGB", (32, 32))]], add_special_tokens=False
        )
        ids = list(probe["input_ids"][0])
        self.per_token: dict[str, dict[int, int]] = {}
        for key, value in probe.items():
            if key in self.TEXT_KEYS or not hasattr(value, "__len__") or len(value) != 1:
                continue
            row = list(value[0]) if hasattr(value[0], "__len__") else None
            if row is not None and len(row) == len(ids):
                self.per_token[key] = {int(i): int(v) for i, v in zip(ids, row) if int(v) != 0}

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for k, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[k, :n] = torch.as_tensor(r["input_ids"])
            labels[k, :n] = torch.as_tensor(r["labels"])
            mask[k, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for key, values in self.per_token.items():
            column = torch.zeros_like(ids)
            for token, value in values.items():
                column[ids == token] = value
            batch[key] = column
        batch.update(self.vision_inputs(rows, ids))
        return batch

    def vision_inputs(self, rows: list[dict], ids) -> dict:
        """The processor's image outputs for the batch's images (rows without images left out)."""
        with_images = [r for r in rows if r.get("images")]
        if not with_images:
            return {}
        opened = [[image_refs.open_image(ref, f"image {ref}") for ref in r["images"]] for r in with_images]
        token = self.processor.image_token
        out = self.processor(
            text=[token * len(images) for images in opened],
            images=opened,
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        )
        expected = sum(int((out["input_ids"] == t).sum()) for t in self.image_ids)
        found = sum(int((ids == t).sum()) for t in self.image_ids)
        if expected != found:
            raise DataError(
                f"a batch's images give {expected} image tokens but its sequences hold {found} (an image file "
                "changed since the data was prepared? run with data.cache=refresh)"
            )
        return {k: v for k, v in out.items() if k not in self.TEXT_KEYS and k not in self.per_token}
