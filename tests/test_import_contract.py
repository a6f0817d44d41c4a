"""The import contract (DESIGN.md): no import cycle inside `finetune/`, counting every import
statement (a function-level import is a cycle too, only deferred), and `finetune.config` imports
nothing of ours but errors and the shipped-files lookup (it is the bottom layer)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
CONFIG_MAY_IMPORT = {"finetune.errors", "finetune.resources"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The finetune modules `name` imports anywhere in its body ("from finetune.eval import run"
    counts as finetune.eval.run when that is a module, else as the package finetune.eval)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    out = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycle_inside_the_package():
    found = [sorted(c) for c in cycles(graph())]
    assert not found, f"import cycles: {found}"


def test_config_is_the_bottom_layer():
    g = graph()
    config = {name for name in g if name == "finetune.config" or name.startswith("finetune.config.")}
    for name in sorted(config):
        outside = g[name] - config - CONFIG_MAY_IMPORT
        assert not outside, f"{name} imports {sorted(outside)}: config imports nothing of ours"


def test_the_walk_finds_a_cycle_and_a_deferred_import(tmp_path):
    """The checker itself: a cycle through a function-level import is found."""
    pkg = tmp_path / "finetune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from finetune import b\n")
    (pkg / "b.py").write_text("def f():\n    from finetune.a import thing\n")
    (pkg / "c.py").write_text("import finetune.a\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        assert cycles(graph()) == [{"finetune.a", "finetune.b"}]
    finally:
        PACKAGE = saved
