"""The docs cannot rot: every `finetune ...` command in a bash block of the README, README_zh, CONTRIBUTING and
docs/ parses with finetune's own argument parser, every recipe it names loads with its overrides, every repo
file it names exists, and every relative link between the pages resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from finetune import cli, config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "README_zh.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_commands():
    for page in PAGES:
        in_bash, pending = False, ""
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.rstrip().endswith("\\"):  # a command continued on the next line
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line.startswith("```"):
                in_bash = line.strip() in ("```bash", "```sh", "```console")
                continue
            if not in_bash:
                continue
            text = line.strip().removeprefix("$ ")
            if " -m finetune " in text:  # accelerate launch ... -m finetune train ...
                text = "finetune " + text.split(" -m finetune ", 1)[1]
            for part in text.split(" && "):
                if part.startswith("finetune ") and " [" not in part:  # a synopsis (`[--opt X]`) is no example
                    yield f"{page.relative_to(REPO)}:{number}", part


COMMANDS = list(doc_commands())


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30


def argv_of(text: str) -> list[str]:
    words = shlex.split(text, comments=True)
    return words[1:]


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_parses_and_names_what_exists(where, command, monkeypatch):
    argv = argv_of(command)
    parser = cli._parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse's error, or --help / --version
        assert e.code == 0 and any(a in argv for a in ("--help", "-h", "--version")), f"{where}: {command}"
        return
    assert not extra or all("=" in e and not e.startswith("-") for e in extra), f"{where}: {command}: {extra}"
    for word in argv:
        path = word.split("=", 1)[-1]
        if re.match(r"(recipes|data|eval|bench|tests)/[\w./-]+\.(yaml|json|jsonl|py|sh|md)$", path):
            assert (REPO / path).is_file(), f"{where}: {path} does not exist"
    recipe = getattr(args, "recipe", None)
    if recipe and recipe.startswith("recipes/") and recipe.endswith(".yaml") and args.command != "pipeline":
        overrides = [*getattr(args, "overrides", []), *extra]
        config.load(REPO / recipe, [o for o in overrides if not o.startswith("model.name_or_path=")])


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
