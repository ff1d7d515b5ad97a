"""What the default defences cost an honest federation under quantity skew (inline; no attacker).

    python benchmarks/skew_cost.py [--label NAME] [--out DIR]   # adds NAME's runs to DIR/skew_cost.{json,md}

Digits MLP, ``--partition quantity --alpha 0.3`` (one client holds up to 49 × the median client's data), seeds
0-2, in two settings: the issue's run (``fedfuse simulate --backend inline --num-clients 5 --rounds 5``) and the
clean row of benchmarks/attacks.py (10 clients, 3 rounds). Each with every defence off (benchmarks.attacks.OFF),
the defaults, and ``trusted``: the defaults plus ``--trusted-data 100`` (the default since session 14, so from
then on ``defaults`` and ``trusted`` are the same runs; earlier labels measured the median reference as
``defaults``); per run the final central accuracy and the honest
updates rejected / clipped / capped over the rounds. ``--label`` names the code measured (default: the git
commit), so runs of two versions of the code sit side by side in one table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attacks import OFF  # noqa: E402
from benchmarks.common import add_out, load_line, note_load, recorded_loads  # noqa: E402

SETTINGS = [(5, 5), (10, 3)]  # (clients, rounds)
SEEDS = [0, 1, 2]
DEFENCES = {"off": OFF, "defaults": {}, "trusted": {"trusted-data": 100}}
COUNTS = ("rejected", "clipped", "capped")


def run(clients: int, rounds: int, seed: int, defence: dict) -> dict:
    """One inline run: final central accuracy and the screening counts summed over the rounds."""
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    out = Path(tempfile.mkdtemp(prefix="skew-"))
    try:
        cfg = {"dataset": "digits", "model": "mlp", "partition": "quantity", "alpha": 0.3, "seed": seed,
               "num-clients": clients, "num-rounds": rounds, **defence, "out": str(out)}  # fmt: skip
        run_server(InlineGrid(app, clients), validate_config(cfg))
        rows = load_metrics(out)["rounds"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"accuracy": rows[-1]["central_accuracy"]} | {k: int(sum(r.get(k, 0) for r in rows[1:])) for k in COUNTS}


def main() -> None:
    import logging

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="", help="name of the code measured (default: git commit of the checkout)")
    add_out(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    label = args.label or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip() or "unknown"  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "skew_cost.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    start = load_line()
    print(start, flush=True)
    runs = {}
    for clients, rounds in SETTINGS:
        for d, defence in DEFENCES.items():
            for seed in SEEDS:
                key = f"{clients}|{rounds}|{d}|{seed}"
                runs[key] = run(clients, rounds, seed, defence)
                print(label, key, runs[key], flush=True)
    data.setdefault("runs", {})[label] = runs
    note_load(data, start, load_line())
    path.write_text(json.dumps(data, indent=1))
    write_table(data, args.out / "skew_cost.md")


def write_table(data: dict, path: Path) -> None:
    lines = [
        "# Quantity skew: what the defences cost an honest federation",
        "",
        "Command: `python benchmarks/skew_cost.py --label NAME` (inline; digits MLP, `--partition quantity --alpha",
        "0.3`, seeds 0-2, no attacker). Accuracy: mean final central accuracy (the seeds' values); cost: points",
        "against every defence off with the same code; counts: honest updates rejected / clipped (norm bound) /",
        "capped (claimed num-examples), summed over the seeds and rounds.",
        "",
        *recorded_loads(data),
        "",
        "| code | clients × rounds | defences | accuracy | cost | rejected | clipped | capped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in data.get("runs", {}).items():
        for clients, rounds in SETTINGS:
            cells = {d: [runs.get(f"{clients}|{rounds}|{d}|{s}") for s in SEEDS] for d in DEFENCES}
            if any(None in rs for rs in cells.values()):
                continue
            off = statistics.mean(r["accuracy"] for r in cells["off"])
            for d, rs in cells.items():
                acc = statistics.mean(r["accuracy"] for r in rs)
                seeds = ", ".join(f"{r['accuracy']:.3f}" for r in rs)
                counts = " | ".join(str(sum(r[k] for r in rs)) for k in COUNTS)
                lines.append(f"| {label} | {clients} × {rounds} | {d} | {acc:.3f} ({seeds}) | "
                             f"{100 * (acc - off):+.1f} | {counts} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
