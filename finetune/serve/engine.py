"""The generation side of `finetune serve`: what is served (models, adapters, their response schemas) and the
worker thread that batches generation.

Concurrent requests are batched: one worker thread takes whatever is queued, groups it by model/adapter
and sampling settings, and runs one left-padded `generate` per group (peft's `set_adapter` picks the
adapter). A stopping criterion follows every row: its own max_tokens, stop strings, EOS, a client gone.
If the thread itself dies, every waiting row gets an error and `on_death` is called (the CLI stops the
server with a non-zero exit): a server that accepts requests nobody will answer is worse than none.
"""

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune import image_inputs, loading
from finetune.data.chat_formats import DEFAULT_REASONING_TAGS
from finetune.generate import generate
from finetune.outputs import OutputDir, recorded_system_prompt
from finetune.serve.protocol import ServeError

log = logging.getLogger("finetune")


# ---------------------------------------------------------------- what is served


@dataclass
class Served:
    """One name the server answers to: a model (or a PeftModel with this adapter active) and its tokenizer."""

    name: str
    path: Path
    model: Any
    tokenizer: Any
    adapter: str | None  # peft adapter name to activate, None for a plain model
    schema: dict | None = None  # response template for reasoning / tool calls (None: plain text)
    keep_ids: frozenset = frozenset()  # special tokens that delimit reasoning / tool calls: kept when decoding
    system: str | None = None  # the system prompt it was trained with: used when a request brings none
    template_kwargs: dict = field(default_factory=dict)  # the recipe's model.chat_template_kwargs (request overrides)
    processor: Any = None  # a vision-language model's processor: renders requests with image parts

    @property
    def tool_open(self) -> str | None:
        """The literal tag that opens a tool call in this model's replies (`<tool_call>`), None if unknown."""
        close = ((self.schema or {}).get("fields") or {}).get("tool_calls", {}).get("close")
        return "<" + close[2:] if isinstance(close, str) and close.startswith("</") else None

    @property
    def reads_tool_calls(self) -> bool:
        return "tool_calls" in ((self.schema or {}).get("fields") or {})

    @property
    def max_positions(self) -> int | None:
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None)


def load_served(
    primary: str, adapters: list[tuple[str, str]] = (), name: str | None = None, base: str | None = None
) -> dict[str, Served]:
    """Load the primary dir and every `--adapter NAME=DIR`. Weight-space adapters that share a base (same
    path, same quantization) share one model: peft's multi-adapter, switched per batch."""
    specs = [(name or Path(primary).expanduser().resolve().name, primary, base), *[(n, d, None) for n, d in adapters]]
    names = [n for n, _, _ in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ServeError(
            f"--adapter: the name {dupes[0]!r} is used twice (the primary dir is named {names[0]!r}; "
            "--name renames it)"
        )
    shared: dict[tuple, Any] = {}
    served: dict[str, Served] = {}
    for i, (served_name, path, base_override) in enumerate(specs):
        what = "MODEL_OR_ADAPTER_DIR" if i == 0 else f"--adapter {served_name}"
        source = loading.inspect(path, base_override, what=what)
        internal = f"adapter{i}"  # peft adapter names become module keys: no dots, no user text
        if source.kind == "model":
            model, adapter = loading.load_inference_model(str(source.path), what), None
        elif source.is_prompt_learning:  # virtual tokens live in the PeftModel's forward: one model each
            model = loading.attach_adapter(loading.load_base(source), source, internal)
            adapter = internal
        else:
            key = (source.base, repr(source.quant))
            if key in shared:
                model = shared[key]
                loading.add_adapter(model, source, internal)
            else:
                model = loading.attach_adapter(loading.load_base(source), source, internal)
                shared[key] = model
            adapter = internal
        if torch.cuda.is_available() and source.quant is None and next(model.parameters()).device.type == "cpu":
            model.to("cuda")  # a quantized base is placed at load time
        tok = loading.load_tokenizer(source)
        processor = image_inputs.vision_processor(source)
        recipe = OutputDir(source.path).recipe_dict() if Path(source.path).is_dir() else {}
        # as `finetune chat` and training read it: the run's data.reasoning_tags, else the default
        tags = (recipe.get("data") or {}).get("reasoning_tags") or DEFAULT_REASONING_TAGS
        schema, keep = response_schema(tok, tuple(tags))
        kwargs = (recipe.get("model") or {}).get("chat_template_kwargs") or {}
        system = recorded_system_prompt(source.path) if Path(source.path).is_dir() else None
        served[served_name] = Served(
            served_name, source.path, model, tok, adapter, schema, keep, system, kwargs, processor
        )
    return served


# ---------------------------------------------------------------- reasoning and tool calls

THINK_TAGS = ("think", "thinking", "reasoning", "thought")
TOOL_TAGS = ("tool_call", "function_call", "tool_calls")


def response_schema(tok, reasoning_tags: tuple[str, str] | None = None) -> tuple[dict | None, frozenset]:
    """A transformers response template for this tokenizer: its own `response_template` when it has one,
    else one derived from the tags its chat template writes (`<think>...</think>`, `<tool_call>{json}</tool_call>`).
    A template that writes no reasoning tags reads reasoning in `reasoning_tags` (the run's
    data.reasoning_tags: how a reasoning recipe trains a model whose template has no reasoning support).
    None when there is nothing to read: the answer is plain text. Also the ids of special tokens among
    those tags (decoding must keep them for the parser to see)."""
    own = getattr(tok, "response_template", None)
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    fields: dict[str, dict] = {}
    tags = []
    think = next((t for t in THINK_TAGS if f"<{t}>" in template and f"</{t}>" in template), None)
    if think:
        fields["reasoning_content"] = {"open": f"<{think}>", "close": f"</{think}>", "content": "text"}
        tags += [f"<{think}>", f"</{think}>"]
    elif reasoning_tags:
        opening, closing = reasoning_tags
        fields["reasoning_content"] = {"open": opening, "close": closing, "content": "text"}
        tags += [opening, closing]
    tool = next((t for t in TOOL_TAGS if f"<{t}>" in template and f"</{t}>" in template), None)
    if tool:
        fields["tool_calls"] = {
            "open_pattern": rf"\s*<{tool}>",
            "close": f"</{tool}>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        }
        tags += [f"<{tool}>", f"</{tool}>"]
    vocab = tok.get_vocab()
    keep = frozenset(vocab[t] for t in tags if t in vocab and vocab[t] in set(tok.all_special_ids))
    if own is not None:
        return own, keep
    if not fields:
        return None, keep
    fields["content"] = {"content": "text"}
    # The parser is given the rendered prompt and starts reading after the last generation prompt, so a
    # template that opens `<think>` in the generation prompt is parsed as reasoning from the first token.
    anchor = _generation_prompt(tok, tags)
    start = {"start_anchor": anchor} if anchor else {"start_anchor_pattern": r"\Z"}  # else: nothing of the prompt
    return {"defaults": {"role": "assistant"}, **start, "fields": fields}, keep


def _generation_prompt(tok, tags: list[str]) -> str:
    """What `add_generation_prompt=True` appends, up to an opening tag (e.g. `<|im_start|>assistant\\n`);
    '' if unknown."""
    chat = [{"role": "user", "content": "x"}]
    try:
        with_prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        without = tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    except Exception:  # noqa: BLE001 - any template error: a template that needs more than a plain user turn
        return ""
    tail = with_prompt[len(without) :] if with_prompt.startswith(without) else ""
    for tag in tags:
        if tag in tail:
            tail = tail[: tail.index(tag)]
    return tail


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Row:
    """One sequence to generate (a request with n=3 is three rows) and where its output goes."""

    served: Served
    prompt_ids: list[int]
    prompt_text: str
    sampling: Sampling
    # called from the worker thread with ("content" | "reasoning", text), ("tool_call", ToolCall),
    # ("done", reason, n_tokens) or ("error", message)
    emit: Any
    chat: bool = True  # chat: reasoning / tool calls parsed, content stripped; completions: the raw text
    group: str = ""  # rows of one seeded request run together, alone; a row with images runs alone
    extra: dict = field(default_factory=dict)  # the processor's image inputs (pixel_values, ...) of a batch of one
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)
    done: bool = False
    reason: str = ""  # why it finished: stop, length, cancelled
    _text: str = ""
    _sent: int = 0
    _pending_ws: str = ""
    _started: bool = False
    _parser: Any = None

    def start(self) -> None:
        from transformers.utils.chat_parsing import ResponseParser

        if self.chat and self.served.schema is not None:
            self._parser = ResponseParser(self.served.schema, prefix=self.prompt_text)
            self._route(self._parser.initial_events)

    def step(self, token: int, eos: set[int]) -> bool:
        """Take one generated token; True when this row is finished."""
        if self.done:
            return True
        if self.cancelled.is_set():
            return self._finish("cancelled")
        if token in eos:
            return self._finish("stop")
        self.ids.append(token)
        tok = self.served.tokenizer
        keep = self.served.keep_ids
        visible = [i for i in self.ids if i not in self._skip] if keep else self.ids
        text = tok.decode(visible, skip_special_tokens=not keep)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return len(self.ids) >= self.sampling.max_tokens and self._finish("length")
        self._text = text
        for s in self.sampling.stop:
            cut = text.find(s)
            if cut >= 0:
                self._text = text[:cut]
                return self._finish("stop")
        if len(self.ids) >= self.sampling.max_tokens:
            return self._finish("length")
        hold = max((len(s) - 1 for s in self.sampling.stop), default=0)  # a stop string may be starting
        self._push(self._text[: len(self._text) - hold] if hold else self._text)
        return False

    @property
    def _skip(self) -> set[int]:
        return set(self.served.tokenizer.all_special_ids) - self.served.keep_ids

    def _push(self, upto: str) -> None:
        if len(upto) > self._sent:
            delta, self._sent = upto[self._sent :], len(upto)
            if self._parser is not None:
                try:
                    self._route(self._parser.feed(delta))
                except ValueError:  # a tool call that is not JSON: no valid call; the rest is plain text
                    self._parser = None
                    self._out("content", delta)
            else:
                self._out("content", delta)

    def _finish(self, reason: str) -> bool:
        self.done, self.reason = True, reason
        self._push(self._text)
        if self._parser is not None:
            try:
                _, events = self._parser.finalize()
            except (ValueError, RuntimeError):  # stopped inside a tool call: what was parsed stands
                events = []
            self._route(events)
        self.emit(("done", reason, len(self.ids)))
        return True

    def _route(self, events: list[dict]) -> None:
        from transformers.cli.serving.utils import ReasoningText, ToolCall, response_events_to_chunks

        for item in response_events_to_chunks(events):
            if isinstance(item, ToolCall):
                self.emit(("tool_call", item))
            elif isinstance(item, ReasoningText):
                self.emit(("reasoning", str(item)))
            else:
                self._out("content", item)

    def _out(self, kind: str, text: str) -> None:
        """Chat content without leading or trailing whitespace (as `finetune chat` prints it): trailing
        whitespace is held until more text follows it. Completions get the raw text."""
        if not self.chat:
            self.emit((kind, text))
            return
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        text = self._pending_ws + text
        body = text.rstrip()
        self._pending_ws = text[len(body) :]
        if body:
            self.emit((kind, body))


class _RowCriteria:
    """A per-row stopping criterion: feeds each new token to its Row (which streams it) and reports which
    rows are finished, so one slow or long row never holds the others' answers back."""

    def __init__(self, rows: list[Row], eos: set[int]):
        self.rows, self.eos = rows, eos

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].tolist()
        return torch.tensor([row.step(t, self.eos) for row, t in zip(self.rows, last)], device=input_ids.device)


class Engine:
    """The worker thread that owns the models: queued rows are batched per (model, adapter, sampling)."""

    def __init__(
        self,
        served: dict[str, Served],
        max_batch_size: int = 16,
        batch_window_s: float = 0.005,
        on_death=None,
    ):
        if max_batch_size < 1:
            raise ServeError(f"--max-batch-size: must be at least 1, got {max_batch_size}")
        self.served = served
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.on_death = on_death  # called (from the engine thread) with a one-line reason if the thread dies
        self.dead: str | None = None
        self.queue: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []  # rows per generate call, for tests and benchmarks
        self.finished: collections.Counter = collections.Counter()  # rows by finish reason, likewise
        self.thread = threading.Thread(target=self._run, name="finetune-serve-engine", daemon=True)
        self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        """Queue rows; on a dead engine they are answered with an error at once."""
        if self.dead is None:
            self.queue.put(rows)
        if self.dead is not None:  # died before or while queueing
            self._fail_queued()
            self._fail(rows)

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - whatever killed it: answer everyone, then tell the server
            self.dead = self.dead or f"the generation thread died: {type(e).__name__}: {_first_line(e)}"
            log.critical("%s", self.dead, exc_info=True)
            self._fail_queued()
            if self.on_death is not None:
                self.on_death(self.dead)

    def _fail(self, rows: list[Row]) -> None:
        for r in rows:
            if not r.done:
                r.done = True
                r.emit(("error", self.dead or "generation failed"))

    def _fail_queued(self) -> None:
        while True:
            try:
                rows = self.queue.get_nowait()
            except queue.Empty:
                return
            self._fail(rows or [])

    def _loop(self) -> None:
        pending: list[Row] = []
        while True:
            first = self.queue.get()
            if first is None:
                return
            pending[:] = first
            time.sleep(self.batch_window_s)  # let requests that arrive together batch together
            while True:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)
                    break
                pending += more
            try:
                for batch in self._batches(pending):
                    self._generate(batch)
                    self.finished.update(r.reason for r in batch if r.reason)
            except BaseException as e:
                self.dead = f"the generation thread died: {type(e).__name__}: {_first_line(e)}"
                self._fail(pending)
                raise

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            s = row.sampling
            key = (id(row.served.model), row.served.adapter, s.greedy, s.temperature, s.top_p, row.group)
            groups.setdefault(key, []).append(row)
        return [g[i : i + self.max_batch_size] for g in groups.values() for i in range(0, len(g), self.max_batch_size)]

    @torch.no_grad()
    def _generate(self, rows: list[Row]) -> None:
        served, s = rows[0].served, rows[0].sampling
        try:
            for row in rows:
                row.start()
            live = [r for r in rows if not r.cancelled.is_set()]
            for r in rows:
                if r.cancelled.is_set():
                    r.step(-1, set())
            if not live:
                return
            self.batch_sizes.append(len(live))
            model, tok = served.model, served.tokenizer
            if served.adapter is not None and hasattr(model, "set_adapter"):
                model.set_adapter(served.adapter)
            width = max(len(r.prompt_ids) for r in live)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            input_ids = torch.full((len(live), width), pad, dtype=torch.long)
            attention = torch.zeros((len(live), width), dtype=torch.long)
            for i, r in enumerate(live):  # left padding: every answer starts right after its prompt
                input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
                attention[i, width - len(r.prompt_ids) :] = 1
            eos = _eos_ids(model, tok)
            gen = {
                "max_new_tokens": max(r.sampling.max_tokens for r in live),
                "pad_token_id": pad,
                "do_sample": not s.greedy,
            }
            if s.greedy:
                gen.update(temperature=None, top_p=None, top_k=None)
            else:
                gen.update(temperature=s.temperature, top_p=s.top_p, top_k=None)
            if s.seed is not None:
                torch.manual_seed(s.seed)
            from transformers import StoppingCriteriaList

            device = next(model.parameters()).device
            if live[0].extra:  # image inputs: such a row is its own batch (app.py gives it its own group)
                gen.update(image_inputs.to_model(live[0].extra, model))
            generate(  # finetune.generate: prompt-tuning adapters right on every transformers version
                model,
                input_ids.to(device),
                attention.to(device),
                stopping_criteria=StoppingCriteriaList([_RowCriteria(live, eos)]),
                **gen,
            )
            for r in live:  # rows the criteria never finished (generate stopped at max_new_tokens)
                if not r.done:
                    r._finish("length")
        except Exception as e:  # a failed batch answers its requests with an error; the server goes on
            log.exception("generation failed")
            for r in rows:
                if not r.done:
                    r.done = True
                    r.emit(("error", f"generation failed: {type(e).__name__}: {_first_line(e)}"))


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tok.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids
