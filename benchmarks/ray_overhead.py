"""The Ray path at Flower's own cost: ``fedfuse simulate --backend ray`` against Flower's own FedAvg app
(benchmarks/flower_fedavg/, no fedfuse code) run through the same runtime, ``flwr run`` on a local SuperLink in
simulation mode (Flower's simulation engine on Ray). Same work: digits, the 64-128-128-10 MLP, 10 clients, all
sampled, 15 rounds, one local epoch, central evaluation every round.

    python benchmarks/ray_overhead.py --out /tmp/ray-overhead            # one pair
    python benchmarks/ray_overhead.py --repeats 3 --rounds 15 --out DIR  # alternating order, medians

Wall time is end to end: fedfuse's from launching its CLI to its exit (imports, option checks, preflight, its own
SuperLink, the run, stopping every process it started); Flower's from starting an identical SuperLink until
``flwr run --stream`` returns — what a Flower user waits for — plus stopping that SuperLink (the ``flwr list`` that
confirms the run ``finished:completed`` is not counted). The second anchor, ``flower-fastest``, is the same app on
Flower's fastest simulation path: ``run_simulation`` in one process (benchmarks/flower_fedavg/fastest.py; deprecated
by Flower 1.41, so fedfuse does not take it), timed from launching that process to its exit. Later rounds: the
mean round time after round 1 from each run's own per-round clock. Everything goes under ``--out``; the report
records the machine and its load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_line  # noqa: E402
from fedfuse.runners.ray import SuperLinkProcess, _tool, wait_finished  # noqa: E402

FED = ("num-supernodes={n} client-resources-num-cpus=1 client-resources-num-gpus=0 "
       "init-args-logging-level='ERROR' init-args-log-to-driver=false")  # fmt: skip


def _later(rows: list[dict[str, Any]]) -> float:
    times = [float(r["wall_time"]) for r in sorted(rows, key=lambda r: r["round"]) if r["round"] >= 1]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.fmean(gaps) if gaps else float("nan")


def run_fedfuse(out: Path, clients: int, rounds: int, root: Path = ROOT) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--backend", "ray", "--no-progress", "--dataset", "digits",
           "--model", "mlp", "--num-clients", str(clients), "--rounds", str(rounds), "--fraction-train", "1",
           "--local-epochs", "1", "--seed", "0", "--out", str(out)]  # fmt: skip
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"fedfuse failed:\n{proc.stderr[-3000:]}")
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    return {"wall_s": wall, "later_round_s": _later(rows), "accuracy": rows[-1]["central_accuracy"],
            "server_s": sum(r.get("server_s", 0.0) for r in rows)}  # fmt: skip


def run_flower(out: Path, clients: int, rounds: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flower-fedavg-") as tmp:
        app = Path(tmp) / "app"
        shutil.copytree(ROOT / "benchmarks" / "flower_fedavg", app, ignore=shutil.ignore_patterns("__pycache__"))
        t = time.perf_counter()
        link = SuperLinkProcess(Path(tmp) / "link")
        try:
            env = link.ready()
            proc = subprocess.run(
                [_tool("flwr"), "run", str(app), "--stream", "--federation-config", FED.format(n=clients),
                 "--run-config", f"num-rounds={rounds} out='{out}'"],
                env=env, cwd=tmp, capture_output=True, text=True,
            )  # fmt: skip
            returned = time.perf_counter() - t
            run_id = next((ln.split()[-1] for ln in proc.stdout.splitlines() if "Successfully started run" in ln), "")
            status, details = wait_finished(env, run_id) if run_id else ("", proc.stdout[-2000:] + proc.stderr[-2000:])
        finally:
            s = time.perf_counter()
            link.stop()
            stop_s = time.perf_counter() - s
    if not status.endswith("completed"):
        raise RuntimeError(f"Flower's FedAvg app did not complete ({status}): {details}")
    rows = json.loads((out / "rounds.json").read_text())
    return {"wall_s": returned + stop_s, "later_round_s": _later(rows), "accuracy": rows[-1]["accuracy"]}


def run_flower_fastest(out: Path, clients: int, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "flower_fedavg" / "fastest.py"), "--clients", str(clients),
           "--rounds", str(rounds), "--out", str(out)]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"Flower's FedAvg app (run_simulation) failed:\n{proc.stderr[-3000:]}")
    rows = json.loads((out / "rounds.json").read_text())
    return {"wall_s": wall, "later_round_s": _later(rows), "accuracy": rows[-1]["accuracy"]}


RUNNERS = {"flower": run_flower, "flower-fastest": run_flower_fastest}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=1, help="pairs, the order alternating (default 1)")
    p.add_argument("--out", default="/tmp/fedfuse-ray-overhead", help="directory for the runs and the report")
    p.add_argument("--before", default="", metavar="CHECKOUT",
                   help="also run fedfuse from another checkout (e.g. the commit before a change) as 'fedfuse-before'")  # fmt: skip
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = load_line()
    names = ["fedfuse", "flower", "flower-fastest"] + (["fedfuse-before"] if args.before else [])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i in range(args.repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            shutil.rmtree(out / f"{name}-{i}", ignore_errors=True)
            if name in RUNNERS:
                (out / f"{name}-{i}").mkdir(parents=True, exist_ok=True)
                r = RUNNERS[name](out / f"{name}-{i}", args.clients, args.rounds)
            else:
                root = Path(args.before).resolve() if name == "fedfuse-before" else ROOT
                r = run_fedfuse(out / f"{name}-{i}", args.clients, args.rounds, root)
            runs[name].append(r)
            print(name, i, json.dumps(r), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "later_round_s")} for k, v in runs.items()}
    lines = [
        "# The Ray path vs Flower's own FedAvg app (same `flwr run` simulation runtime)",
        "",
        f"Command: `python benchmarks/ray_overhead.py {' '.join(sys.argv[1:])}`",
        "",
        f"Before: {before}",
        "",
        f"digits MLP, {args.clients} clients, {args.rounds} rounds; medians of {args.repeats} run(s) each.",
        "",
        "| run | wall s | later rounds s (mean) | final accuracy |",
        "|---|---|---|---|",
    ]
    for name, rs in runs.items():
        acc = statistics.median(r["accuracy"] for r in rs)
        lines.append(f"| {name} | {med[name]['wall_s']:.1f} | {med[name]['later_round_s']:.2f} | {acc:.3f} |")
    ratio = med["fedfuse"]["wall_s"] / med["flower"]["wall_s"]
    fastest = med["fedfuse"]["wall_s"] / med["flower-fastest"]["wall_s"]
    lines += [
        "",
        f"fedfuse / Flower's app on the same `flwr run` runtime: **{ratio:.2f}×** (goal ≤ 1.1×)",
        f"fedfuse / Flower's app on its fastest path (`run_simulation`): **{fastest:.2f}×** (goal ≤ 1.3×)",
        "",
        f"After: {load_line()}",
    ]
    (out / "ray_overhead.md").write_text("\n".join(lines) + "\n")
    (out / "ray_overhead.json").write_text(
        json.dumps({"runs": runs, "median": med, "ratio": ratio, "ratio_fastest": fastest}, indent=2)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
