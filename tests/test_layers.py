"""The package's import graph: every import (also those inside functions) points down the layer
order config -> model -> engine -> analyses -> outputs -> api -> cli, and no modules import each
other in a circle. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_llmc"
#: Layer of each top-level part of the package (lower may not import higher).
RANK = {"config": 0, "model": 1, "testing": 1, "engine": 2, "analyses": 3, "outputs": 4, "api": 5, "__init__": 5,
        "cli": 6, "__main__": 6}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The hf_llmc modules ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "hf_llmc")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "hf_llmc":
                continue
            for alias in node.names:  # `from .pkg import module` names a module
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != name}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer():
    assert {layer(m) for m in modules()} <= set(RANK), {layer(m) for m in modules()} - set(RANK)


def test_no_import_points_up_the_layer_order():
    upward = sorted((src, dst) for src, targets in graph().items() for dst in targets
                    if RANK[layer(dst)] > RANK[layer(src)])
    assert upward == []


def test_no_import_cycle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The graph would catch an upward import hidden in a function body (the case that let the
    old layout grow its circle)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from ..cli.main import main\n    return main\n")
    assert imports("hf_llmc.engine.probe", source, {"hf_llmc.cli.main", "hf_llmc.cli"}) == {"hf_llmc.cli.main"}
