"""`finetune webui`: a Gradio app over the same commands and functions the terminal uses (see app.py)."""

from finetune.errors import FinetuneError

EXTRA_HINT = "pip install 'finetune[webui]'"


def require_extra() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise FinetuneError(f"finetune webui needs gradio: {EXTRA_HINT}") from None


def run_cli(args) -> int:
    require_extra()
    import logging

    from finetune.webui.app import launch

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("finetune").warning(
            "the web UI on %s can start training runs for anyone who can reach it", args.host
        )
    logging.getLogger("finetune").info("web UI at http://%s:%d", args.host, args.port)
    launch(args.host, args.port, args.lang, args.runs_dir)
    return 0
