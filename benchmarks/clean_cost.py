"""What the default defences cost honest federations over longer runs (inline; no attacker).

    python benchmarks/clean_cost.py [--datasets digits,mnist1d] [--rounds 15] [--out DIR]   # DIR/clean_cost.{json,md}

MLP, 10 clients, seeds 0-5, on Dirichlet α = 0.1 and 1 and quantity skew (α = 0.3), with every defence off
(benchmarks.attacks.OFF), the shipped defaults (the direction guard against the server's own update on
``trusted-data`` 100 examples) and ``median`` (the defaults with ``trusted-data 0``: the round's median as the
guard's reference). benchmarks/attacks.py measures the same after 3 rounds of digits; this is the longer,
out-of-sample check of issue 26's goal (the defaults cost ≤ 1 point on clean runs, no honest client rejected).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attacks import OFF  # noqa: E402
from benchmarks.common import add_out, load_line, note_load, recorded_loads  # noqa: E402

PARTITIONS = [("dirichlet", 0.1), ("dirichlet", 1.0), ("quantity", 0.3)]
SEEDS = [0, 1, 2, 3, 4, 5]
DEFENCES = {"off": OFF, "defaults": {}, "median": {"trusted-data": 0}}
COUNTS = ("rejected", "clipped", "capped", "projected")


def run(dataset: str, rounds: int, part: str, alpha: float, seed: int, defence: dict) -> dict:
    """One inline run: final central accuracy and the screening counts summed over the rounds."""
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    out = Path(tempfile.mkdtemp(prefix="clean-"))
    try:
        cfg = {"dataset": dataset, "model": "mlp", "partition": part, "alpha": alpha, "seed": seed,
               "num-clients": 10, "num-rounds": rounds, **defence, "out": str(out)}  # fmt: skip
        run_server(InlineGrid(app, 10), validate_config(cfg))
        rows = load_metrics(out)["rounds"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"accuracy": rows[-1]["central_accuracy"]} | {k: int(sum(r.get(k, 0) for r in rows[1:])) for k in COUNTS}


def main() -> None:
    import logging

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="digits,mnist1d", help="comma-separated bundled data sets")
    p.add_argument("--rounds", type=int, default=15)
    add_out(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "clean_cost.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    start = load_line()
    print(start, flush=True)
    runs = data.setdefault("runs", {})
    for dataset in args.datasets.split(","):
        for part, alpha in PARTITIONS:
            for d, defence in DEFENCES.items():
                for seed in SEEDS:
                    key = f"{dataset}|{args.rounds}|{part}:{alpha}|{d}|{seed}"
                    runs[key] = run(dataset, args.rounds, part, alpha, seed, defence)
                    print(key, runs[key], flush=True)
                    path.write_text(json.dumps(data, indent=1))
    note_load(data, start, load_line())
    path.write_text(json.dumps(data, indent=1))
    write_table(data, args.out / "clean_cost.md")


def write_table(data: dict, path: Path) -> None:
    lines = [
        "# Clean runs: what the defences cost honest federations over longer runs",
        "",
        "Command: `python benchmarks/clean_cost.py` (inline; MLP, 10 clients, seeds 0-5, no attacker). Accuracy:",
        "mean final central accuracy (the seeds' values); cost: points against every defence off; counts: honest",
        "updates rejected / clipped (norm bound) / capped (claimed num-examples) / projected (direction guard),",
        "summed over the seeds and rounds. `defaults`: the guard against the server's own update on 100 labelled",
        "examples (`trusted-data 100`); `median`: `--trusted-data 0`, the guard against the round's median update.",
        "",
        *recorded_loads(data),
        "",
        "| data set | rounds | partition | defences | accuracy | cost | rejected | clipped | capped | projected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    combos = sorted({tuple(k.split("|")[:3]) for k in data.get("runs", {})})
    for dataset, rounds, part in combos:
        cells = {d: [data["runs"].get(f"{dataset}|{rounds}|{part}|{d}|{s}") for s in SEEDS] for d in DEFENCES}
        if any(None in rs for rs in cells.values()):
            continue
        off = statistics.mean(r["accuracy"] for r in cells["off"])
        for d, rs in cells.items():
            acc = statistics.mean(r["accuracy"] for r in rs)
            seeds = ", ".join(f"{r['accuracy']:.3f}" for r in rs)
            counts = " | ".join(str(sum(r[k] for r in rs)) for k in COUNTS)
            lines.append(f"| {dataset} | {rounds} | {part.replace(':', ' ')} | {d} | {acc:.3f} ({seeds}) | "
                         f"{100 * (acc - off):+.1f} | {counts} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
