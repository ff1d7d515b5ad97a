"""Attack × strategy matrix with fedfuse's default defences, and what the defaults cost on clean runs (inline).

    python benchmarks/attacks.py [--shard i/n]     # resumable; writes benchmarks/results/attacks.md (+ .json)

Digits MLP, 3 rounds. Attacks (``fedfuse.attacks``): 1 attacker of 5 clients, 2 of 10 and 3 of 10 (drawn from the
seed), Dirichlet α = 0.3, seed 0, against fedavg, wb and match, every attack with the shipped defaults. Clean
runs (no attacker): Dirichlet α = 0.1 and 1 and quantity skew (α = 0.3), 10 clients, seeds 0-2, with the
defaults and with every defence off (``OFF``), to measure what the defaults cost and how many honest clients
they reject. Jobs run in priority order (fedavg first), so a partial run still fills whole rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import parse_shard  # noqa: E402

STRATEGIES = ["fedavg", "wb", "match"]
ATTACKS = [
    "none", "scale:1e6", "signflip:2", "signflip:4", "signflip:8", "alie:1", "ipm:4", "adaptive:0.99",
    "labelflip", "labelflip:4",
]  # fmt: skip
SETTINGS = [(5, 1), (10, 2), (10, 3)]  # (clients, attackers)
OFF = {"update-norm-bound": 0.0, "examples-cap": 0.0, "examples-bound": 0.0, "min-update-cosine": -1.0,
       "direction-guard": "off", "robust": "none"}  # fmt: skip
DEFENCES = {"off": OFF, "defaults": {}}
CLEAN = [("dirichlet", 0.1), ("dirichlet", 1.0), ("quantity", 0.3)]
SEEDS = [0, 1, 2]
BASE = {"dataset": "digits", "model": "mlp", "num-rounds": 3}
COUNTS = ("rejected", "clipped", "capped", "projected", "skipped", "diverged")


def run_cell(cfg: dict) -> dict:
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    out = Path(tempfile.mkdtemp(prefix="attacks-"))
    t0 = time.perf_counter()
    try:
        run_server(InlineGrid(app, int(cfg["num-clients"])), validate_config({**BASE, **cfg, "out": str(out)}))
    except Exception as exc:  # noqa: BLE001 — a crash is a result here
        shutil.rmtree(out, ignore_errors=True)
        return {"crashed": f"{type(exc).__name__}: {exc}"[:200], "seconds": time.perf_counter() - t0}
    rows = load_metrics(out)["rounds"]
    shutil.rmtree(out, ignore_errors=True)
    res = {"accuracy": rows[-1]["central_accuracy"], "seconds": time.perf_counter() - t0}
    return res | {k: int(sum(r.get(k, 0) for r in rows[1:])) for k in COUNTS}


def jobs() -> list[tuple[str, dict]]:
    """(key, config) in priority order: fedavg's attack matrix and clean runs first, then wb, then match."""
    out = []
    for s in STRATEGIES:
        for n, k in SETTINGS:
            for a in ATTACKS:
                cfg = {"strategy": s, "num-clients": n, "seed": 0, "partition": "dirichlet", "alpha": 0.3}
                if a != "none":
                    cfg |= {"attack": a, "attackers": k}
                out.append((f"attack|{s}|{n}|{k}|{a}", cfg))
        for part, alpha in CLEAN:
            for seed in SEEDS:
                for d, defence in DEFENCES.items():
                    cfg = {"strategy": s, "num-clients": 10, "seed": seed, "partition": part, "alpha": alpha}
                    out.append((f"clean|{s}|{part}:{alpha}|{seed}|{d}", cfg | defence))
    return out


def main() -> None:
    import logging

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th job from the i-th (parallel processes)")
    p.add_argument("--table-only", action="store_true", help="only rewrite attacks.md from the JSON files")
    args = p.parse_args()
    shard, shards = parse_shard(p, args.shard)
    logging.disable(logging.WARNING)
    results_dir = ROOT / "benchmarks" / "results"
    json_path = results_dir / f"attacks.shard{shard}.json"
    results = load_results(results_dir)
    for i, (key, cfg) in enumerate(jobs()):
        if args.table_only or i % shards != shard or key in results:
            continue
        mine = json.loads(json_path.read_text()) if json_path.exists() else {}
        mine[key] = results[key] = run_cell(cfg)
        print(key, _cell(results[key]), f"{results[key]['seconds']:.1f}s", flush=True)
        json_path.write_text(json.dumps(mine, indent=1))
    write_table(results, results_dir / "attacks.md")


def load_results(results_dir: Path) -> dict[str, dict]:
    """Every measured cell (``attacks.json`` and the per-shard files)."""
    results: dict[str, dict] = {}
    for path in sorted(results_dir.glob("attacks*.json")):
        data = json.loads(path.read_text())
        results |= {k: v for k, v in data.items() if k.startswith(("attack|", "clean|"))}
    return results


def _cell(r: dict | None, clean: dict | None = None) -> str:
    if r is None:
        return "–"
    if "crashed" in r:
        return "server crashed"
    gap = f" ({100 * (r['accuracy'] - clean['accuracy']):+.1f})" if clean and "accuracy" in clean else ""
    marks = "".join(f" {r[k]}{k[0]}" for k in ("rejected", "clipped", "capped", "projected") if r.get(k))
    return f"{r['accuracy']:.3f}{gap}{marks}"


def write_table(results: dict[str, dict], path: Path) -> None:
    import statistics

    lines = [
        "# Attacks × strategies with the default defences, and their cost on clean runs",
        "",
        "Command: `python benchmarks/attacks.py` (inline; digits MLP, 3 rounds, seed 0; attacks with Dirichlet",
        "α = 0.3). Cell: final central accuracy, (gap to the same strategy's no-attack run with the defaults, in",
        "points), then the updates over the run that were **r**ejected, **c**lipped (norm bound), had their claim",
        "**c**apped, and **p**rojected (direction guard) — e.g. `3c 3c 2p` = 3 clipped, 3 capped, 2 projected.",
        "Defaults: update-norm-bound 3 × the median norm per local step (clip), examples-cap 10, direction-guard",
        "median, robust none (`fedfuse/screening.py`). `–`: not measured.",
        "",
    ]
    for n, k in SETTINGS:
        lines += [f"## {k} attacker(s) of {n} clients", "", "| attack | " + " | ".join(STRATEGIES) + " |",
                  "|---|" + "---|" * len(STRATEGIES)]  # fmt: skip
        for a in ATTACKS:
            cells = [_cell(results.get(f"attack|{s}|{n}|{k}|{a}"), results.get(f"attack|{s}|{n}|{k}|none"))
                     if a != "none" else _cell(results.get(f"attack|{s}|{n}|{k}|none")) for s in STRATEGIES]  # fmt: skip
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Clean runs: what the defaults cost (10 clients, no attacker)",
        "",
        "Mean final accuracy over the seeds measured, defences off → defaults (difference in points); honest",
        "updates rejected / clipped / capped / projected by the defaults, summed over seeds and rounds.",
        "",
        "| partition | strategy | seeds | off | defaults | cost | rejected | clipped | capped | projected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part, alpha in CLEAN:
        for s in STRATEGIES:
            pairs = [(results.get(f"clean|{s}|{part}:{alpha}|{seed}|off"),
                      results.get(f"clean|{s}|{part}:{alpha}|{seed}|defaults")) for seed in SEEDS]  # fmt: skip
            pairs = [(o, d) for o, d in pairs if o and d and "accuracy" in o and "accuracy" in d]
            if not pairs:
                lines.append(f"| {part} {alpha} | {s} | 0 | – | – | – | – | – | – | – |")
                continue
            off = statistics.mean(o["accuracy"] for o, _ in pairs)
            on = statistics.mean(d["accuracy"] for _, d in pairs)
            counts = [str(sum(d.get(c, 0) for _, d in pairs)) for c in ("rejected", "clipped", "capped", "projected")]
            lines.append(f"| {part} {alpha} | {s} | {len(pairs)} | {off:.3f} | {on:.3f} | {100 * (on - off):+.1f} | "
                         + " | ".join(counts) + " |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
