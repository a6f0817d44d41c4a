"""A plain (non-editable) `pip install .` ships the dataset registry, its demo data and the eval
suites as package data: installed into a throwaway venv, finetune finds them there, from a
directory that is not a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import finetune, pathlib
from finetune.data import sources
from finetune.resources import find_suite
root = pathlib.Path(finetune.__file__).parent
assert "site-packages" in str(root), root
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
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(src),
        ],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"  # no ./data/datasets.yaml here: the shipped one must be found
    elsewhere.mkdir()
    result = subprocess.run([str(python), "-c", CHECK], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
