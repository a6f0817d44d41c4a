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

An assistant turn with `weight: 0` (OpenAI's fine-tuning format) is context only: never trained.

Completion: only `completion` + EOS is trained. Text: every token, + EOS.

With a max_length, a huge record is cut before it is tokenized (`bounded`), to a length that cannot
change its first max_length tokens: memory follows max_length, not the record's size.
"""

from __future__ import annotations

import bisect
import os
import weakref
from dataclasses import dataclass, field, replace

from finetune.errors import DataError

IGNORE = -100
ENCODER_VERSION = 3  # bump on any change of the ids or labels encode() produces
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
    """Messages as templates read them: reasoning under every key a template may use (and no `weight`)."""
    out = []
    for m in messages:
        if "weight" in m:
            m = {k: v for k, v in m.items() if k != "weight"}
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


def _backend(tok):
    """The tokenizers-library tokenizer behind `tok`, where calling it directly gives what
    `tok(texts, add_special_tokens=False)` gives (no truncation or padding set on it), without the
    per-text conversion into a BatchEncoding (a fifth of the encoder's time)."""
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is None or backend.truncation or backend.padding:
        return None
    if backend.encode_special_tokens != bool(getattr(tok, "split_special_tokens", False)):
        return None
    return backend


def _tokenize(tok, texts: list[str], offsets: bool = False) -> tuple[list[list[int]], list | None]:
    """Token ids (and character offsets) of each text, no special tokens added."""
    if not texts:
        return [], []
    backend = _backend(tok)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings] if offsets else None
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return enc["input_ids"], enc["offset_mapping"] if offsets else None


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return _tokenize(tok, texts)[0]


class _Anchors:
    """Added tokens (`<|im_start|>`, `<|eot_id|>`, ...) at which a tokenizer cuts its input into
    pieces that it normalizes, pre-tokenizes and tokenizes independently (the tokenizers library
    does this before anything else). Tokenizing a prefix of a rendered chat then only needs the
    part after its last anchor: the text before is tokenized as it is in the whole. The window
    starts *at* the anchor, so the piece after it is never at offset 0 (where some pre-tokenizers
    prepend a space marker). Anchors are the added tokens matched on the raw text (not normalized)
    that strip no whitespace around them; a tokenizer without the fast backend has none.

    The first CHECKED sequences of each process are also checked in full, and a tokenizer whose
    windows ever disagree with the full check is checked in full from then on."""

    CHECKED = 16
    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, tok):
        self.ids = frozenset(
            i
            for i, t in (tok.added_tokens_decoder.items() if getattr(tok, "is_fast", False) else ())
            if not any(getattr(t, flag, False) for flag in ("lstrip", "rstrip", "single_word", "normalized"))
        )
        self.checked = 0

    @classmethod
    def of(cls, tok) -> _Anchors:
        try:
            found = cls._of.get(tok)
            if found is None:
                found = cls._of[tok] = cls(tok)
            return found
        except TypeError:  # not weak-referenceable
            return cls(tok)


@dataclass
class _Check:
    """Token ids of the sequence's `ids[lo:hi]` must equal the tokenization of `text`."""

    text: str
    lo: int
    hi: int


def _boundary_checks(seq: _Sequence, ids: list[int], offsets, i: int, j: int, turn: Turn, anchors: list[int]):
    """The checks that prove `ids[:i]` == tokenize(prompt) and `ids[i:j]` == tokenize(completion),
    given the anchors (sorted indices of anchor tokens in ids)."""
    b, e = len(turn.prompt), len(turn.text)
    n = bisect.bisect_left(anchors, i)  # anchors[:n] lie before the prompt's end
    checks = [_Check(seq.text[offsets[anchors[n - 1]][0] : b], anchors[n - 1], i) if n else _Check(turn.prompt, 0, i)]
    inside = anchors[n : bisect.bisect_left(anchors, j)]
    if not inside:
        return checks + [_Check(turn.completion, i, j)]
    first, last = inside[0], inside[-1]
    if first > i:  # the completion's head, before its first anchor, is at offset 0 alone and in the completion
        checks.append(_Check(seq.text[b : offsets[first][0]], i, first))
    if last < j - 1:  # its tail, after its last anchor
        checks.append(_Check(seq.text[offsets[last][0] : e], last, j))
    return checks


def _encode_sequences(tok, sequences: list[_Sequence]) -> tuple[list[tuple[Encoded, list[Turn]]], dict]:
    """Each sequence's text in one pass; a turn is trained where its prompt tokenizes to exactly the
    tokens before its answer and its completion to exactly the answer's tokens. The turns whose
    boundaries a token straddles (their prompt or completion would tokenize differently than at
    inference) are returned with each result, not trained there, and their prompt and completion
    ids (by id of the turn) where they were tokenized."""
    all_ids, all_offsets = _tokenize(tok, [s.text for s in sequences], offsets=True)
    anchor_ids = _Anchors.of(tok)
    in_full = len(sequences) if not anchor_ids.ids else max(0, _Anchors.CHECKED - anchor_ids.checked)
    anchor_ids.checked += in_full  # the first sequences are checked in full as well (see _Anchors)
    plans = []  # (sequence index, turn, i, j, window checks)
    for n, seq in enumerate(sequences):
        ids, offsets = all_ids[n], all_offsets[n]
        anchors = [k for k, t in enumerate(ids) if t in anchor_ids.ids]
        starts: dict[int, int] = {}
        for k, (s, e) in enumerate(offsets):
            if e > s:
                starts.setdefault(s, k)
        starts[len(seq.text)] = len(ids)
        for turn in seq.turns:
            i, j = starts.get(len(turn.prompt)), starts.get(len(turn.text))
            if i is not None and j is not None and anchor_ids.ids:
                plans.append((n, turn, i, j, _boundary_checks(seq, ids, offsets, i, j, turn, anchors)))
            else:
                plans.append((n, turn, i, j, None))
    window_ids = iter(_ids(tok, [c.text for *_, checks in plans for c in checks or ()]))
    full, verdicts = [], {}
    for n, turn, i, j, checks in plans:
        ids = all_ids[n]
        verdicts[id(turn)] = checks is not None and all(ids[c.lo : c.hi] == next(window_ids) for c in checks)
        if i is not None and j is not None and (n < in_full or not verdicts[id(turn)]):
            full.append((n, turn, i, j))  # checked in full too, and a window that refused is settled in full
    full_ids = iter(_ids(tok, [t for _, turn, *_ in full for t in (turn.prompt, turn.completion)]))
    tokenized = {}
    for n, turn, i, j in full:
        ids, prompt_ids, completion_ids = all_ids[n], next(full_ids), next(full_ids)
        exact = ids[:i] == prompt_ids and ids[i:j] == completion_ids
        if anchor_ids.ids and exact != verdicts[id(turn)]:
            anchor_ids.ids = frozenset()  # the windows are wrong for this tokenizer: full checks only
        verdicts[id(turn)] = exact
        tokenized[id(turn)] = (prompt_ids, completion_ids)
    results = [(Encoded(ids, [IGNORE] * len(ids)), []) for ids in all_ids]
    for n, turn, i, j, _ in plans:
        encoded, misfits = results[n]
        if verdicts[id(turn)]:
            encoded.labels[i:j] = all_ids[n][i:j]
        else:
            misfits.append(turn)
    return results, tokenized


def _alone(tok, turns: list[Turn], known: dict) -> list[Encoded]:
    """Each turn as a sequence of its own: its prompt and its completion tokenized apart (`known`
    holds those the boundary checks tokenized already, by id of the turn)."""
    ids = iter(_ids(tok, [t for turn in turns if id(turn) not in known for t in (turn.prompt, turn.completion)]))
    out = []
    for turn in turns:
        prompt_ids, completion_ids = known.pop(id(turn), None) or (next(ids), next(ids))
        out.append(Encoded(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids))
    return out


@dataclass
class _ChatPlan:
    """A chat's turns, grouped into the fewest sequences (before tokenization)."""

    sequences: list[_Sequence]
    note: str = ""


def _plan_chat(tok, messages: list[dict], tools: list[dict] | None, options: EncodeOptions) -> _ChatPlan:
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
    return _ChatPlan(sequences, note)


def _encode_plans(tok, plans: list[_ChatPlan]) -> list[list[Encoded]]:
    """Many chats' sequences tokenized together (a tokenizer call costs more than one turn's tokens)."""
    results, tokenized = _encode_sequences(tok, [seq for plan in plans for seq in plan.sequences])
    results = iter(results)
    chats = []
    for plan in plans:
        chats.append([(seq, *next(results)) for seq in plan.sequences])
    alone = iter(_alone(tok, [turn for chat in chats for _, _, misfits in chat for turn in misfits], tokenized))
    out = []
    for plan, chat in zip(plans, chats):
        note, encoded = plan.note, []
        for seq, enc, misfits in chat:
            if enc.n_trained:
                encoded.append((min(t.index for t in seq.turns if t not in misfits), enc))
            for turn in misfits:
                note = note or f"a token straddles the prompt/answer boundary of assistant turn {turn.index}"
                encoded.append((turn.index, next(alone)))
        encoded = [e for _, e in sorted(encoded, key=lambda p: p[0])]
        if len(encoded) > 1 or note:
            encoded[0].note = note
        out.append(encoded)
    return out


def encode_chat(
    tok, messages: list[dict], tools: list[dict] | None = None, options: EncodeOptions | None = None
) -> list[Encoded]:
    return _encode_plans(tok, [_plan_chat(tok, messages, tools, options or EncodeOptions())])[0]


def _turns(render: _Renderer, messages: list[dict], options: EncodeOptions) -> list[Turn]:
    # `weight: 0` (OpenAI's fine-tuning format): the turn is context only, never trained
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
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
    return encode_many(tok, [example], max_length, options=options)[0]


def encode_many(
    tok,
    examples: list[dict],
    max_length: int | None = None,
    *,
    options: EncodeOptions | None = None,
    where: list[str] | None = None,
) -> list[list[Encoded]]:
    """`encode` of each example, with the chats' tokenizer calls shared; a bad example's error
    starts with its `where` (file and line)."""
    options = options or EncodeOptions()
    encoded: list[list[Encoded] | None] = [None] * len(examples)
    chats: dict[int, _ChatPlan] = {}
    budget = char_budget(tok, max_length) if max_length is not None else None
    for n, example in enumerate(examples):
        if budget is not None:
            example = bounded(example, budget, options.train_on)
        try:
            if "messages" in example:
                chats[n] = _plan_chat(tok, example["messages"], example.get("tools"), options)
            elif "prompt" in example:
                encoded[n] = [encode_completion(tok, example["prompt"], example["completion"])]
            else:
                encoded[n] = [encode_text(tok, example["text"])]
        except DataError as e:
            raise DataError(f"{where[n]}: {e}" if where else str(e)) from None
    for n, chat in zip(chats, _encode_plans(tok, list(chats.values()))):
        encoded[n] = chat
    if max_length is None:
        return encoded
    return [
        [
            replace(e, input_ids=e.input_ids[:max_length], labels=e.labels[:max_length], truncated=True)
            if len(e.input_ids) > max_length
            else e
            for e in sequences
        ]
        for sequences in encoded
    ]


# ----------------------------------------------------------------------------- huge records

_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def char_budget(tok, max_length: int) -> int:
    """A number of characters that always tokenizes to more than `max_length` tokens: no token covers
    more characters than the longest vocabulary entry (x2 for normalizers that join characters)."""
    try:
        longest = _LONGEST_TOKEN.get(tok)
    except TypeError:
        longest = None
    if longest is None:
        longest = max((len(t) for t in tok.get_vocab()), default=1)
        try:
            _LONGEST_TOKEN[tok] = longest
        except TypeError:
            pass
    return 2 * (max_length + 1) * max(longest, 1) + 64


def _clip(text, budget: int):
    return text[:budget] if isinstance(text, str) and len(text) > budget else text


def bounded(example: dict, budget: int, train_on: str = "all_turns") -> dict:
    """The example with every text cut to `budget` characters (see `char_budget`), and, for
        train_on=all_turns, the turns after the first `budget` characters of the conversation dropped (once
    it has an assistant turn, so that a record too long to train still gives its one dropped sequence):
        none of it can reach the first max_length tokens, so the truncated sequences are the same, but a
        20 MB record costs memory in proportion to max_length, not to its size. (With last_turn the last
        turn is the one trained, so the conversation keeps its turns.)"""
    if "messages" not in example:
        return {k: _clip(v, budget) for k, v in example.items()}
    messages, total = [], 0
    for m in example["messages"]:
        if total > budget and train_on == "all_turns" and any(k["role"] == "assistant" for k in messages):
            break
        m = {k: _clip(v, budget) for k, v in m.items()}
        total += sum(len(v) for v in m.values() if isinstance(v, str))
        messages.append(m)
    if messages == example["messages"]:
        return example
    return {**example, "messages": messages}


def options_of(recipe) -> EncodeOptions:
    """The encode options a recipe asks for."""
    return EncodeOptions(
        chat_template_kwargs=dict(recipe.model.chat_template_kwargs),
        train_on=recipe.data.train_on,
        reasoning_tags=tuple(recipe.data.reasoning_tags),
    )
