"""Run many `finetune` command lines in ONE process (one torch import for all of them) and report each.

    python tests/_cli_batch.py CASES.json RESULTS.json

CASES.json is a list of {"name", "cwd", "argv"} (argv without the `finetune` program name). Each case
runs `finetune.cli.main(argv)` in its cwd with stdout/stderr captured, exactly as the console script
would (exit status from main or SystemExit); an exception escaping main is recorded as the traceback
the process would have printed. The bad-input catalogue (tests/test_bad_input.py) runs a few of these
batches concurrently, so its dozens of cases cost a few imports, not dozens.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import traceback


def run_one(argv: list[str], cwd: str) -> dict:
    from finetune import cli

    logging.getLogger("finetune").handlers.clear()  # main() adds its own handler, bound to this case's stderr
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as e:  # argparse errors
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001  (what the process would print before dying)
                traceback.print_exc(file=err)
                rc = 1
    finally:
        os.chdir(old)
    return {"returncode": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    results = {c["name"]: run_one(c["argv"], c["cwd"]) for c in cases}
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
