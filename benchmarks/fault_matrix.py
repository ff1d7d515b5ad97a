"""Fault × strategy matrix: every built-in strategy under injected client faults (inline backend).

    python benchmarks/fault_matrix.py [--out DIR]   # writes DIR/fault-matrix.md (default benchmarks/results)

Per cell: rounds completed, error replies, late replies (timeouts), rejected updates, rounds that kept
the previous model, and the final central accuracy (round 0 in brackets).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ["fedavg", "match", "wb", "gwb", "fedpfn", "fedpnu", "layerwise"]
FAULTS = {
    "fail-prob 0.3": {"fail-prob": 0.3},
    "straggle-prob 0.2 (timeout 2 s)": {"straggle-prob": 0.2, "round-timeout": 2.0},
}


def main(argv: list[str] | None = None) -> None:
    import logging

    from benchmarks.common import add_out, load_header, load_line

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out(p)
    args = p.parse_args(argv)
    start = load_line()
    print(start, flush=True)

    logging.getLogger("fedfuse").setLevel(logging.ERROR)
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    lines = [
        "# Fault × strategy matrix",
        "",
        "Command: `python benchmarks/fault_matrix.py` (inline backend; digits MLP, 6 clients, 4 rounds, seed 0).",
        "",
        "<!-- load -->",
        "",
        "| strategy | fault | rounds | errors | late | rejected | kept previous | accuracy (round 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for strategy in STRATEGIES:
        for fault, opts in FAULTS.items():
            out = Path(tempfile.mkdtemp(prefix="fm"))
            cfg = {"strategy": strategy, "num-clients": 6, "num-rounds": 4, "seed": 0, "out": str(out), **opts}
            run_server(InlineGrid(app, 6), cfg)
            rows = load_metrics(out)["rounds"]
            s = lambda k, rows=rows: int(sum(r.get(k, 0) for r in rows[1:]))  # noqa: E731
            lines.append(
                f"| {strategy} | {fault} | {rows[-1]['round']} | {s('failures')} | {s('timeouts')} | {s('rejected')} "
                f"| {s('skipped')} | {rows[-1]['central_accuracy']:.3f} ({rows[0]['central_accuracy']:.3f}) |"
            )
            print(lines[-1], flush=True)
    end = load_line()
    print(end, flush=True)
    lines[lines.index("<!-- load -->")] = load_header(start, end)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fault-matrix.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
