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
import time
from pathlib import Path

import finetune

# a training log line (finetune.stages.common.log_line): `step 4/40  loss 1.234  grad_norm ...`
LOGGED = re.compile(r"^(?:finetune: )?step (\d+)/\d+\s+loss (\S+)", re.MULTILINE)
PACKAGE_ROOT = str(Path(finetune.__file__).resolve().parents[1])


def finetune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune", *args]


# Stop is SIGUSR1 (finetune.guards.request_stop): the trainer saves a checkpoint at the end of the current
# step, then stops as Ctrl-C does, so Start resumes from the step reached. Before training has begun it is
# Ctrl-C. A UI started where SIGINT is ignored (in the background of a script, or under a supervisor that
# ignores it) passes that on to its children: the run restores Python's handler first.
_INTERRUPTIBLE = (
    "import runpy, signal; from finetune import guards; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); signal.signal(signal.SIGUSR1, guards.request_stop); "
    "runpy.run_module('finetune', run_name='__main__', alter_sys=True)"
)
STEP = re.compile(r"^(?:finetune: )?step (\d+)/(\d+)\s", re.MULTILINE)


def interruptible_command(*args: str) -> list[str]:
    """`finetune ARGS` that Stop (SIGUSR1) and Ctrl-C (SIGINT) interrupt, whatever the UI's dispositions."""
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
        self.first_seen: tuple[int, float] | None = None  # (step, time) this UI first saw logged
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
            self.output_dir, self.stopped, self.first_seen = output_dir, False, None
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

    def stop(self, grace: float = 300) -> None:
        """Save a checkpoint at the end of the current step and stop (then Ctrl-C, then terminate, if the
        step does not end within `grace` seconds); the checkpoints stay for a resume."""
        with self.lock:
            if not self.running:
                return
            self.stopped = True
            for sig, wait in ((signal.SIGUSR1, grace), (signal.SIGINT, 30), (signal.SIGTERM, 30)):
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=wait)
                    return
                except subprocess.TimeoutExpired:
                    continue
            self.proc.kill()
            self.proc.wait()

    def resume_point(self) -> Path | None:
        """The checkpoint Start resumes this (stopped or failed) run from, if any."""
        from finetune.outputs import last_complete_checkpoint

        if self.output_dir is None:
            return None
        return last_complete_checkpoint(self.output_dir.with_name(self.output_dir.name + ".incomplete"))

    def progress(self) -> tuple[int, int, float | None] | None:
        """(step, total steps, seconds left) from the run's last logged step; the time left is estimated
        from the steps logged since this UI first saw the run logging (None until two were seen)."""
        if self.log_path is None or not self.log_path.is_file():
            return None
        found = STEP.findall(self.log_path.read_text(encoding="utf-8", errors="replace")[-20000:])
        if not found:
            return None
        step, total = int(found[-1][0]), int(found[-1][1])
        now = time.monotonic()
        if self.first_seen is None or step < self.first_seen[0]:
            self.first_seen = (step, now)
        first_step, first_time = self.first_seen
        left = (total - step) * (now - first_time) / (step - first_step) if step > first_step else None
        return step, total, left

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
