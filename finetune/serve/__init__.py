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

The package: `protocol` (what a request may be, the limits, OpenAI-style errors), `engine` (what is
served, and the thread that batches generation), `app` (the HTTP routes); this module is the CLI.
"""

import logging
import os
import re
import signal

from finetune.serve.app import create_app
from finetune.serve.engine import Engine, Row, Sampling, Served, load_served, response_schema
from finetune.serve.protocol import API_KEY_ENV, TEMPLATE_KWARGS, APIError, Limits, ServeError

__all__ = [
    "API_KEY_ENV",
    "TEMPLATE_KWARGS",
    "APIError",
    "Engine",
    "Limits",
    "Row",
    "Sampling",
    "ServeError",
    "Served",
    "create_app",
    "load_served",
    "parse_adapter",
    "require_extra",
    "response_schema",
    "run_cli",
]

log = logging.getLogger("finetune")
EXTRA_HINT = "pip install 'finetune[serve]'"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
GRACEFUL_SHUTDOWN_S = 5  # requests still running at SIGTERM get this long, then are cut


def require_extra() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "openai"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ServeError(f"finetune serve needs {', '.join(missing)}: {EXTRA_HINT}")


def parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ServeError(f"--adapter {spec}: expected NAME=DIR")
    if not re.fullmatch(r"[\w.:/-]+", name):
        raise ServeError(f"--adapter {spec}: the name may use letters, digits and _ . : / - only")
    return name, path


def limits_from_args(args) -> Limits:
    """The CLI's limits, checked before anything is loaded (one line each, exit 2)."""
    if not 1 <= args.port <= 65535:
        raise ServeError(f"--port: must be 1-65535, got {args.port}")
    return Limits(
        max_tokens=args.max_tokens,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        max_batch_size=args.max_batch_size,
        max_sequences=args.max_sequences,
        max_request_tokens=args.max_request_tokens,
        render_timeout_s=args.render_timeout,
        max_images=getattr(args, "max_images", Limits.max_images),
        max_image_pixels=getattr(args, "max_image_pixels", Limits.max_image_pixels),
    )


def run_cli(args) -> int:
    limits = limits_from_args(args)
    adapters = [parse_adapter(a) for a in args.adapter or []]
    require_extra()
    import uvicorn

    from finetune.merge import quiet_progress

    quiet_progress()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in LOCAL_HOSTS and not api_key:
        log.warning(
            "listening on %s without an API key: anyone who can reach it can use the model (set --api-key or %s)",
            args.host,
            API_KEY_ENV,
        )
    served = load_served(args.model, adapters, name=args.name, base=args.base)
    server: uvicorn.Server | None = None

    def engine_died(reason: str) -> None:  # from the engine thread: stop serving, exit non-zero
        if server is not None:
            server.should_exit = True
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    app = create_app(served, api_key=api_key, limits=limits, on_engine_death=engine_died)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    server = uvicorn.Server(config)
    for s in served.values():
        log.info("serving %s (%s)", s.name, s.path)
    log.info(
        "OpenAI-compatible API at http://%s:%d/v1%s", args.host, args.port, " (API key required)" if api_key else ""
    )
    server.run()
    if app.state.engine.dead:
        log.error("finetune serve stopped: %s", app.state.engine.dead)
        return 1
    if not server.started:  # e.g. the port is taken: uvicorn logged why
        raise ServeError(f"could not listen on {args.host}:{args.port} (see the message above)")
    return 0
