"""Imports point one way: core (``fedfuse``) ← Flower adapters (``strategies``, ``clients``) ← composition.

- the core imports no Flower code, no ``strategies`` and no ``clients`` — except the composition layer
  (``fedfuse/cli.py``, ``fedfuse/runners/``);
- ``clients`` never imports ``strategies`` (the wire keys they share live in ``fedfuse.protocol``);
- no import cycle inside a package (module-level imports; lazy imports inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedfuse", "strategies", "clients")
COMPOSITION = ("fedfuse/cli.py", "fedfuse/runners/")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]  # `from fedfuse import protocol`
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_core_imports_no_flower_strategies_or_clients() -> None:
    offenders = []
    for path in _files("fedfuse"):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel == c or rel.startswith(c) for c in COMPOSITION):
            continue
        offenders += [f"{rel}: {n}" for n in _imports(path) if n.split(".")[0] in ("flwr", "strategies", "clients")]
    assert offenders == []


def test_clients_never_import_strategies() -> None:
    offenders = [f"{p.name}: {n}" for p in _files("clients") for n in _imports(p) if n.split(".")[0] == "strategies"]
    assert offenders == []


def test_no_import_cycle_inside_a_package() -> None:
    modules = {_module_name(p): p for pkg in PACKAGES for p in _files(pkg)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".")[0]
        deps = set()
        for imported in _imports(path):
            while imported and imported not in modules:  # `a.b.c` may name an attribute of module `a.b`
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported.split(".")[0] == package:
                deps.add(imported)
        graph[name] = deps - {n for n in deps if name.startswith(n + ".") or name == n}  # a package's own __init__
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" → ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
