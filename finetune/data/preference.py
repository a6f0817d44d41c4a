"""Preference, KTO and prompt-only record formats -> TRL's conversational examples.

Every format becomes one of (the chat template applies to all of them, as in SFT's chat formats):
- pair:   `{"prompt": [messages ending with a user turn], "chosen": [assistant turn], "rejected": [assistant turn]}`
- kto:    `{"prompt": [...], "completion": [assistant turn], "label": bool}`
- prompt: `{"prompt": [...]}` plus the record's other scalar fields (e.g. `answer`, for rule rewards)

The TRL trainers tokenise these themselves (prompt rendered with `add_generation_prompt=True`,
the answer = the rest of the rendered conversation, end-of-turn included), so RM, DPO, KTO,
ORPO and CPO all see exactly the text SFT trained on. Plain-string prompts and answers are
single user / assistant turns. Errors name the record and the field.
"""

from __future__ import annotations

from finetune.data import images as image_refs
from finetune.data.chat_formats import MESSAGE_ROLES, SHAREGPT_ROLES, TAGS, _check_chat, _Fields, _turns

FIELDS = {
    "preference": ("prompt", "chosen", "rejected", "system", "images", *TAGS),
    "alpaca_preference": ("instruction", "input", "chosen", "rejected", "system", "history", "images"),
    "sharegpt_preference": ("conversations", "from", "value", "chosen", "rejected", "system", "images", *TAGS),
    "kto": ("prompt", "input", "completion", "label", "system", *TAGS),
    "prompt": ("prompt", "system", *TAGS),
}
PAIR_FORMATS = ("preference", "alpaca_preference", "sharegpt_preference")
_ROLES = {r: r for r in MESSAGE_ROLES}


def _messages(f: _Fields, field: str, value) -> list[dict]:
    """An OpenAI message list, checked."""
    if not isinstance(value, list) or not value:
        raise f.error(field, "expected a string or a non-empty list of messages")
    return _turns(f, field, "role", "content", _ROLES, value=value)


def _prompt(f: _Fields, field: str, value, system: str | None = None, parsed: bool = False) -> list[dict]:
    """The prompt side: a string or a message list (`parsed`: canonical messages already)."""
    if parsed:
        msgs = list(value)
    elif isinstance(value, str):
        if not value.strip():
            raise f.error(field, "empty prompt")
        msgs = [{"role": "user", "content": value}]
    else:
        msgs = _messages(f, field, value)
    if system and system.strip() and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    body = [m for m in msgs if m["role"] != "system"]
    if not body or not any(isinstance(m["content"], list) or m["content"].strip() for m in body):
        raise f.error(field, "empty prompt")
    if msgs[-1]["role"] != "user":
        raise f.error(field, f"the prompt must end with a user turn, not {msgs[-1]['role']}")
    _check_chat(msgs + [{"role": "assistant", "content": "x"}], f, field)  # order rules of a chat
    return msgs


def _answer(f: _Fields, field: str, value) -> list[dict]:
    """A string, one assistant message, or a list of messages ending with an assistant turn."""
    if value is None:
        raise f.error(field, "missing")
    if isinstance(value, dict):
        value = [value]
    role_key = f.tagged(f.name("from"), f.name("value"), SHAREGPT_ROLES)[0]
    if isinstance(value, list) and value and all(isinstance(t, dict) and role_key in t for t in value):
        msgs = _turns(f, field, f.name("from"), f.name("value"), SHAREGPT_ROLES, value=value)
    elif isinstance(value, str):
        msgs = [{"role": "assistant", "content": value}]
    else:
        msgs = _messages(f, field, value)
    if msgs[-1]["role"] != "assistant":
        raise f.error(field, f"must end with an assistant turn, not {msgs[-1]['role']}")
    if not msgs[-1]["content"].strip():
        raise f.error(field, "empty answer")
    return msgs


def _pair(f: _Fields, prompt: list[dict], chosen, rejected) -> dict:
    n_prompt_images = len(f.images)
    chosen, rejected = _answer(f, "chosen", chosen), _answer(f, "rejected", rejected)
    if len(f.images) > n_prompt_images:
        raise f.error("chosen", "an image in an answer (images go in the prompt's user turns)")
    if chosen == rejected:
        raise f.error("rejected", "identical to chosen (a pair must differ)")
    return _with_images(f, {"prompt": prompt, "chosen": chosen, "rejected": rejected})


def _with_images(f: _Fields, example: dict) -> dict:
    """A pair whose prompt shows images: its `images` (references, in the order of the prompt's image parts),
    from content parts or from an `images` column with one `<image>` per image in the prompt's text (as SFT's
    chat formats read them, finetune.data.images)."""
    column = f.get("images", required=False) if "images" in FIELDS.get(f.fmt, ()) else None
    if f.images:
        if column:
            raise f.error("images", "images given both in content parts and in an images column (keep one)")
        return {**example, "images": list(f.images)}
    if column is None:
        return example
    placed = image_refs.with_placeholders(
        {"messages": example["prompt"]}, column, f.record.root, f.record.where, f.name("images")
    )
    if "images" not in placed:
        return example
    return {**example, "prompt": placed["messages"], "images": placed["images"]}


def _split_shared_prefix(f: _Fields, chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list, list]:
    """Implicit prompt: the longest common prefix of two conversations, cut before an assistant turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] != "user":
        n -= 1
    if n == 0:
        raise f.error(
            "chosen", "chosen and rejected share no prompt (no common user turn) and there is no 'prompt' field"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def preference(f: _Fields) -> dict:
    chosen, rejected = f.get("chosen"), f.get("rejected")
    raw_prompt, system = f.get("prompt", required=False), f.text("system", required=False)
    if raw_prompt is None:  # implicit prompt: two whole conversations sharing their start
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise f.error("prompt", "missing (only message-list pairs may leave the prompt implicit)")
        prompt, chosen, rejected = _split_shared_prefix(
            f, _messages(f, "chosen", chosen), _messages(f, "rejected", rejected)
        )
        if not chosen or not rejected:
            raise f.error("rejected", "identical to chosen (a pair must differ)")
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            raise f.error("chosen", "after the shared prompt, chosen and rejected must start with an assistant turn")
        prompt = _prompt(f, "chosen", prompt, system, parsed=True)
    else:
        prompt = _prompt(f, "prompt", raw_prompt, system)
    return _pair(f, prompt, chosen, rejected)


def alpaca_preference(f: _Fields) -> dict:
    from finetune.data.chat_formats import alpaca

    # The alpaca converter builds the prompt side (system, history, instruction + input); the
    # answer it needs is only a placeholder here.
    chat = alpaca(_WithOutput(f))["messages"][:-1]
    return _pair(f, chat, f.get("chosen"), f.get("rejected"))


class _WithOutput(_Fields):
    """Reads `output` as a placeholder so the alpaca converter can build the prompt side."""

    def __init__(self, f: _Fields):
        super().__init__(f.record, f.columns)

    def get(self, field, required=True):
        return "placeholder" if field == "output" else super().get(field, required)


def sharegpt_preference(f: _Fields) -> dict:
    turns = _turns(f, "conversations", f.name("from"), f.name("value"), SHAREGPT_ROLES)
    return _pair(
        f,
        _prompt(f, "conversations", turns, f.text("system", required=False), parsed=True),
        f.get("chosen"),
        f.get("rejected"),
    )


def _label(f: _Fields) -> bool:
    value = f.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV
        return value.strip().lower() == "true"
    raise f.error("label", f"expected true (desirable) or false (undesirable), got {value!r}")


def kto(f: _Fields) -> dict:
    raw, completion = f.get("prompt"), f.get("completion", required=False)
    extra = f.text("input", required=False)
    if isinstance(raw, str) and extra and extra.strip():  # LLaMA-Factory's alpaca KTO: instruction + input
        raw = f"{raw}\n{extra}"
    system = f.text("system", required=False)
    if completion is None and isinstance(raw, list) and raw:  # one conversation: its last turn is the completion
        turns = _messages(f, "prompt", raw)
        if turns[-1]["role"] != "assistant":
            raise f.error("completion", "missing (or end the prompt's conversation with the assistant turn)")
        if not turns[-1]["content"].strip():
            raise f.error("prompt", "empty answer in the last turn")
        return {
            "prompt": _prompt(f, "prompt", turns[:-1], system, parsed=True),
            "completion": turns[-1:],
            "label": _label(f),
        }
    prompt = _prompt(f, "prompt", raw, system)
    return {"prompt": prompt, "completion": _answer(f, "completion", completion), "label": _label(f)}


def prompt(f: _Fields) -> dict:
    out = {"prompt": _prompt(f, "prompt", f.get("prompt"), f.text("system", required=False))}
    used = {f.name(k) for k in FIELDS["prompt"]}
    for key, value in f.record.data.items():  # extra columns (e.g. a reference answer) for reward functions
        if key not in used and isinstance(value, (str, int, float, bool)):
            out[key] = value
    return out


CONVERTERS = {
    "preference": preference,
    "alpaca_preference": alpaca_preference,
    "sharegpt_preference": sharegpt_preference,
    "kto": kto,
    "prompt": prompt,
}
# Checked before the SFT formats' own signatures (most specific first).
GUESSES = (
    ("sharegpt_preference", {"conversations", "chosen", "rejected"}),
    ("alpaca_preference", {"instruction", "chosen", "rejected"}),
    ("preference", {"chosen", "rejected"}),
    ("kto", {"prompt", "completion", "label"}),
)


# ----------------------------------------------------------------------------- shape changes


def unpair(examples: list[dict]) -> list[dict]:
    """Pairs -> KTO examples: chosen is desirable, rejected undesirable
    (as trl.data_utils.unpair_preference_dataset)."""
    out = []
    for e in examples:
        out.append({"prompt": e["prompt"], "completion": e["chosen"], "label": True})
        out.append({"prompt": e["prompt"], "completion": e["rejected"], "label": False})
    return out


def prompt_only(example: dict) -> dict:
    """The prompt of any canonical example: what an RL stage generates from.
    Chat: the turns before the last assistant turn; completion: the raw prompt string."""
    if "messages" in example:
        msgs = example["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"prompt": msgs[:last]}
    if "prompt" in example:
        keep = {k: v for k, v in example.items() if k not in ("chosen", "rejected", "completion", "label")}
        return keep
    raise ValueError("a text example has no prompt")
