"""One training run at a time, as a `finetune train` subprocess: a crash never takes the UI down.

The run's output goes to a log file beside the recipe; the loss curve is read back from that log
(the trainer's logged dicts) or, once the run finished, from its own `trainer_state.json`.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import finetune

# a training log line (finetune.stages.common.log_line): `step 4/40  loss 1.234  grad_norm ...`
LOGGED = re.compile(r"^(?:finetune: )?step (\d+)/\d+\s+loss (\S+)", re.MULTILINE)
PACKAGE_ROOT = str(Path(finetune.__file__).resolve().parents[1])


def finetune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune", *args]


# Stop is Ctrl-C (SIGINT): the trainer stops cleanly and its checkpoints stay for a resume. A UI started
# where SIGINT is ignored (in the background of a script, or under a supervisor that ignores it) passes
# that on to its children, and a run would not stop: the run restores Python's handler first.
_INTERRUPTIBLE = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('finetune', run_name='__main__', alter_sys=True)"
)


def interruptible_command(*args: str) -> list[str]:
    """`finetune ARGS` that Ctrl-C (SIGINT) interrupts, whatever the UI's own SIGINT disposition."""
    return [sys.executable, "-c", _INTERRUPTIBLE, *args]


def child_env() -> dict:
    """The UI's own finetune package first on the path, unbuffered output (the log is read live)."""
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


class Runner:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.output_dir: Path | None = None
        self.stopped = False
        self.lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, recipe_path: Path, output_dir: Path, cwd: Path) -> bool:
        """Start `finetune train RECIPE` (it resumes an interrupted run of the same recipe); False if busy."""
        with self.lock:
            if self.running:
                return False
            self.log_path = recipe_path.with_suffix(".log")
            self.output_dir, self.stopped = output_dir, False
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"$ finetune train {recipe_path}\n")
                log.flush()
                self.proc = subprocess.Popen(
                    interruptible_command("train", str(recipe_path)),
                    cwd=cwd,
                    env=child_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            return True

    def stop(self) -> None:
        """Ctrl-C, as in a terminal: the trainer stops; its checkpoints stay for a resume."""
        with self.lock:
            if not self.running:
                return
            self.stopped = True
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=30)

    def state(self) -> tuple[str, int | None]:
        """('idle' | 'running' | 'finished' | 'stopped' | 'failed', exit code)."""
        if self.proc is None:
            return "idle", None
        rc = self.proc.poll()
        if rc is None:
            return "running", None
        if rc == 0:
            return "finished", 0
        return ("stopped" if self.stopped else "failed"), rc

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        # progress bars redraw with \r: keep each line's last state
        rows = [row.split("\r")[-1] for row in text.split("\n")]
        return "\n".join([r for r in rows if r.strip()][-lines:])

    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) points: the finished run's trainer_state.json, else the log's training lines."""
        state = self.output_dir / "trainer_state.json" if self.output_dir else None
        if state is not None and state.is_file() and self.state()[0] == "finished":
            history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
            return [(h["step"], float(h["loss"])) for h in history if "loss" in h]
        if self.log_path is None or not self.log_path.is_file():
            return []
        return logged_losses(self.log_path.read_text(encoding="utf-8", errors="replace"))


def logged_losses(text: str) -> list[tuple[int, float]]:
    """(step, loss) of every training log line in a run's output."""
    points = []
    for match in LOGGED.finditer(text.replace("\r", "\n")):
        try:
            points.append((int(match.group(1)), float(match.group(2))))
        except ValueError:
            continue
    return points
