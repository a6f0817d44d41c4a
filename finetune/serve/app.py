"""The HTTP side of `finetune serve`: OpenAI's /v1/chat/completions, /v1/completions and /v1/models over
the engine, with every request bounded before it costs anything.

A request is read (body cap, strict schema, depth and Unicode checks: finetune.serve.protocol), its
prompts are rendered and tokenized in a small thread pool under a time budget (the event loop, and so
/health, never waits on a template), its size is checked (prompts x n, total tokens, context), and its
rows go to the engine. A non-streamed request whose client goes away is cancelled like a stream is.
`tool_choice` is honoured: `none` renders no tools; `required` and a named function open the tool call
in the prompt (the model continues it: `<tool_call>{"name": "f", "arguments": ` when one function is
meant). Each reply is then checked against the choice (none: no call; required / named: a call of an
allowed function with a JSON object of arguments); a reply that misses is sampled again (temperature > 0)
or refused with a 500 `tool_choice_not_met`, never passed off as honoured.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from finetune.image_inputs import has_images
from finetune.serve.engine import Engine, Row, Sampling, Served
from finetune.serve.protocol import (
    APIError,
    Limits,
    parse_json,
    request_images,
    request_models,
    template_kwargs,
    validation_error,
)

log = logging.getLogger("finetune")
RENDER_THREADS = 2
TOOL_CHOICE_TRIES = 3  # a sampled reply that misses a required tool call is drawn again, this often in all


@dataclass(frozen=True)
class ToolPolicy:
    """What a chat request's tools / tool_choice ask of the reply."""

    choice: str  # none, auto, required, or the named function
    render: bool  # the template is given the tools
    allowed: frozenset[str]  # the function names a call may use
    prefill: str = ""  # opens the tool call in the prompt (the model writes the rest)

    @property
    def required(self) -> bool:
        return self.choice not in ("none", "auto")

    def valid(self, call) -> bool:
        """May the reply hold this call?"""
        if self.choice == "none":
            return False
        try:
            args = json.loads(call.arguments)
        except (TypeError, ValueError):
            return False
        return call.name in self.allowed and isinstance(args, dict)

    def meets(self, result: dict | None) -> bool:
        if result is None:
            return False
        calls = result["tool_calls"]
        return all(self.valid(c) for c in calls) and (bool(calls) or not self.required)

    def unmet(self, i: int) -> str:
        if self.choice == "none":
            return f"tool_choice none: the model's reply (choice {i}) calls a tool anyway"
        return f"tool_choice {self.choice}: the model's reply (choice {i}) holds no valid call of " + " or ".join(
            sorted(self.allowed)
        )


def tool_policy(body, target: Served) -> ToolPolicy:
    tools = body.tools or []
    names = frozenset(t.function.name for t in tools)
    if body.tool_choice is None and not tools:  # a plain request: what the model writes is read as it is
        return ToolPolicy("auto", render=False, allowed=frozenset())
    choice = body.tool_choice or "auto"
    if choice == "none":
        return ToolPolicy("none", render=False, allowed=frozenset())
    if not tools:
        raise APIError(400, f"tool_choice {_choice_name(choice)!r} needs `tools`", param="tool_choice")
    if not target.reads_tool_calls:
        raise APIError(
            400,
            f"tools: model {target.name!r} cannot call tools here: its chat template writes no tool-call tags "
            "(e.g. <tool_call>) that the server could read back (send tool_choice: none to ignore tools)",
            param="tools",
        )
    if choice == "auto":
        return ToolPolicy("auto", render=True, allowed=names)
    if choice == "required" and len(names) > 1:
        return ToolPolicy("required", render=True, allowed=names, prefill=target.tool_open or "")
    name = next(iter(names)) if choice == "required" else choice.function.name
    if name not in names:
        raise APIError(400, f"tool_choice: function {name!r} is not among `tools`", param="tool_choice")
    opening = target.tool_open  # <tool_call>{"name": "f", "arguments":  (the derived schema's JSON form)
    prefill = f'{opening}{json.dumps({"name": name})[:-1]}, "arguments": ' if opening else ""
    return ToolPolicy(_choice_name(choice), render=True, allowed=frozenset({name}), prefill=prefill)


def _choice_name(choice) -> str:
    return choice if isinstance(choice, str) else choice.function.name


def create_app(
    served: dict[str, Served], api_key: str | None = None, limits: Limits | None = None, on_engine_death=None
):
    """The FastAPI app over loaded models; `app.state.engine` batches their generation. `on_engine_death`
    is called with a one-line reason if the generation thread dies (the CLI stops the server)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    engine = Engine(served, max_batch_size=limits.max_batch_size, on_death=on_engine_death)
    renderer = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="finetune-serve-render")
    ChatRequest, CompletionRequest = request_models()
    created = int(time.time())
    default_name = next(iter(served))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()
        renderer.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_RequireKey, api_key=api_key)

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

    async def read_body(request: Request, schema):
        if engine.dead:
            raise APIError(503, f"this server is stopping: {engine.dead}")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            raise APIError(413, f"request body is {length} bytes; this server takes at most {limits.max_body_bytes}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"request body is over {limits.max_body_bytes} bytes")
        data = parse_json(bytes(raw))
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e, data) from None

    async def off_loop(fn, *args):
        """fn(*args) in the render pool, within the time budget (a template or tokenizer never blocks the loop)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(renderer, fn, *args), limits.render_timeout_s)
        except TimeoutError:
            raise APIError(
                503, f"rendering and tokenizing this request took over {limits.render_timeout_s:g} s"
            ) from None

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

    def sampling(body, target: Served, prompt_lens: list[int]) -> Sampling:
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and requested > limits.max_tokens:
            raise APIError(
                400, f"max_tokens: {requested} is over this server's cap of {limits.max_tokens}", param="max_tokens"
            )
        if body.n > limits.max_n:
            raise APIError(400, f"n: at most {limits.max_n}", param="n")
        sequences = len(prompt_lens) * body.n
        if sequences > limits.max_sequences:
            raise APIError(
                400,
                f"this request asks for {sequences} sequences (prompts x n); this server generates at most "
                f"{limits.max_sequences} per request",
                param="n",
            )
        longest = max(prompt_lens)
        max_tokens = requested or limits.max_tokens
        room = target.max_positions
        if room is not None and longest + (requested or 1) > room:
            raise APIError(
                400,
                f"the prompt ({longest} tokens) plus max_tokens ({requested or 1}) is over the "
                f"model's context of {room} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        if room is not None:
            max_tokens = min(max_tokens, room - longest)
        total = sum(prompt_lens) * body.n + sequences * max_tokens
        if total > limits.max_request_tokens:
            raise APIError(
                400,
                f"this request may take {total} tokens (prompts + max_tokens, over {sequences} sequences); "
                f"this server takes at most {limits.max_request_tokens} per request (lower max_tokens, n or prompts)",
                param="max_tokens",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
        return Sampling(max_tokens, body.temperature, body.top_p, tuple(stop), body.seed)

    def render_chat(body, target: Served, policy: ToolPolicy, kwargs: dict) -> tuple[str, list[int], dict]:
        from jinja2 import TemplateError
        from transformers.cli.serving.utils import BaseHandler, Modality

        given = [m.model_dump(exclude_none=True) for m in body.messages]
        if target.system and not any(m["role"] in ("system", "developer") for m in given):
            given = [{"role": "system", "content": target.system}, *given]  # as in training, chat and Ollama
        images = []
        if has_images(given):
            if target.processor is None:
                raise APIError(400, f"model {target.name!r} takes no images (a text-only model)", param="messages")
            messages, images = request_images(given, limits)
            template = target.processor
        else:
            messages = BaseHandler.get_processor_inputs_from_messages(given, Modality.LLM)
            template = target.tokenizer
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if policy.render else None

        def render(tools):
            return template.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
            )

        try:
            text = render(tools)
            if tools and text == render(None):
                raise APIError(
                    400,
                    f"tools: the chat template of model {target.name!r} does not show tools to the model "
                    "(send tool_choice: none to ignore them)",
                    param="tools",
                )
        except (TemplateError, TypeError, ValueError, KeyError) as e:
            raise APIError(
                400, f"the model's chat template refused these messages: {str(e).splitlines()[0]}", param="messages"
            ) from None
        text += policy.prefill
        if images:  # the processor expands each image placeholder to the image's tokens
            enc = target.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
            ids = enc.pop("input_ids")[0].tolist()
            enc.pop("attention_mask", None)
            return text, ids, dict(enc)
        return text, target.tokenizer(text, add_special_tokens=False)["input_ids"], {}

    def tokenize_prompts(target: Served, prompts: list[str]) -> list[tuple[str, list[int]]]:
        return [(p, target.tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]

    def run(prompts, target: Served, s: Sampling, n: int, chat: bool, extra: dict | None = None):
        """Queue n rows per prompt; returns (per-choice asyncio queues, the rows). `extra`: the prompt's image
        inputs; each of its rows is then generated alone."""
        loop = asyncio.get_running_loop()
        queues, rows = [], []
        group = uuid.uuid4().hex if s.seed is not None else ""  # seeded rows run alone: repeatable
        for text, ids in prompts:
            for _ in range(n):
                q: asyncio.Queue = asyncio.Queue()

                def emit(item, q=q):
                    loop.call_soon_threadsafe(q.put_nowait, item)

                alone = uuid.uuid4().hex if extra else group
                rows.append(Row(target, ids, text, s, emit, chat=chat, group=alone, extra=extra or {}))
                queues.append(q)
        engine.submit(rows)
        return queues, rows

    async def collect_all(request: Request, queues, rows) -> list[dict]:
        """Every choice's result; the rows are cancelled if the client goes away first."""
        results = asyncio.ensure_future(asyncio.gather(*(_collect(q) for q in queues)))
        results.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even if nobody waits
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not results.done():
                for r in rows:
                    r.cancelled.set()
                results.cancel()
            gone.cancel()
        if not results.done() or results.cancelled():  # nobody reads this answer
            raise APIError(499, "the client closed the request")
        return results.result()

    @app.get("/health")
    async def health():
        if engine.dead:
            return JSONResponse({"status": "dead", "error": engine.dead}, status_code=503)
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
        policy = tool_policy(body, target)
        kwargs = template_kwargs(body.chat_template_kwargs, target.template_kwargs)
        text, ids, extra = await off_loop(render_chat, body, target, policy, kwargs)
        s = sampling(body, target, [len(ids)])
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            queues, rows = run([(text, ids)], target, s, body.n, chat=True, extra=extra)
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _chat_stream(rid, target.name, queues, rows, len(ids), include_usage, policy, ChatCompletionChunk),
                media_type="text/event-stream",
            )
        results: list[dict | None] = [None] * body.n
        tries = 1 if s.greedy or s.seed is not None or policy.choice == "auto" else TOOL_CHOICE_TRIES
        for _ in range(tries):
            missing = [i for i, r in enumerate(results) if not policy.meets(r)]
            if not missing:
                break
            queues, rows = run([(text, ids)], target, s, len(missing), chat=True, extra=extra)
            for i, r in zip(missing, await collect_all(request, queues, rows)):
                results[i] = r
        unmet = [i for i, r in enumerate(results) if not policy.meets(r)]
        if unmet:
            why = f" in {tries} samples" if tries > 1 else " (greedy or seeded: sampling again would give the same)"
            raise APIError(500, policy.unmet(unmet[0]) + why, param="tool_choice", code="tool_choice_not_met")
        choices = []
        for i, r in enumerate(results):
            calls = [_call_dict(c) for c in r["tool_calls"]]
            message = {
                "role": "assistant",
                "content": "".join(r["content"]),
                "reasoning_content": "".join(r["reasoning"]).strip() or None,
                "tool_calls": calls or None,
            }
            finish = "tool_calls" if calls else _finish(r["finish"])
            choices.append({"index": i, "message": message, "finish_reason": finish})
        return _response(ChatCompletion, "chat.completion", rid, target.name, choices, len(ids), results)

    @app.post("/v1/completions")
    async def completions(request: Request):
        from openai.types import Completion

        body = await read_body(request, CompletionRequest)
        target = pick(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: empty list", param="prompt")
        if len(prompts) * body.n > limits.max_sequences:  # before tokenizing them all
            sampling(body, target, [0] * len(prompts))
        encoded = await off_loop(tokenize_prompts, target, prompts)
        s = sampling(body, target, [len(ids) for _, ids in encoded])
        rid = f"cmpl-{uuid.uuid4().hex}"
        queues, rows = run(encoded, target, s, body.n, chat=False)
        n_prompt = sum(len(ids) for _, ids in encoded)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _completion_stream(rid, target.name, queues, rows, n_prompt, include_usage),
                media_type="text/event-stream",
            )
        results = await collect_all(request, queues, rows)
        choices = [
            {"index": i, "text": "".join(r["content"]), "finish_reason": _finish(r["finish"]), "logprobs": None}
            for i, r in enumerate(results)
        ]
        return _response(Completion, "text_completion", rid, target.name, choices, n_prompt, results)

    return app


class _RequireKey:
    """ASGI middleware: /v1 routes need `Authorization: Bearer KEY` (constant-time check). Plain ASGI rather
    than @app.middleware, which would hide a client's disconnect from the routes."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.api_key and scope["type"] == "http" and scope["path"].startswith("/v1"):
            from fastapi.responses import JSONResponse

            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                why = "missing API key (send Authorization: Bearer KEY)" if not given else "incorrect API key"
                response = JSONResponse(APIError(401, why, code="invalid_api_key").body(), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _disconnected(request, every_s: float = 0.05) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)


async def _collect(q: asyncio.Queue) -> dict:
    out = {"content": [], "reasoning": [], "tool_calls": [], "finish": "stop", "tokens": 0}
    while True:
        item = await q.get()
        if item[0] == "done":
            out["finish"], out["tokens"] = item[1], item[2]
            return out
        if item[0] == "error":
            raise APIError(503 if "thread died" in item[1] else 500, item[1])
        if item[0] == "tool_call":
            out["tool_calls"].append(item[1])
        else:
            out[item[0]].append(item[1])


def _response(Type, kind: str, rid: str, name: str, choices: list[dict], n_prompt: int, results: list[dict]):
    """A whole (non-streamed) answer, checked against the `openai` package's type."""
    from fastapi.responses import JSONResponse

    used = sum(r["tokens"] for r in results)
    usage = {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": choices, "usage": usage}
    return JSONResponse(Type.model_validate(body).model_dump(exclude_none=True))


def _call_dict(call) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _error_event(message: str, code: str | None = None) -> str:
    return f"data: {json.dumps(APIError(500, message, code=code).body())}\n\n"


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


async def _chat_stream(rid, name, queues, rows, n_prompt, include_usage, policy: ToolPolicy, Chunk):
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
    refused = [False] * len(queues)
    used = 0
    try:
        for i in range(len(queues)):
            yield sse([{"index": i, "delta": {"role": "assistant", "content": ""}}])
        async for i, item in _merged(queues):
            kind = item[0]
            if refused[i]:
                continue
            if kind == "content":
                yield sse([{"index": i, "delta": {"content": item[1]}}])
            elif kind == "reasoning":
                yield sse([{"index": i, "delta": {"reasoning_content": item[1]}}])
            elif kind == "tool_call":
                if policy.choice != "auto" and not policy.valid(item[1]):
                    refused[i] = True
                    rows[i].cancelled.set()
                    yield _error_event(policy.unmet(i), "tool_choice_not_met")
                    continue
                call = {"index": calls[i], **_call_dict(item[1])}
                calls[i] += 1
                yield sse([{"index": i, "delta": {"tool_calls": [call]}}])
            elif kind == "error":
                yield _error_event(item[1])
            else:
                used += item[2]
                if policy.required and not calls[i]:
                    yield _error_event(policy.unmet(i), "tool_choice_not_met")
                    continue
                finish = "tool_calls" if calls[i] else _finish(item[1])
                yield sse([{"index": i, "delta": {}, "finish_reason": finish}])
        if include_usage:
            yield sse([], {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used})
        yield "data: [DONE]\n\n"
    finally:  # a client that went away stops its rows at the next token
        for r in rows:
            r.cancelled.set()


async def _completion_stream(rid, name, queues, rows, n_prompt, include_usage):
    """Completion chunks as OpenAI streams them (`finish_reason: null` until the last one): plain dicts,
    since the `openai` package's Completion type requires a finish_reason."""

    def sse(choices, usage=None) -> str:
        chunk = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    used = 0
    try:
        async for i, item in _merged(queues):
            if item[0] == "content":
                yield sse([{"index": i, "text": item[1], "finish_reason": None, "logprobs": None}])
            elif item[0] == "error":
                yield _error_event(item[1])
            elif item[0] == "done":
                used += item[2]
                yield sse([{"index": i, "text": "", "finish_reason": _finish(item[1]), "logprobs": None}])
        if include_usage:
            yield sse([], {"prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used})
        yield "data: [DONE]\n\n"
    finally:
        for r in rows:
            r.cancelled.set()
