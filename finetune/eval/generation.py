"""Generation eval: dataset -> prompts + references -> batched greedy answers -> predictions.jsonl.

Prompts are sorted by length and batched with left padding, so each batch pads little and every
row's answer starts right after its prompt. The reference is the last assistant turn; the
prompt is the conversation before it, rendered with the chat template (generation prompt on).

What is scored is the answer: reasoning that a prediction opens with (`<think>...</think>`, or the run's
data.reasoning_tags) is split off by the rule training used to inline it (`split_inline_reasoning`), since
references carry none; predictions.jsonl keeps both (`prediction` as generated, `reasoning`, `answer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import image_inputs
from finetune.data.chat_formats import DEFAULT_REASONING_TAGS, split_inline_reasoning
from finetune.errors import DataError
from finetune.generate import generate as generate_tokens


@dataclass
class Item:
    prompt: object  # list of messages (chat) or a plain string (prompt_completion)
    reference: str
    where: str = ""


def items_from_examples(examples: list[dict], label: str) -> list[Item]:
    """Canonical examples (finetune.data.formats) -> prompt + reference pairs."""
    items = []
    for i, ex in enumerate(examples):
        if "messages" in ex:
            msgs = _with_references(ex["messages"], ex.get("images") or [])
            last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
            items.append(Item(msgs[:last], msgs[last]["content"], f"{label} record {i + 1}"))
        elif "completion" in ex:
            items.append(Item(ex["prompt"], ex["completion"], f"{label} record {i + 1}"))
        else:
            raise DataError(f"{label}: format 'text' has no answers to score; use a chat or prompt_completion dataset")
    if not items:
        raise DataError(f"{label}: empty dataset (no records)")
    return items


def _with_references(messages: list[dict], refs: list) -> list[dict]:
    """An example's `{"type": "image"}` parts given their references (`images`, in order), as prompts carry them."""
    if not refs:
        return messages
    refs = iter(refs)
    return [
        {**m, "content": [{**p, "image": next(refs)} if p.get("type") == "image" else p for p in m["content"]]}
        if isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


def load_items(
    dataset: str,
    fmt: str | None = None,
    split: str = "test",
    max_samples: int | None = None,
    registry: str | None = None,
) -> tuple[list[Item], str | None]:
    """(items, registry language) of a dataset: registry name, file or hub id (`split` for the hub)."""
    from finetune.config import DataSection
    from finetune.data import read_examples

    cfg = DataSection(train=dataset, format=fmt, split=split, registry=registry)
    examples, _, src = read_examples(dataset, cfg, field_name="--data")
    items = items_from_examples(examples, src.label())
    return items[:max_samples] if max_samples else items, src.language


def render(tok, prompt, template_kwargs: dict | None = None) -> list[int]:
    if isinstance(prompt, str):
        return tok(prompt, add_special_tokens=True)["input_ids"]
    return list(
        tok.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **(template_kwargs or {})
        )["input_ids"]
    )


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    template_kwargs: dict | None = None,
    processor=None,
    where: str = "eval",
) -> list[str]:
    """Greedy answers, in the order of `prompts`: length-sorted, left-padded batches (chat prompts
    rendered with the run's model.chat_template_kwargs, as in training). Prompts with image parts are
    rendered by the vision-language model's `processor` and answered one at a time (their image inputs
    differ in shape from row to row)."""
    with_images = [i for i, p in enumerate(prompts) if image_inputs.has_images(p)]
    if with_images and processor is None:
        raise DataError(f"{where}: prompt {with_images[0] + 1} has an image, but the model takes no images")
    ids = [[] if i in with_images else render(tok, p, template_kwargs) for i, p in enumerate(prompts)]
    out: list[str] = [""] * len(ids)
    progress = _Progress(len(ids))
    for i in with_images:
        messages, images = image_inputs.with_images(prompts[i], f"{where}: prompt {i + 1}")
        enc = image_inputs.to_model(image_inputs.render(processor, messages, template_kwargs, images), model)
        width = enc["input_ids"].shape[1]
        generated = generate_tokens(
            model, **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        out[i] = tok.decode(generated[0, width:], skip_special_tokens=True).strip()
        progress.update(1)
    plain = set(range(len(ids))) - set(with_images)
    order = sorted(plain, key=lambda i: len(ids[i]), reverse=True)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            attention[row, width - len(ids[i]) :] = 1
        generated = generate_tokens(
            model,
            input_ids.to(device),
            attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        for row, i in enumerate(batch):
            out[i] = tok.decode(generated[row, width:], skip_special_tokens=True).strip()
        progress.update(len(batch))
    progress.close()
    return out


class _Progress:
    """Answers generated, with answers/s, on stderr: a bar on a terminal; in a pipe or log a line every
    10% (no \\r). Silent for a handful of prompts (chat, probes)."""

    def __init__(self, total: int, quiet_below: int = 8):
        import sys
        import time

        self.total, self.done, self.bar, self.stream = total, 0, None, sys.stderr
        self.t0, self.clock = time.perf_counter(), time.perf_counter
        self.quiet = total < quiet_below
        if not self.quiet and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="generating", unit="answer", leave=False, file=self.stream)

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and self.done * 10 // self.total > before * 10 // self.total:
            rate = self.done / max(self.clock() - self.t0, 1e-9)
            print(
                f"finetune: generated {self.done}/{self.total} answers ({rate:.2g} answers/s)",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate_one_by_one(model, tok, prompts: list, max_new_tokens: int = 128) -> list[str]:
    """The unbatched loop (what bench/eval_generation.py compares against)."""
    return [generate(model, tok, [p], max_new_tokens, 1)[0] for p in prompts]


def prompt_text(tok, prompt, template_kwargs: dict | None = None) -> str:
    return (
        prompt
        if isinstance(prompt, str)
        else tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **(template_kwargs or {}))
    )


@dataclass
class Split:
    """A prediction cut into the reasoning it opened with and the answer that is scored."""

    reasoning: str
    answer: str
    unfinished: bool = False  # the reasoning never closed (max_new_tokens ran out): the answer is empty


def split_answer(prediction: str, tags=DEFAULT_REASONING_TAGS, opened: bool = False) -> Split:
    """Reasoning and answer of a prediction, by training's rule (`split_inline_reasoning`). `opened`: the
    prompt itself ended with the open tag (a template whose generation prompt starts the reasoning), so the
    prediction begins inside it. An open tag that never closes leaves no answer."""
    open_tag, close_tag = tags
    text = open_tag + prediction if opened and not prediction.lstrip().startswith(open_tag) else prediction
    reasoning, answer = split_inline_reasoning(text, tags)
    if not reasoning and text.lstrip().startswith(open_tag) and close_tag not in text:
        return Split(text.lstrip()[len(open_tag) :].strip("\n"), "", True)
    if reasoning or text.lstrip().startswith(open_tag):  # `<think></think>answer`: an empty reasoning block
        return Split(reasoning, answer.strip())
    return Split("", prediction.strip())


def prompt_opens_reasoning(prompt_text_: str, tags=DEFAULT_REASONING_TAGS) -> bool:
    return prompt_text_.rstrip().endswith(tags[0])


def write_predictions(
    path: Path, tok, items: list[Item], predictions: list[str], splits: list[Split], template_kwargs=None
) -> None:
    from finetune.outputs import write_text_atomic

    rows = []
    for it, p, s in zip(items, predictions, splits):
        row = {"prompt": prompt_text(tok, it.prompt, template_kwargs), "prediction": p}
        if p.strip() != s.answer:  # reasoning was split off: the scored answer beside the text as generated
            row.update(reasoning=s.reasoning, answer=s.answer)
        row["reference"] = it.reference
        rows.append(row)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_predictions(path: str | Path) -> tuple[list[str], list[str]]:
    """(predictions, references) of a JSONL file; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--predictions: {path}: file not found")
    preds, refs = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected an object with 'prediction' and 'reference'")
        for key, target in (("prediction", preds), ("reference", refs)):
            if key not in row:
                raise DataError(f"{path}:{n}: field '{key}': missing")
            if not isinstance(row[key], str):
                raise DataError(f"{path}:{n}: field '{key}': expected a string, got {type(row[key]).__name__}")
            target.append(row[key])
    if not preds:
        raise DataError(f"{path}: empty predictions file (no records)")
    return preds, refs
