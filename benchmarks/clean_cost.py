"""What the default defences cost honest federations over longer runs (inline; no attacker).

    python benchmarks/clean_cost.py [--datasets digits,mnist1d] [--rounds 15] [--seeds 20] [--shard i/n] [--out DIR]
    # DIR/clean_cost.md (+ clean_cost.shard<i>.json; resumable)

MLP, 10 clients, seeds 0..N-1 (20 by default: one run's final accuracy moves by ±3 points with the seed, so a
1-point cost needs the paired mean over many), on Dirichlet α = 0.1 and 1 and quantity skew (α = 0.3), with every defence off
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
from benchmarks.common import add_out, load_line, note_load, parse_shard, read_shards, recorded_loads  # noqa: E402

PARTITIONS = [("dirichlet", 0.1), ("dirichlet", 1.0), ("quantity", 0.3)]
SEEDS = 20
DEFENCES = {"off": OFF, "defaults": {}, "median": {"trusted-data": 0}}
COUNTS = ("rejected", "clipped", "capped", "projected", "shared", "cut")


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
    p.add_argument("--seeds", type=int, default=SEEDS, help="seeds 0..N-1 per cell")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th run from the i-th (parallel processes)")
    add_out(p)
    args = p.parse_args()
    shard, shards = parse_shard(p, args.shard)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"clean_cost.shard{shard}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    start = load_line()
    print(start, flush=True)
    runs = data.setdefault("runs", {})
    done = {k for part_data in read_shards(args.out, "clean_cost") for k in part_data.get("runs", {})}  # any shard's
    keys = [(f"{dataset}|{args.rounds}|{part}:{alpha}|{d}|{seed}", (dataset, part, alpha, seed, d))
            for dataset in args.datasets.split(",") for part, alpha in PARTITIONS for seed in range(args.seeds)
            for d in DEFENCES]  # fmt: skip
    for i, (key, (dataset, part, alpha, seed, d)) in enumerate(keys):
        if i % shards == shard and key not in done:
            runs[key] = run(dataset, args.rounds, part, alpha, seed, DEFENCES[d])
            print(key, runs[key], flush=True)
            path.write_text(json.dumps(data, indent=1))
    note_load(data, start, load_line())
    path.write_text(json.dumps(data, indent=1))
    merged: dict = {"runs": {}, "loads": []}
    for part_data in read_shards(args.out, "clean_cost"):
        merged["runs"] |= part_data.get("runs", {})
        merged["loads"] += part_data.get("loads", [])
    write_table(merged, args.out / "clean_cost.md")


def write_table(data: dict, path: Path) -> None:
    lines = [
        "# Clean runs: what the defences cost honest federations over longer runs",
        "",
        "Command: `python benchmarks/clean_cost.py` (inline; MLP, 10 clients, no attacker). Accuracy: mean final",
        "central accuracy over the seeds (their range); cost: the mean paired difference to every defence off on the",
        "same seed ± its standard error, in points; counts: honest",
        "updates rejected / clipped (norm bound) / capped (claimed num-examples) / projected (direction guard) /",
        "grouped with a near-identical update (sharing one client's weight, `duplicate-cosine`) / cut",
        "to the round's median influence (the influence test, `fedfuse/influence.py`),",
        "summed over the seeds and rounds. `defaults`: the guard against the server's own update on 100 labelled",
        "examples (`trusted-data 100`); `median`: `--trusted-data 0`, the guard against the round's median update.",
        "",
        *recorded_loads(data),
        "",
        "| data set | rounds | partition | seeds | defences | accuracy | cost | rejected | clipped | capped | "
        "projected | shared | cut |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = data.get("runs", {})
    combos = sorted({tuple(k.split("|")[:3]) for k in runs})
    for dataset, rounds, part in combos:
        seeds = sorted({int(k.split("|")[4]) for k in runs if k.startswith(f"{dataset}|{rounds}|{part}|")})
        cells = {d: [runs.get(f"{dataset}|{rounds}|{part}|{d}|{s}") for s in seeds] for d in DEFENCES}
        if any(None in rs for rs in cells.values()):
            continue
        off = [r["accuracy"] for r in cells["off"]]
        for d, rs in cells.items():
            accs = [r["accuracy"] for r in rs]
            diff = [100 * (a - b) for a, b in zip(accs, off, strict=True)]
            se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
            counts = " | ".join(str(sum(r.get(k, 0) for r in rs)) for k in COUNTS)
            lines.append(f"| {dataset} | {rounds} | {part.replace(':', ' ')} | {len(seeds)} | {d} | "
                         f"{statistics.mean(accs):.3f} ({min(accs):.3f}-{max(accs):.3f}) | "
                         f"{statistics.mean(diff):+.1f} ± {se:.1f} | {counts} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
