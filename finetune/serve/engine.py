"""`finetune serve`: an OpenAI-compatible HTTP server for finetune output dirs (and any model / PEFT adapter dir).

Why not `transformers serve` itself: its ModelManager loads a hub id or a plain model dir with
`from_pretrained` only, so it cannot take a PEFT adapter dir (of any method), a QLoRA adapter on its
4-bit base as trained, a chained output (a DPO adapter whose base is the SFT-merged copy), or several
adapters on one base chosen by the request's `model`; it runs one `generate` per request (no batching
unless continuous batching, which shares one generation config across all requests and bypasses a
PeftModel's prompt-learning forward), ignores `n`, has no API key, no body / max_tokens caps, and answers
malformed requests with 500s or FastAPI's `{"detail": ...}`. So this is FastAPI + uvicorn glue that reuses
what fits: our loader (finetune.loading: adapters, QLoRA bases, chained bases, safetensors only),
transformers' message conversion and streaming response parser (`ResponseParser`, the machinery behind
`tokenizer.parse_response`) for `reasoning_content` / `tool_calls`, and the `openai` package's response types.

Concurrent requests are batched: one worker thread takes whatever is queued, groups it by model/adapter
and sampling settings, and runs one left-padded `generate` per group (peft's `set_adapter` picks the
adapter). A stopping criterion follows every row: its own max_tokens, stop strings, EOS, a dropped stream.
"""

import asyncio
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from finetune import loading
from finetune.errors import FinetuneError
from finetune.generate import generate
from finetune.outputs import OutputDir, recorded_system_prompt

log = logging.getLogger("finetune")
API_KEY_ENV = "FINETUNE_API_KEY"
EXTRA_HINT = "pip install 'finetune[serve]'"


class ServeError(FinetuneError):
    """A serve option or dir that cannot be used."""


def require_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "openai"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ServeError(f"finetune serve needs {', '.join(missing)}: {EXTRA_HINT}")


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
        schema, keep = response_schema(tok)
        recipe = OutputDir(source.path).recipe_dict() if Path(source.path).is_dir() else {}
        kwargs = (recipe.get("model") or {}).get("chat_template_kwargs") or {}
        system = recorded_system_prompt(source.path) if Path(source.path).is_dir() else None
        served[served_name] = Served(served_name, source.path, model, tok, adapter, schema, keep, system, kwargs)
    return served


# ---------------------------------------------------------------- reasoning and tool calls

THINK_TAGS = ("think", "thinking", "reasoning", "thought")
TOOL_TAGS = ("tool_call", "function_call", "tool_calls")


def response_schema(tok) -> tuple[dict | None, frozenset]:
    """A transformers response template for this tokenizer: its own `response_template` when it has one,
    else one derived from the tags its chat template writes (`<think>...</think>`, `<tool_call>{json}</tool_call>`).
    None when the template writes neither: the answer is plain text. Also the ids of special tokens among
    those tags (decoding must keep them for the parser to see)."""
    own = getattr(tok, "response_template", None)
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    fields: dict[str, dict] = {}
    tags = []
    think = next((t for t in THINK_TAGS if f"<{t}>" in template and f"</{t}>" in template), None)
    if think:
        fields["reasoning_content"] = {"open": f"<{think}>", "close": f"</{think}>", "content": "text"}
        tags += [f"<{think}>", f"</{think}>"]
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
    group: str = ""  # rows of one seeded request run together, alone
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)
    done: bool = False
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
                self._route(self._parser.feed(delta))
            else:
                self._out("content", delta)

    def _finish(self, reason: str) -> bool:
        self.done = True
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

    def __init__(self, served: dict[str, Served], max_batch_size: int = 16, batch_window_s: float = 0.005):
        self.served = served
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.queue: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []  # rows per generate call, for tests and benchmarks
        self.thread = threading.Thread(target=self._loop, name="finetune-serve-engine", daemon=True)
        self.thread.start()

    def submit(self, rows: list[Row]) -> None:
        self.queue.put(rows)

    def close(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            pending = list(first)
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
            for batch in self._batches(pending):
                self._generate(batch)

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
                    r.emit(
                        ("error", f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    )


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tok.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids


# ---------------------------------------------------------------- the HTTP API


class APIError(Exception):
    """An OpenAI-style error response."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        500: "server_error",
        503: "server_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class Limits:
    max_tokens: int = 1024  # the cap, and the default when a request names none
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    max_batch_size: int = 16


def _request_models():
    """The request bodies the server accepts (pydantic, built on first use: fastapi's dependency)."""
    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="allow")
        type: Literal["text", "input_text", "output_text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[TextPart] | None = None
        tool_calls: list[dict] | None = None
        tool_call_id: str | None = None

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        n: int = Field(1, ge=1)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        tools: list[dict] | None = None
        chat_template_kwargs: dict | None = None

    class CompletionRequest(Common):
        prompt: str | list[str]

    return ChatRequest, CompletionRequest


def create_app(served: dict[str, Served], api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI app over loaded models; `engine` batches their generation."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    engine = Engine(served, max_batch_size=limits.max_batch_size)
    ChatRequest, CompletionRequest = _request_models()
    created = int(time.time())
    default_name = next(iter(served))

    app = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_request, exc):  # never a traceback to the client; the log has it
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                why = "missing API key (send Authorization: Bearer KEY)" if not given else "incorrect API key"
                return JSONResponse(APIError(401, why, code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    async def read_body(request: Request, schema):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            raise APIError(413, f"request body is {length} bytes; this server takes at most {limits.max_body_bytes}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"request body is over {limits.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise APIError(422, f"{where}: {err['msg']}", param=where) from None
        return body

    def pick(body) -> Served:
        name = body.model or default_name
        if name not in served:
            raise APIError(
                404,
                f"model {name!r} is not served here; see /v1/models (served: {', '.join(served)})",
                param="model",
                code="model_not_found",
            )
        return served[name]

    def sampling(body, target: Served, prompt_len: int) -> Sampling:
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and requested > limits.max_tokens:
            raise APIError(
                400, f"max_tokens: {requested} is over this server's cap of {limits.max_tokens}", param="max_tokens"
            )
        max_tokens = requested or limits.max_tokens
        room = target.max_positions
        if room is not None and prompt_len + (requested or 1) > room:
            raise APIError(
                400,
                f"the prompt ({prompt_len} tokens) plus max_tokens ({requested or 1}) is over the "
                f"model's context of {room} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        if room is not None:
            max_tokens = min(max_tokens, room - prompt_len)
        if body.n > limits.max_n:
            raise APIError(400, f"n: at most {limits.max_n}", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
        return Sampling(max_tokens, body.temperature, body.top_p, tuple(stop), body.seed)

    def render_chat(body, target: Served) -> tuple[str, list[int]]:
        from jinja2 import TemplateError
        from transformers.cli.serving.utils import BaseHandler, Modality

        given = [m.model_dump(exclude_none=True) for m in body.messages]
        if target.system and not any(m["role"] in ("system", "developer") for m in given):
            given = [{"role": "system", "content": target.system}, *given]  # as in training, chat and Ollama
        messages = BaseHandler.get_processor_inputs_from_messages(given, Modality.LLM)
        try:
            text = target.tokenizer.apply_chat_template(
                messages,
                tools=body.tools,
                add_generation_prompt=True,
                tokenize=False,
                **{**target.template_kwargs, **(body.chat_template_kwargs or {})},
            )
        except (TemplateError, TypeError, ValueError, KeyError) as e:
            raise APIError(
                400, f"the model's chat template refused these messages: {str(e).splitlines()[0]}", param="messages"
            ) from None
        return text, target.tokenizer(text, add_special_tokens=False)["input_ids"]

    def run(rows_for: list[tuple[str, list[int]]], target: Served, s: Sampling, n: int, chat: bool, seeded: bool):
        """Queue n rows per prompt; returns (per-choice asyncio queues, the rows)."""
        loop = asyncio.get_running_loop()
        queues, rows = [], []
        group = uuid.uuid4().hex if seeded else ""
        for text, ids in rows_for:
            for _ in range(n):
                q: asyncio.Queue = asyncio.Queue()

                def emit(item, q=q):
                    loop.call_soon_threadsafe(q.put_nowait, item)

                rows.append(Row(target, ids, text, s, emit, chat=chat, group=group))
                queues.append(q)
        engine.submit(rows)
        return queues, rows

    async def collect(q: asyncio.Queue) -> dict:
        out = {"content": [], "reasoning": [], "tool_calls": [], "finish": "stop", "tokens": 0}
        while True:
            item = await q.get()
            if item[0] == "done":
                out["finish"], out["tokens"] = item[1], item[2]
                return out
            if item[0] == "error":
                raise APIError(500, item[1])
            if item[0] == "tool_call":
                out["tool_calls"].append(item[1])
            else:
                out[item[0]].append(item[1])

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served)}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "finetune"} for n in served],
        }

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name not in served:
            raise APIError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
        return {"id": name, "object": "model", "created": created, "owned_by": "finetune"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from openai.types.chat import ChatCompletion, ChatCompletionChunk

        body = await read_body(request, ChatRequest)
        target = pick(body)
        text, ids = render_chat(body, target)
        s = sampling(body, target, len(ids))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        queues, rows = run([(text, ids)], target, s, body.n, chat=True, seeded=body.seed is not None)
        name = target.name
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _chat_stream(rid, name, queues, rows, len(ids), include_usage, ChatCompletionChunk),
                media_type="text/event-stream",
            )
        try:
            results = [await collect(q) for q in queues]
        except asyncio.CancelledError:
            for r in rows:
                r.cancelled.set()
            raise
        choices = []
        for i, r in enumerate(results):
            calls = [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in r["tool_calls"]
            ]
            message = {
                "role": "assistant",
                "content": "".join(r["content"]),
                "reasoning_content": "".join(r["reasoning"]).strip() or None,
                "tool_calls": calls or None,
            }
            finish = "tool_calls" if calls else _finish(r["finish"])
            choices.append({"index": i, "message": message, "finish_reason": finish})
        used = sum(r["tokens"] for r in results)
        response = ChatCompletion.model_validate(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used},
            }
        )
        return JSONResponse(response.model_dump(exclude_none=True))

    @app.post("/v1/completions")
    async def completions(request: Request):
        from openai.types import Completion

        body = await read_body(request, CompletionRequest)
        target = pick(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: empty list", param="prompt")
        encoded = [(p, target.tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
        s = sampling(body, target, max(len(ids) for _, ids in encoded))
        rid = f"cmpl-{uuid.uuid4().hex}"
        queues, rows = run(encoded, target, s, body.n, chat=False, seeded=body.seed is not None)
        n_prompt = sum(len(ids) for _, ids in encoded)
        if body.stream:
            return StreamingResponse(
                _completion_stream(rid, target.name, queues, rows, Completion), media_type="text/event-stream"
            )
        results = [await collect(q) for q in queues]
        used = sum(r["tokens"] for r in results)
        response = Completion.model_validate(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": target.name,
                "choices": [
                    {
                        "index": i,
                        "text": "".join(r["content"]),
                        "finish_reason": _finish(r["finish"]),
                        "logprobs": None,
                    }
                    for i, r in enumerate(results)
                ],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used},
            }
        )
        return JSONResponse(response.model_dump(exclude_none=True))

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _merged(queues: list[asyncio.Queue]):
    """(choice index, item) from several choices' queues as they come, until every one is done."""
    waiting = {asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = waiting.pop(fut)
                item = fut.result()
                yield i, item
                if item[0] not in ("done", "error"):
                    waiting[asyncio.ensure_future(queues[i].get())] = i
    finally:
        for fut in waiting:
            fut.cancel()


async def _chat_stream(rid, name, queues, rows, n_prompt, include_usage, Chunk):
    def sse(choices, usage=None) -> str:
        chunk = Chunk.model_validate(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": name,
                "choices": choices,
                "usage": usage,
            }
        )
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    calls = [0] * len(queues)
    used = 0
    try:
        for i in range(len(queues)):
            yield sse([{"index": i, "delta": {"role": "assistant", "content": ""}}])
        async for i, item in _merged(queues):
            kind = item[0]
            if kind == "content":
                yield sse([{"index": i, "delta": {"content": item[1]}}])
            elif kind == "reasoning":
                yield sse([{"index": i, "delta": {"reasoning_content": item[1]}}])
            elif kind == "tool_call":
                call = {
                    "index": calls[i],
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": item[1].name, "arguments": item[1].arguments},
                }
                calls[i] += 1
                yield sse([{"index": i, "delta": {"tool_calls": [call]}}])
            elif kind == "error":
                yield f"data: {json.dumps(APIError(500, item[1]).body())}\n\n"
            else:
                used += item[2]
                finish = "tool_calls" if calls[i] else _finish(item[1])
                yield sse([{"index": i, "delta": {}, "finish_reason": finish}])
        if include_usage:
            yield sse([], {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used})
        yield "data: [DONE]\n\n"
    finally:  # a client that went away stops its rows at the next token
        for r in rows:
            r.cancelled.set()


async def _completion_stream(rid, name, queues, rows, Completion):
    def sse(i, text, finish=None) -> str:
        chunk = Completion.model_validate(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": name,
                "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}],
            }
        )
        return f"data: {chunk.model_dump_json()}\n\n"

    try:
        async for i, item in _merged(queues):
            if item[0] == "content":
                yield sse(i, item[1])
            elif item[0] == "error":
                yield f"data: {json.dumps(APIError(500, item[1]).body())}\n\n"
            elif item[0] == "done":
                yield sse(i, "", _finish(item[1]))
        yield "data: [DONE]\n\n"
    finally:
        for r in rows:
            r.cancelled.set()


# ---------------------------------------------------------------- CLI


def parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ServeError(f"--adapter {spec}: expected NAME=DIR")
    if not re.fullmatch(r"[\w.:/-]+", name):
        raise ServeError(f"--adapter {spec}: the name may use letters, digits and _ . : / - only")
    return name, path


def run_cli(args) -> int:
    require_extra()
    import uvicorn

    from finetune.merge import quiet_progress

    quiet_progress()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning(
            "listening on %s without an API key: anyone who can reach it can use the model (set --api-key or %s)",
            args.host,
            API_KEY_ENV,
        )
    adapters = [parse_adapter(a) for a in args.adapter or []]
    served = load_served(args.model, adapters, name=args.name, base=args.base)
    limits = Limits(max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size)
    app = create_app(served, api_key=api_key, limits=limits)
    for s in served.values():
        log.info("serving %s (%s)", s.name, s.path)
    log.info(
        "OpenAI-compatible API at http://%s:%d/v1%s", args.host, args.port, " (API key required)" if api_key else ""
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
