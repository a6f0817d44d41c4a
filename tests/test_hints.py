"""Every error hint that names a flag or a `section.key` names one the user can give to that command.

Two halves: the hints the CLI prints (a table over its commands: each row an invocation that fails with a
hint, run as a user runs it, in one batch subprocess, tests/_cli_batch.py), checked against that command's
own parser (a flag it has; `section.key=value` only for a command that takes overrides, and a key the config
schema has); and every hint written in the package's source (error constructors, raise, log warnings),
checked against the parsers of the commands whose module it is in and against the schema."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SECTIONS = ("model", "adapter", "data", "train", "output", "eval", "rewards")
KEY = re.compile(rf"\b({'|'.join(SECTIONS)})\.([a-z_][a-z0-9_]*)\b(?!\.\w)")  # not file names (model.safetensors)
# another tool's command line in a hint (llama.cpp's): its flags are that tool's, up to the end of the clause
OTHER_TOOL = re.compile(r"\b(?:llama-server|llama-mtmd-cli|llama-cli|convert_hf_to_gguf\.py)\b[^)\n;]*")
ASSIGN = re.compile(rf"\b(?:{'|'.join(SECTIONS)})\.[a-z_][a-z0-9_]*=")

# modules -> the commands whose errors they write (others: any command's flag will do)
COMMAND_MODULES = {
    "finetune/eval/": ("eval",),
    "finetune/export.py": ("export",),
    "finetune/ollama.py": ("export",),
    "finetune/gguf_export.py": ("export",),
    "finetune/merge.py": ("merge", "export"),
    "finetune/serve.py": ("serve",),
    "finetune/chat.py": ("chat",),
    "finetune/reward_scoring.py": ("score",),
    "finetune/data/preview.py": ("data preview",),
}


def parsers() -> dict[str, argparse.ArgumentParser]:
    """`train`, `data preview`, ... -> the parser of that command."""
    from finetune import cli

    out = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
                return
        out[prefix] = parser

    walk(cli._parser(), "")
    return out


def flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def takes_overrides(parser) -> bool:
    return any(a.dest == "overrides" for a in parser._actions)


def schema_keys() -> set[str]:
    from finetune import config
    from finetune.config.defaults import STAGE_TRAIN_DEFAULTS, trl_config_class

    keys = {f"{s}.{f.name}" for s, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)}
    keys |= {f"eval.{f.name}" for f in dataclasses.fields(config.EvalSection)}
    keys |= {f"output.{f.name}" for f in dataclasses.fields(config.OutputSection)}
    for stage in STAGE_TRAIN_DEFAULTS:
        keys |= {f"train.{f.name}" for f in dataclasses.fields(trl_config_class(stage)) if f.init}
    return keys | {f"train.{k}" for k in config.TRAIN_EXTRA_KEYS}


def check_hint(line: str, command: str, table: dict, keys: set[str]) -> list[str]:
    parser = table[command]
    problems = [f"{f}: not an option of `finetune {command}`" for f in FLAG.findall(line) if f not in flags(parser)]
    problems += [f"{m.group(0)}: not a recipe key" for m in KEY.finditer(line) if m.group(0) not in keys]
    if ASSIGN.search(line) and not takes_overrides(parser):
        problems.append(f"`{ASSIGN.search(line).group(0)}...`: `finetune {command}` takes no section.key=value")
    return problems


# ----------------------------------------------------------------------------- as the CLI prints them


def _cases(root: Path, tiny_path: str, memo_lora_dir) -> dict[str, tuple[str, list]]:
    """name -> (command, argv): each fails before any model loads, with a hint naming a flag or a key."""
    taken = root / "taken"
    taken.mkdir()
    (taken / "x.txt").write_text("x", encoding="utf-8")
    gguf = root / "m.gguf"
    gguf.write_bytes(b"x")
    moved = root / "moved_base"  # an adapter whose recorded base is gone
    shutil.copytree(memo_lora_dir, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = str(root / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (moved / "recipe.yaml").unlink()
    (moved / "base.json").unlink(missing_ok=True)
    recipe = yaml.safe_load((Path(memo_lora_dir) / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["output"]["dir"] = str(taken)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return {
        "train_output_exists": ("train", ["train", root / "recipe.yaml"]),
        "eval_out_exists": ("eval", ["eval", "tiny-llama", "--data", "alpaca_en_demo", "--out", taken]),
        "eval_base_moved": ("eval", ["eval", moved, "--data", "alpaca_en_demo", "--out", root / "e2"]),
        "merge_out_exists": ("merge", ["merge", memo_lora_dir, "--out", taken]),
        "merge_base_moved": ("merge", ["merge", moved, "--out", root / "m2"]),
        "export_out_exists": ("export", ["export", memo_lora_dir, "--out", gguf]),
        "export_dtype_for_gguf": ("export", ["export", memo_lora_dir, "--out", root / "e.gguf", "--dtype", "float16"]),
        "chat_base_moved": ("chat", ["chat", moved, "--prompt", "hi"]),
        "dry_run": ("train", ["train", REPO / "recipes" / "tiny" / "sft_tools.yaml", "--dry-run"]),
        "score_batch_size": ("score", ["score", memo_lora_dir, "--data", "preference_en_demo", "--batch-size", "0"]),
    }


@pytest.fixture(scope="module")
def printed(tmp_path_factory, tiny_path, memo_lora_dir):
    root = tmp_path_factory.mktemp("hints")
    cases = _cases(root, tiny_path, memo_lora_dir)
    spec = [{"name": k, "cwd": str(root), "argv": [str(a) for a in argv]} for k, (_, argv) in cases.items()]
    (root / "cases.json").write_text(json.dumps(spec), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_cli_batch.py"), str(root / "cases.json"), str(root / "out.json")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cases, json.loads((root / "out.json").read_text(encoding="utf-8"))


def test_the_table_covers_the_commands_that_write_outputs(printed):
    cases, _ = printed
    assert {command for command, _ in cases.values()} >= {"train", "eval", "merge", "export", "chat", "score"}


def test_every_printed_hint_names_an_option_of_its_command(printed):
    cases, results = printed
    table, keys = parsers(), schema_keys()
    failures = []
    for name, (command, _) in cases.items():
        if name == "dry_run":
            continue
        errors = [line for line in results[name]["stderr"].splitlines() if line.startswith("finetune: error:")]
        if results[name]["returncode"] != 2 or len(errors) != 1:
            failures.append(f"{name}: expected one error line, got {results[name]['stderr'][-800:]}")
            continue
        if not (FLAG.search(errors[0]) or KEY.search(errors[0])):
            failures.append(f"{name}: no hint naming a flag or key: {errors[0]}")
        failures += [f"{name}: {p}\n    {errors[0]}" for p in check_hint(errors[0], command, table, keys)]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- as the source writes them


def _messages(tree) -> list[str]:
    """The string pieces of every error constructor (`...Error(...)`), raise and log warning/error call."""
    out = []
    for node in ast.walk(tree):
        name = ""
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if isinstance(node, ast.Raise) or name.endswith("Error") or name in ("warning", "error"):
            inside = set()  # an f-string is read whole, its values as {}: a hint reads as the user sees it
            for n in ast.walk(node):
                if isinstance(n, ast.JoinedStr):
                    out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in n.values))
                    inside.update(id(v) for v in n.values)
                elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in inside:
                    out.append(n.value)
    return out


def test_every_hint_in_the_source_names_a_real_option_or_key():
    table, keys = parsers(), schema_keys()
    every_flag = set().union(*(flags(p) for p in table.values()))
    failures, seen = [], 0
    for path in sorted((REPO / "finetune").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        commands = next((c for prefix, c in COMMAND_MODULES.items() if rel.startswith(prefix)), None)
        allowed = set().union(*(flags(table[c]) for c in commands)) if commands else every_flag
        for text in _messages(ast.parse(path.read_text(encoding="utf-8"))):
            for flag in FLAG.findall(OTHER_TOOL.sub("", text)):
                seen += 1
                if flag not in allowed:
                    failures.append(f"{rel}: {flag} is not an option of {' / '.join(commands or ['any command'])}")
            for m in KEY.finditer(text):
                seen += 1
                if m.group(0) not in keys:
                    failures.append(f"{rel}: {m.group(0)} is not a recipe key")
    assert seen > 50  # the scan finds the hints (a broken pattern would pass vacuously)
    assert not failures, "\n".join(sorted(set(failures)))


def test_the_dry_run_prints_whole_numbers_as_given_and_a_template_in_one_line(printed):
    """`train.logging_steps: 5` is printed 5 (TRL types it float), a multi-line chat template as its first line."""
    _, results = printed
    r = results["dry_run"]
    assert r["returncode"] == 0, r["stderr"][-2000:]
    text = r["stdout"] + r["stderr"]
    assert "train.logging_steps=5," in text and "train.max_steps=80," in text and "=5.0" not in text
    line = next(line for line in text.splitlines() if "model.chat_template=" in line)
    assert "(11 lines)" in line and "<|user|>" not in line  # the rest of the template is not inlined


def test_every_output_dir_the_readmes_name_is_one_a_recipe_writes():
    """A README command pointing at outputs/... names a dir some shipped recipe (or pipeline) creates."""
    written = set()
    for path in (REPO / "recipes").rglob("*.yaml"):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        out = (raw.get("output") or {}).get("dir") if isinstance(raw, dict) else None
        if isinstance(out, str):
            written.add(out.rstrip("/"))
    assert written
    named = set()
    for readme in ("README.md", "README_zh.md"):
        for line in (REPO / readme).read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("finetune "):  # a command to run, not a recipe snippet's own choice
                named |= set(re.findall(r"\boutputs/[\w./-]*\w", line))
    missing = sorted(n for n in named if not any(n == w or n.startswith(w + "/") for w in written))
    assert not missing, missing
