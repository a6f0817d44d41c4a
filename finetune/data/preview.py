"""`finetune data preview`: one example as the model sees it, trained tokens marked.

A wrong template or loss mask is the most common silent fine-tuning bug; this shows it. A chat
record that becomes several training sequences (a template that renders earlier turns differently
once later turns follow: each such turn is trained on its own inference prompt) shows every one."""

from __future__ import annotations

from finetune.config import DataSection
from finetune.data import vision
from finetune.data.encode import IGNORE, Encoded, EncodeOptions, encode
from finetune.errors import DataError

GREEN, RESET = "\033[42;30m", "\033[0m"


def _decode(tok, ids: list[int], image_ids: frozenset[int]) -> str:
    """Decoded ids, a run of one repeated image token shown once with its count (`<|image_pad|>×64`)."""
    import itertools

    if not image_ids:
        return tok.decode(ids, skip_special_tokens=False)
    out, text = [], []
    for tid, group in itertools.groupby(ids):
        n = len(list(group))
        if tid in image_ids and n > 1:
            out += [tok.decode(text, skip_special_tokens=False), f"{tok.convert_ids_to_tokens(tid)}×{n}"]
            text = []
        else:
            text += [tid] * n
    return "".join(out) + tok.decode(text, skip_special_tokens=False)


def image_spans(ids: list[int], image_ids: frozenset[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of image tokens: where the processor put an image."""
    spans, start = [], None
    for k, tid in enumerate([*ids, None]):
        if tid in image_ids and start is None:
            start = k
        elif tid not in image_ids and start is not None:
            spans.append((start, k))
            start = None
    return spans


def render(tok, ids: list[int], labels: list[int], color: bool, image_ids: frozenset[int] = frozenset()) -> str:
    """Decoded text with each trained run wrapped in [[ ]] (or a green background on a terminal); a
    vision-language model's image tokens shown once per run with their count."""
    out, run, trained = [], [], False

    def flush():
        if run:
            text = _decode(tok, run, image_ids)
            out.append((f"{GREEN}{text}{RESET}" if color else f"[[{text}]]") if trained else text)

    for tid, label in zip(ids, labels):
        is_trained = label != IGNORE
        if is_trained != trained:
            flush()
            run, trained = [], is_trained
        run.append(tid)
    flush()
    return "".join(out)


def token_text(tok, tid: int) -> str:
    """A token as the text it stands for (`'你'`, `' world'`), not its vocabulary spelling (byte-level BPE
    spells Chinese as mojibake such as 'ä½ł'). A token holding part of a character shows its bytes."""
    text = tok.decode([tid], skip_special_tokens=False)
    if "\ufffd" not in text:
        return repr(text)
    raw = _token_bytes(tok.convert_ids_to_tokens(tid))
    return f"bytes {raw.hex(' ')} (part of a character)" if raw else repr(text)


def _token_bytes(piece: str) -> bytes | None:
    """The bytes of a byte-level BPE piece (GPT-2's byte-to-unicode alphabet) or a byte-fallback piece (<0xE4>)."""
    import re

    if re.fullmatch(r"(<0x[0-9A-Fa-f]{2}>)+", piece):
        return bytes(int(h, 16) for h in re.findall(r"<0x([0-9A-Fa-f]{2})>", piece))
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inverse = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(inverse[c] for c in piece) if piece and all(c in inverse for c in piece) else None


def preview(
    dataset: str,
    tok,
    fmt: str | None = None,
    index: int = 0,
    max_length: int | None = None,
    color: bool = False,
    columns: dict | None = None,
    show_tokens: bool = False,
    options: EncodeOptions | None = None,
) -> str:
    """The file form (`finetune data preview FILE --model M`): a dataset with default data settings."""
    options = options or EncodeOptions()
    cfg = DataSection(train=dataset, format=fmt, columns=columns or {}, reasoning_tags=list(options.reasoning_tags))
    return preview_data(
        cfg, tok, index=index, max_length=max_length, color=color, show_tokens=show_tokens, options=options
    )


def preview_recipe(
    recipe,
    stage: str | None = "",
    index: int = 0,
    max_length: int | None = None,
    color: bool = False,
    show_tokens: bool = False,
) -> str:
    """The recipe form (`finetune data preview RECIPE [k=v ...]`): record `index` of the recipe's training
    data as `finetune train` reads, converts and encodes it (its tokenizer and chat template, data.encoding,
    columns, registry, system, reasoning_tags, train_on, skip_bad_rows, chat_template_kwargs, train.max_length).
    `stage`: the stage whose formats the data must fit ("" = the recipe's; None = any)."""
    from finetune import loading
    from finetune.data.encode import options_of

    tok = loading.load_tokenizer_or_processor(recipe.model, recipe.data)  # a processor for a vision-language model
    return preview_data(
        recipe.data,
        tok,
        stage=recipe.stage if stage == "" else stage,
        index=index,
        max_length=max_length if max_length is not None else recipe.train.get("max_length"),
        color=color,
        show_tokens=show_tokens,
        options=options_of(recipe),
    )


def _example(cfg: DataSection, stage: str | None, index: int) -> tuple[dict, str, str, str]:
    """Training example `index` (numbered as training numbers them: bad rows skipped under data.skip_bad_rows
    are not counted), read as far as it and no further: (example, format, source label, where)."""
    from finetune.data import _convert_extra, formats, open_source

    src, records, fmt, columns = open_source(cfg.train, cfg, stage, "data.train")  # stage None: any format
    n = 0
    for record in records:
        try:
            example = formats.convert([record], fmt, columns, cfg.system, *_convert_extra(cfg))[0]
        except DataError:
            if cfg.skip_bad_rows:
                continue
            raise
        if n == index:
            return example, fmt, src.label(), record.where
        n += 1
    raise DataError(f"{src.label()}: --index {index} is out of range (0..{n - 1})")


def preview_data(
    cfg: DataSection,
    tok,
    stage: str | None = None,
    index: int = 0,
    max_length: int | None = None,
    color: bool = False,
    show_tokens: bool = False,
    options: EncodeOptions | None = None,
) -> str:
    options = options or EncodeOptions()
    if index < 0:
        raise DataError(f"--index {index}: must be at least 0")
    from finetune.data.pairs import _shape

    example, fmt, label, where = _example(cfg, stage, index)
    marker = "green background" if color else "[[ ]]"
    shaped = [example] if stage in (None, "sft") else _shape([example], fmt, stage)  # as the stage's loader shapes it
    try:
        views = [view for e in shaped for view in _views(tok, e, max_length, options)]
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    lines = [f"{label} record {index} ({fmt}); trained tokens in {marker}:"]
    if len(views) > 1 and views[0][1].note:
        lines.append(f"{len(views)} sequences: {views[0][1].note}")
    image_ids = vision.image_token_ids(tok) if vision.is_processor(tok) else frozenset()
    text_tok = vision.tokenizer_of(tok)
    for title, enc in views:
        counts = f"{len(enc.input_ids)} tokens, {enc.n_trained} trained{' (truncated)' if enc.truncated else ''}"
        if not title:  # one chat / completion / text (SFT): the counts go in the header
            lines = [f"{label} record {index} ({fmt}); {counts}; trained tokens in {marker}:", ""]
        else:
            lines += ["", f"{title}{counts}:"]
        for k, (start, end) in enumerate(image_spans(enc.input_ids, image_ids)):
            trained = sum(1 for x in enc.labels[start:end] if x != IGNORE)
            ref = (getattr(enc, "images", None) or [])[k] if k < len(getattr(enc, "images", None) or []) else ""
            ref = "data: URI" if ref.startswith("data:") else ref
            lines.append(f"image {k + 1} ({ref}): tokens {start}..{end - 1} ({end - start} tokens, {trained} trained)")
        lines.append(render(text_tok, enc.input_ids, enc.labels, color, image_ids))
        if show_tokens:
            lines += ["", "  pos  id     label  token"]
            for i, (tid, label_id) in enumerate(zip(enc.input_ids, enc.labels)):
                lines.append(
                    f"  {i:<4} {tid:<6} {'train' if label_id != IGNORE else '-':<6} {token_text(text_tok, tid)}"
                )
    return "\n".join(lines)


def _views(tok, example: dict, max_length: int | None, options: EncodeOptions) -> list[tuple[str, Encoded]]:
    """(title, encoded) per sequence a record trains on. Preference/KTO answers are marked as TRL
    splits them: everything after the prompt rendered with the generation prompt."""
    if "chosen" in example:
        answers = [("chosen: ", example["chosen"]), ("rejected: ", example["rejected"])]
    elif isinstance(example.get("completion"), list):
        answers = [(f"completion ({'desirable' if example['label'] else 'undesirable'}): ", example["completion"])]
    elif isinstance(example.get("prompt"), list):
        answers = [("prompt (an RL stage generates the answer): ", [])]
    elif vision.is_processor(tok):
        sequences = vision.encode_many(tok, [example], max_length, options=options)[0]
        if len(sequences) == 1:
            return [("", sequences[0])]
        return [(f"sequence {i + 1} of {len(sequences)}: ", enc) for i, enc in enumerate(sequences)]
    else:
        sequences = encode(tok, example, max_length, options=options)
        if len(sequences) == 1:
            return [("", sequences[0])]
        return [(f"sequence {i + 1} of {len(sequences)}: ", enc) for i, enc in enumerate(sequences)]
    prompt = example["prompt"]
    kwargs = options.chat_template_kwargs  # as TRL renders them (a per-example column, finetune.data.pairs)
    n_prompt = len(
        tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)[
            "input_ids"
        ]
    )
    views = []
    for title, answer in answers:
        ids = tok.apply_chat_template(
            prompt + answer, add_generation_prompt=not answer, tokenize=True, return_dict=True, **kwargs
        )["input_ids"]
        enc = Encoded(ids, [IGNORE] * n_prompt + ids[n_prompt:])
        if max_length is not None and len(ids) > max_length:
            enc = Encoded(ids[:max_length], enc.labels[:max_length], truncated=True)
        views.append((title, enc))
    return views
