"""The core package imports no Flower code (only fedfuse/cli.py, the composition root, may)."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "fedfuse"


def test_core_imports_no_flower_strategies_or_clients() -> None:
    offenders = []
    for path in CORE.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("flwr", "strategies", "clients")]
    assert offenders == []
