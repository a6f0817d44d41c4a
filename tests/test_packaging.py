"""A plain (non-editable) install ships the dataset registry, its demo data and the eval suites as
package data: the wheel, built with build isolation as `pip install .` builds it (whatever setuptools or
wheel the base interpreter holds), is installed into a folder of its own, and finetune finds its data
there from a directory that is not a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import finetune, os, pathlib
from finetune.data import sources
from finetune.resources import find_suite
root = pathlib.Path(finetune.__file__).parent
assert root == pathlib.Path(os.environ["FINETUNE_INSTALLED"]) / "finetune", root
registry = sources.find_registry()
assert registry is not None and root in registry.parents, registry
demo = sources.locate("alpaca_zh_demo")
assert demo.path.is_file() and root in demo.path.parents, demo.path
suite = pathlib.Path(find_suite("eval/suites/general.yaml"))
assert suite.is_file() and root in suite.parents, suite
assert (suite.parent / "../data/heldout_en.txt").is_file()
print("ok")
"""


def test_a_non_editable_install_finds_the_registry_and_the_suites(tmp_path):
    src = tmp_path / "src"  # build from a copy: nothing (build/, *.egg-info) is written into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tools")
    for name in ("finetune", "data", "eval"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    # Build the wheel as a user's `pip install .` does: with build isolation, so the [build-system]
    # requirements come from the registry, whatever setuptools/wheel the interpreter happens to have.
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("finetune-*.whl")
    # Install the wheel alone into a folder of its own, first on the path of a process started elsewhere:
    # it must find its package data there, not in the checkout.
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"  # no ./data/datasets.yaml here: the shipped one must be found
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "FINETUNE_INSTALLED": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
