"""Canonical examples -> training sequences (`input_ids` + `labels`, -100 where no loss is taken).

Chat: every trained assistant turn is trained on exactly what the model sees and writes at
inference. For assistant turn k:

- its prompt P is the history rendered with `add_generation_prompt=True` (what `chat`, `serve`
  and `eval` feed the model), tokenized as `apply_chat_template` tokenizes it;
- its completion X is what the template writes for the turn after that prompt (see
  `_completion`): the answer, tool calls, reasoning as the template renders them, and the
  end-of-turn marker (`</s>`, `<|im_end|>`, ...), not the newline some templates put after it.

Where the template is prefix-consistent (the whole conversation starts with every turn's P + X),
all turns share one sequence, rendered once: the one-pass method. Where it is not (templates that
drop earlier turns' reasoning, open `<think>` in the generation prompt, move the system prompt
into the last user turn, ...), a turn that does not fit in a later turn's sequence gets its own
sequence: P + X, nothing after it. `train_on: last_turn` trains the last assistant turn only.
A token that straddles a turn's boundary also moves it to its own sequence (P and X tokenized
apart), so "the untrained prefix of every trained turn == its inference prompt, tokenized"
always holds. Needs no `{% generation %}` markers.

Reasoning (`reasoning_content` on an assistant turn) is given to the template under the keys
templates read (`reasoning_content`, `reasoning`, `thinking`). A template that renders none of
them gets it inline in the trained turn's content, wrapped in `reasoning_tags`
(`<think>\\nR\\n</think>\\n\\n`); earlier turns keep it only in those keys, so their reasoning
shows in the history exactly as the template shows it at inference.

Completion: only `completion` + EOS is trained. Text: every token, + EOS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from finetune.errors import DataError

IGNORE = -100
ENCODER_VERSION = 2  # bump on any change of the ids or labels encode() produces
TRAIN_ON = ("all_turns", "last_turn")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # what released templates read


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    note: str = ""  # why a record became several sequences (set on its first one), for the plan

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass(frozen=True)
class EncodeOptions:
    """How chat examples are encoded (part of the prepared-data cache key)."""

    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. {"enable_thinking": True}
    train_on: str = "all_turns"  # all_turns | last_turn
    reasoning_tags: tuple[str, str] = ("<think>", "</think>")  # inline reasoning where the template has none

    def __post_init__(self):
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        object.__setattr__(self, "reasoning_tags", tuple(self.reasoning_tags))

    def key(self) -> dict:
        return {
            "chat_template_kwargs": dict(self.chat_template_kwargs),
            "train_on": self.train_on,
            "reasoning_tags": list(self.reasoning_tags),
        }

    def wrap(self, reasoning: str) -> str:
        """Reasoning inline, for templates without reasoning support."""
        return f"{self.reasoning_tags[0]}\n{reasoning}\n{self.reasoning_tags[1]}\n\n"


# ----------------------------------------------------------------------------- rendering


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as templates read them: reasoning under every key a template may use."""
    out = []
    for m in messages:
        reasoning = m.get("reasoning_content")
        if reasoning:
            m = {**m, **{k: reasoning for k in REASONING_KEYS}}
        out.append(m)
    return out


class _Renderer:
    """apply_chat_template with the record's tools and the recipe's template kwargs; template
    failures become one-line DataErrors with the template's own message."""

    def __init__(self, tok, tools, options: EncodeOptions):
        self.tok, self.tools, self.options = tok, tools or None, options

    def __call__(self, messages: list[dict], generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(
                template_messages(messages),
                tools=self.tools,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **self.options.chat_template_kwargs,
            )
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            message = (str(e).strip().splitlines() or [""])[0]
            raise _TemplateFailure(
                f"the chat template cannot render this conversation: {type(e).__name__}: {message}"
            ) from None


class _TemplateFailure(DataError):
    pass


def fold_system(messages: list[dict]) -> list[dict]:
    """The system prompt folded into the first user turn (for templates without a system role,
    as Gemma's documentation advises): `system + "\\n\\n" + user`."""
    system, rest = messages[0], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": f"{system['content']}\n\n{m['content']}"}
            return rest
    return rest


# ----------------------------------------------------------------------------- one turn


@dataclass
class Turn:
    """Assistant turn `index`: its inference prompt, the completion the model writes after it,
    and the rendering of the conversation up to and including it."""

    index: int
    prompt: str
    completion: str
    rendered: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def _turn(render: _Renderer, messages: list[dict], k: int, options: EncodeOptions) -> Turn:
    history, turn = messages[:k], messages[k]
    prompt = render(history, generation_prompt=True)
    full = render(history + [turn])
    reasoning = turn.get("reasoning_content") or ""
    if reasoning and reasoning not in full[_common_prefix(prompt, full) :]:
        # the template does not write this turn's reasoning key: inline it in the turn, in reasoning_tags
        full = render(history + [{**_without_reasoning(turn), "content": options.wrap(reasoning) + turn["content"]}])
        if reasoning not in full:
            full = render(history + [turn])  # it strips inline reasoning too: _completion splices it
    completion = _completion(render, history, turn, prompt, full, reasoning, options, k)
    completion = completion.rstrip("\n")
    _check_turn(turn, completion, k)
    return Turn(k, prompt, completion, full)


def _without_reasoning(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "reasoning_content"}


def _completion(render, history, turn, prompt: str, full: str, reasoning: str, options: EncodeOptions, k: int) -> str:
    """What the template writes for the turn after its generation prompt.

    1. The rendering of history + turn starts with the generation prompt: the rest (the usual case).
    2. Else let c be where they part (moved back to the start of the token it falls in and out of any
       `<...>` / `[...]` marker, so a special token is written whole), `opener` the rest of the
       generation prompt and `rest` the rest of the finished rendering.
       a. The turn's reasoning, which the template drops, (or an empty think block, when it has
          none) wrapped in reasoning_tags and followed by `rest` starts with `opener`: what follows
          `opener` there. (A generation prompt that opens a think block: DeepSeek-R1 distills.)
       b. Else the finished rendering from i on, for the largest i (between c and where the turn's
          own text starts) such that the generation prompt ends with the finished text from c to i:
          i = c when the generation prompt pre-fills text the finished turn lacks (an empty think
          block when thinking is off); i later when the history renders differently once the turn
          follows it (a system prompt moved into the last user turn, a tool result closed
          differently), after the turn header both end with.
       c. A turn with reasoning cannot be trained after this prompt when its reasoning is then not in
          its completion, or when the prompt pre-fills text (i = c) where the finished turn writes
          reasoning (the template's thinking mode is off, e.g. an empty think block): an error.
    """
    if full.startswith(prompt):
        return full[len(prompt) :]
    c = _token_start(render.tok, full, _common_prefix(prompt, full))
    opener, rest = prompt[c:], full[c:]
    dropped = reasoning and reasoning not in rest
    if dropped or not reasoning:
        spliced = options.wrap(reasoning) + rest
        if spliced.startswith(opener):
            return spliced[len(opener) :]
    variant = {**_without_reasoning(turn), "content": "\u2063" + turn["content"] + "\u2063"}
    own = max(c, _common_prefix(full, render(history + [variant])))
    i = max(i for i in range(c, own + 1) if opener.endswith(full[c:i]))
    completion = full[i:]
    if reasoning and (reasoning not in completion or (i == c and opener.strip())):
        raise DataError(
            f"assistant turn {k}: the chat template's generation prompt ends with {opener[-40:]!r}, "
            "after which this turn's reasoning cannot be written (is the template's thinking mode off? "
            "see model.chat_template_kwargs, "
            "e.g. {enable_thinking: true})"
        )
    return completion


def _token_start(tok, text: str, pos: int) -> int:
    """The start of the token of `text` that holds character `pos`, and never inside a `<...>` or
    `[...]` marker (a tokenizer that does not know the template's special tokens splits them)."""
    for start, end in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]:
        if start <= pos < end:
            pos = start
            break
    for opening, closing in ("<>", "[]"):
        i = text.rfind(opening, 0, pos)
        if i >= 0 and closing not in text[i:pos] and "\n" not in text[i:pos]:
            pos = i
    return pos


def _check_turn(turn: dict, completion: str, k: int) -> None:
    """The completion holds the turn's answer and tool calls (else the template dropped them)."""
    content = turn["content"].strip()
    if turn.get("reasoning_content") and turn["reasoning_content"].strip() not in completion:
        raise DataError(
            f"assistant turn {k}: the chat template drops this turn's reasoning, even written inline in "
            "data.reasoning_tags; train without it, or with a template that writes reasoning"
        )
    if content and content not in completion:
        raise DataError(
            f"assistant turn {k}: the chat template does not write the answer where this turn is generated"
        )
    for call in turn.get("tool_calls") or []:
        if call["function"]["name"] not in completion:
            raise DataError(
                f"assistant turn {k}: the chat template does not render tool calls "
                f"(function {call['function']['name']!r} is not in the turn)"
            )


# ----------------------------------------------------------------------------- sequences


@dataclass
class _Sequence:
    text: str
    turns: list[Turn]


def _tokenize(tok, text: str, offsets: bool = False):
    return tok(text, add_special_tokens=False, return_offsets_mapping=offsets)


def _encode_sequence(tok, seq: _Sequence) -> tuple[Encoded, list[Turn]]:
    """One pass over the sequence's text; the turns whose boundaries a token straddles (their prompt
    or completion would tokenize differently than at inference) are returned, not trained here."""
    enc = _tokenize(tok, seq.text, offsets=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts: dict[int, int] = {}
    for i, (s, e) in enumerate(offsets):
        if e > s:
            starts.setdefault(s, i)
    starts[len(seq.text)] = len(ids)
    labels, misfits = [IGNORE] * len(ids), []
    for turn in seq.turns:
        i, j = starts.get(len(turn.prompt)), starts.get(len(turn.text))
        ok = (
            i is not None
            and j is not None
            and ids[:i] == _tokenize(tok, turn.prompt)["input_ids"]
            and ids[i:j] == _tokenize(tok, turn.completion)["input_ids"]
        )
        if not ok:
            misfits.append(turn)
            continue
        labels[i:j] = ids[i:j]
    return Encoded(ids, labels), misfits


def _alone(tok, turn: Turn) -> Encoded:
    prompt_ids = _tokenize(tok, turn.prompt)["input_ids"]
    completion_ids = _tokenize(tok, turn.completion)["input_ids"]
    return Encoded(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids)


def encode_chat(
    tok, messages: list[dict], tools: list[dict] | None = None, options: EncodeOptions | None = None
) -> list[Encoded]:
    options = options or EncodeOptions()
    render = _Renderer(tok, tools, options)
    note = ""
    try:
        turns = _turns(render, messages, options)
    except _TemplateFailure as failure:
        if messages[0]["role"] != "system":
            raise
        try:
            messages = fold_system(messages)
            turns = _turns(render, messages, options)
        except _TemplateFailure:
            raise failure from None
        note = f"system prompt folded into the first user turn ({failure})"

    # Fewest sequences: each turn joins a later turn's sequence when that one starts with it.
    sequences: list[_Sequence] = []
    for turn in reversed(turns):
        home = next((s for s in sequences if s.text.startswith(turn.text)), None)
        if home is None:
            if sequences and not note:
                note = (
                    f"assistant turn {turn.index} renders differently once later turns follow it, so it is "
                    "trained in a sequence of its own"
                )
            sequences.append(_Sequence(turn.rendered if turn.rendered.startswith(turn.text) else turn.text, []))
            home = sequences[-1]
        home.turns.append(turn)
    out: list[tuple[int, Encoded]] = []
    for seq in sequences:
        enc, misfits = _encode_sequence(tok, seq)
        if enc.n_trained:
            out.append((min(t.index for t in seq.turns if t not in misfits), enc))
        for turn in misfits:
            note = note or f"a token straddles the prompt/answer boundary of assistant turn {turn.index}"
            out.append((turn.index, _alone(tok, turn)))
    encoded = [e for _, e in sorted(out, key=lambda p: p[0])]
    if len(encoded) > 1 or note:
        encoded[0].note = note
    return encoded


def _turns(render: _Renderer, messages: list[dict], options: EncodeOptions) -> list[Turn]:
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if options.train_on == "last_turn":
        indices = indices[-1:]
    return [_turn(render, messages, k, options) for k in indices]


# ----------------------------------------------------------------------------- other kinds


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


def encode(
    tok, example: dict, max_length: int | None = None, *, options: EncodeOptions | None = None
) -> list[Encoded]:
    """The training sequences of one canonical example (a chat may give several); each keeps its
    start when it is longer than `max_length`."""
    if "messages" in example:
        encoded = encode_chat(tok, example["messages"], example.get("tools"), options)
    elif "prompt" in example:
        encoded = [encode_completion(tok, example["prompt"], example["completion"])]
    else:
        encoded = [encode_text(tok, example["text"])]
    if max_length is not None:
        encoded = [
            replace(e, input_ids=e.input_ids[:max_length], labels=e.labels[:max_length], truncated=True)
            if len(e.input_ids) > max_length
            else e
            for e in encoded
        ]
    return encoded


def options_of(recipe) -> EncodeOptions:
    """The encode options a recipe asks for."""
    return EncodeOptions(
        chat_template_kwargs=dict(recipe.model.chat_template_kwargs),
        train_on=recipe.data.train_on,
        reasoning_tags=tuple(recipe.data.reasoning_tags),
    )
