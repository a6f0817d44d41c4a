"""`finetune webui`: a Gradio app over the same commands and functions the terminal uses (see app.py;
the security model is in workspace.py and docs/webui.md)."""

import os
from pathlib import Path

from finetune.errors import FinetuneError

EXTRA_HINT = "pip install 'finetune[webui]'"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "FINETUNE_WEBUI_AUTH"


def require_extra() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise FinetuneError(f"finetune webui needs gradio: {EXTRA_HINT}") from None


def credentials(auth: str | None, auth_file: str | None) -> list[tuple[str, str]]:
    """USER:PASS pairs from --auth, --auth-file (one a line, `#` comments) or $FINETUNE_WEBUI_AUTH."""
    pairs, sources = [], []
    if auth_file:
        try:
            text = Path(auth_file).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise FinetuneError(f"--auth-file {auth_file}: {e.strerror or e}") from None
        sources += [(f"--auth-file {auth_file} line {i}", line.strip()) for i, line in enumerate(text.splitlines(), 1)]
        sources = [(where, line) for where, line in sources if line and not line.startswith("#")]
    if auth or (not auth_file and os.environ.get(AUTH_ENV)):
        sources.append(("--auth" if auth else f"${AUTH_ENV}", auth or os.environ[AUTH_ENV]))
    for where, line in sources:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise FinetuneError(f"{where}: expected USER:PASSWORD (both non-empty)")
        pairs.append((user, password))
    return pairs


def run_cli(args) -> int:
    import logging

    from finetune.webui.workspace import Workspace

    auth = credentials(args.auth, args.auth_file)
    if args.host not in LOOPBACK and not auth:
        raise FinetuneError(
            f"--host {args.host}: anyone who can reach it could train, read and write files as you; "
            f"give --auth USER:PASS or --auth-file FILE (or ${AUTH_ENV}), or keep the default 127.0.0.1"
        )
    workspace = Workspace.at(args.root, args.trust_remote_code, args.allow_pickle)
    require_extra()
    from finetune.webui.app import launch

    logging.getLogger("finetune").info(
        "web UI at http://%s:%d (workspace %s%s)",
        args.host,
        args.port,
        workspace.root,
        ", login required" * bool(auth),
    )
    launch(args.host, args.port, args.lang, workspace, args.runs_dir, auth)
    return 0
