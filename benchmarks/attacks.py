"""Attack × strategy × defence table: simulated Byzantine clients against fedavg, wb and match (inline backend).

    python benchmarks/attacks.py            # writes benchmarks/results/attacks.md (+ .json)

Digits MLP, seed 0, 3 rounds, Dirichlet α = 0.3; two federations: 1 attacker of 5 clients and 2 of 10
(attackers drawn from the seed, :func:`fedfuse.attacks.attacker_ids`). Per cell the final central accuracy
and, in brackets, the updates rejected over the run. Defences:

* ``off``: ``update-norm-bound 0``, ``examples-bound 0``, ``robust none`` (what fedfuse did before);
* ``defaults``: the shipped defaults (update-norm bound 4 × the round's median, reject; examples bound
  10 × the round's median; ``robust none``);
* ``median`` / ``trimmed-mean`` / ``krum``: that robust reduction (after alignment for wb/match) with the
  screening bounds off, to show what the reduction alone does (a smaller grid: see ``ROBUST_ATTACKS``).

``extra-bytes`` sends 1e7 bytes (the MLP is ~40 KB, so 2 × the model is the limit): the same code path as
2e9 bytes, without allocating gigabytes on a shared machine. ``server crashed`` marks a run that raised.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ["fedavg", "wb", "match"]
ATTACKS = [
    "none",
    "scale:1e6",
    "signflip:10",
    "signflip:4",
    "num-examples:1e12",
    "num-examples:1e8",
    "num-examples:nan",
    "extra-bytes:1e7",
]
SETTINGS = [(5, 1), (10, 2)]  # (clients, attackers)
OFF = {"update-norm-bound": 0.0, "examples-bound": 0.0, "min-update-cosine": -1.0, "robust": "none"}
DEFENCES = {"off": OFF, "defaults": {}}
ROBUST = {name: {**OFF, "robust": name} for name in ("median", "trimmed-mean", "krum")}
ROBUST_STRATEGIES = ["fedavg", "wb"]
ROBUST_ATTACKS = ["none", "scale:1e6", "signflip:10", "signflip:4", "num-examples:1e8"]
BASE = {"dataset": "digits", "model": "mlp", "num-rounds": 3, "seed": 0}


def run_cell(strategy: str, clients: int, attackers: int, attack: str, defence: dict) -> dict:
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    out = Path(tempfile.mkdtemp(prefix="attacks-"))
    cfg = {**BASE, "strategy": strategy, "num-clients": clients, "out": str(out), **defence}
    if attack != "none":
        cfg.update({"attack": attack, "attackers": attackers})
    t0 = time.perf_counter()
    try:
        run_server(InlineGrid(app, clients), validate_config(cfg))
    except Exception as exc:  # noqa: BLE001 — a crash is a result here
        shutil.rmtree(out, ignore_errors=True)
        return {"crashed": f"{type(exc).__name__}: {exc}"[:200], "seconds": time.perf_counter() - t0}
    rows = load_metrics(out)["rounds"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "accuracy": rows[-1]["central_accuracy"],
        "rejected": int(sum(r.get("rejected", 0) for r in rows[1:])),
        "skipped": int(sum(r.get("skipped", 0) for r in rows[1:])),
        "diverged": int(sum(r.get("diverged", 0) for r in rows[1:])),
        "seconds": time.perf_counter() - t0,
    }


def _cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if "crashed" in r:
        return "server crashed"
    diverged = f", {r['diverged']} diverged" if r.get("diverged") else ""
    return f"{r['accuracy']:.3f} ({r['rejected']}{diverged})"


def main() -> None:
    import logging

    logging.disable(logging.WARNING)
    results_dir = ROOT / "benchmarks" / "results"
    json_path = results_dir / "attacks.json"
    results: dict[str, dict] = json.loads(json_path.read_text()) if json_path.exists() else {}
    jobs = [(s, n, k, a, d) for n, k in SETTINGS for s in STRATEGIES for a in ATTACKS for d in DEFENCES] + [
        (s, n, k, a, d) for n, k in SETTINGS for s in ROBUST_STRATEGIES for a in ROBUST_ATTACKS for d in ROBUST
    ]
    for s, n, k, a, d in jobs:
        key = f"{s}|{n}|{k}|{a}|{d}"
        if key in results:  # resumable: cells already measured are kept
            continue
        results[key] = run_cell(s, n, k, a, {**DEFENCES, **ROBUST}[d])
        print(key, _cell(results[key]), f"{results[key]['seconds']:.1f}s", flush=True)
        json_path.write_text(json.dumps(results, indent=1))
    write_table(results, results_dir / "attacks.md")


def write_table(results: dict[str, dict], path: Path) -> None:
    get = lambda s, n, k, a, d: results.get(f"{s}|{n}|{k}|{a}|{d}")  # noqa: E731
    lines = [
        "# Attacks × strategies × defences",
        "",
        "Command: `python benchmarks/attacks.py` (inline backend; digits MLP, Dirichlet α=0.3, 3 rounds, seed 0).",
        "Cell: final central accuracy (updates rejected over the 3 rounds; updates that diverged after training from",
        "a poisoned global model, not blamed on their clients). `off` → `defaults`: before → after.",
        "`extra-bytes` sends 1e7 bytes (bounded on purpose; 2e9 takes the same path). Gap = defaults − no-attack",
        "defaults, in points.",
        "",
    ]
    for n, k in SETTINGS:
        lines += [f"## {k} attacker(s) of {n} clients", "", "| attack | " + " | ".join(
            f"{s} off → defaults (gap)" for s in STRATEGIES) + " |", "|---|" + "---|" * len(STRATEGIES)]  # fmt: skip
        for a in ATTACKS:
            cells = []
            for s in STRATEGIES:
                off, on, clean = get(s, n, k, a, "off"), get(s, n, k, a, "defaults"), get(s, n, k, "none", "defaults")
                gap = ""
                if on and clean and "accuracy" in on and "accuracy" in clean:
                    gap = f" ({100 * (on['accuracy'] - clean['accuracy']):+.1f})"
                cells.append(f"{_cell(off)} → {_cell(on)}{gap}")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines += ["", f"Robust reductions alone (screening off), {k} of {n}:", ""]
        lines += ["| strategy | attack | " + " | ".join(ROBUST) + " |", "|---|---|" + "---|" * len(ROBUST)]
        for s in ROBUST_STRATEGIES:
            for a in ROBUST_ATTACKS:
                lines.append(f"| {s} | {a} | " + " | ".join(_cell(get(s, n, k, a, d)) for d in ROBUST) + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
