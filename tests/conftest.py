"""Shared fixtures: one tiny-model cache per test run, and its tokenizer.

Under pytest-xdist (the README's test command: `-n 2`) each worker is a session of its own; what a
session builds once (the tiny model, the shared trained outputs) lives in the run's directory that all
workers share, and a file lock lets one worker build it while the others wait."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist each of the two workers gets one core's worth of threads, its subprocesses too (they inherit
# the environment): torch's default of one thread per core in both workers oversubscribes two cores, and OpenMP's
# spinning threads then slow every training test several times over (the browser test 117 s -> 433 s).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Under pytest-xdist, --dist loadfile hands the files out in collection order, alternating between the workers:
# the longest go first, so that no worker is left alone with one of them at the end of the run, and files that need
# no tiny model come between them, so that the worker that does not build the tiny model (one thread, ~70 s; the
# other waits on its lock) has work meanwhile.
FIRST_FILES = (
    "test_sharded.py",
    "test_gguf_vocab.py",
    "test_encode_windows.py",
    "test_eval_metrics.py",
    "test_docs.py",
    "test_recipes.py",
    "test_webui.py",
)


_PREBUILD: list[subprocess.Popen] = []


def pytest_sessionstart(session):
    """Under pytest-xdist the controller starts building tiny-llama (one thread, ~70 s, the model nearly every test
    needs) in a process of its own before the workers start: its build overlaps their start-up and the files that
    need no tiny model (FIRST_FILES); a worker that needs it sooner waits on tiny.build's lock, and one that finds no
    finished build (the process failed) builds it itself."""
    config = session.config
    if getattr(config, "workerinput", None) is not None or not getattr(config.option, "numprocesses", None):
        return
    if os.environ.get("FINETUNE_CACHE"):  # a prebuilt cache is reused as it is
        return
    root = config._tmp_path_factory.getbasetemp() / "finetune_cache"  # the workers' run_dir / finetune_cache
    root.mkdir(exist_ok=True)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": repo}
    build = "import sys; from finetune import tiny; tiny.build('tiny-llama', sys.argv[1])"
    _PREBUILD.append(
        subprocess.Popen(
            [sys.executable, "-c", build, str(root)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )


def pytest_sessionfinish(session):
    for process in _PREBUILD:
        process.wait()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        first = {name: i for i, name in enumerate(FIRST_FILES)}
        items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


def run_dir(tmp_path_factory) -> Path:
    """The directory of this test run: the session's basetemp, or under pytest-xdist its parent (the
    workers' basetemps are its children)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(dir)`'s result, built once per test run into RUN_DIR/name, whichever worker asks first."""
    from filelock import FileLock

    root = run_dir(tmp_path_factory) / name
    with FileLock(f"{root}.lock"):
        done = root.with_name(f"{name}.built")
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            done.write_text(str(build(root)), encoding="utf-8")
        return Path(done.read_text(encoding="utf-8"))


@pytest.fixture(scope="session", autouse=True)
def finetune_cache(tmp_path_factory):
    """The tiny-model cache root: $FINETUNE_CACHE when set (reuse a prebuilt tiny model),
    else a fresh dir for this test run (tiny.build locks it: one worker builds, the others wait).
    Subprocesses inherit it through os.environ."""
    existing = os.environ.get("FINETUNE_CACHE")
    if existing:
        yield existing
        return
    root = run_dir(tmp_path_factory) / "finetune_cache"
    root.mkdir(exist_ok=True)
    root = str(root)
    os.environ["FINETUNE_CACHE"] = root
    try:
        yield root
    finally:
        os.environ.pop("FINETUNE_CACHE", None)


@pytest.fixture(scope="session")
def tiny_path(finetune_cache) -> str:
    """Path of the built tiny-llama model dir (built once per cache root)."""
    from finetune import tiny

    return tiny.build_if_tiny("tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    """The tiny-llama tokenizer (byte-level BPE, chat template with generation markers).
    Session-scoped: copy it (copy.deepcopy) before changing it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_path, tmp_path_factory):
    """An `rm` output dir trained on the demo preference pairs (tests/_support.py: train_tiny_rm), once
    per test run; eval pairwise accuracy 1.0. Shared by the reward-model and RL tests: read only."""
    from _support import train_tiny_rm

    return built_once(tmp_path_factory, "tiny_rm", lambda root: train_tiny_rm(root / "rm"))


@pytest.fixture(scope="session")
def memo_lora_dir(tiny_path, tmp_path_factory):
    """An SFT LoRA output dir that memorised tests/_support.MEMO_CHATS (30 steps, once per test run); greedy
    answers are the memorised ones. Shared by the serve and web UI tests: read only."""
    from _support import memo_recipe

    from finetune import config
    from finetune.stages import sft

    def build(root: Path) -> Path:
        (root / "recipe.yaml").write_text(memo_recipe(root, steps=30), encoding="utf-8")
        return sft.run(config.load(str(root / "recipe.yaml"), []))

    return built_once(tmp_path_factory, "memo_lora", build)
