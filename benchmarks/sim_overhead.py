"""Simulation overhead: the same federated training through Ray, the inline backend and a plain loop.

    python benchmarks/sim_overhead.py                       # tiny (digits MLP): plain, inline, inline+screen, ray
    python benchmarks/sim_overhead.py --workloads tiny --backends plain,inline,inline@before --before /tmp/main
    python benchmarks/sim_overhead.py --workloads realistic --backends inline,ray  # CNN on mnist10k (no plain loop)
    python benchmarks/sim_overhead.py --scale 100,1000      # peak RSS with 10% of N clients sampled per round

"Identical" = same data, partitions, init, seeds, client sampling, local epochs, model and aggregation order; the
script checks that the final weights of every backend are bit-identical to the plain loop's. The plain loop
(benchmarks/plain_fedavg.py) imports torch and numpy only and does everything itself (loads and splits the data,
partitions it, builds the model, samples, trains, averages, evaluates), as fedfuse does inside its timing. The tiny
workload runs with screening off (plain FedAvg, the plain loop's work); ``inline+screen`` adds the default screening.
``--before DIR`` with ``inline@before`` runs the inline backend from another checkout in the same run (before/after).
Everything goes under ``--out`` (default /tmp/fedfuse-sim-overhead; the report OUT/sim_overhead.md unless
``--results``): a read-only checkout can run it. The report records the machine and its load before and after. Each
backend runs in its own subprocess (fresh interpreter, fresh Ray), so start-up is counted honestly.
Ratios are measured in one run of this script (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCREEN_OFF = {"update-norm-bound": 0.0, "examples-cap": 0.0, "direction-guard": "off"}
SCREEN_DEFAULTS = {"update-norm-bound": 3.0, "examples-cap": 10.0, "direction-guard": "median"}
WORKLOADS: dict[str, dict[str, Any]] = {
    # IID, screening and plot off: the work of benchmarks/plain_fedavg.py; ``+screen``/``+plot`` add the defaults
    "tiny": {
        "dataset": "digits",
        "model": "mlp",
        "num-clients": 10,
        "num-rounds": 5,
        "local-epochs": 1,
        "partition": "iid",
        "plot": False,
        **SCREEN_OFF,
    },  # fmt: skip
    "realistic": {
        "dataset": "mnist10k",
        "data-root": str(ROOT.parent / "shared" / "data"),
        "model": "cnn",
        "num-clients": 10,
        "num-rounds": 5,
        "local-epochs": 1,
    },
}


def run_backend(backend: str, cfg: dict[str, Any], out: Path, root: Path = ROOT) -> dict[str, Any]:
    """Run one backend in a subprocess; wall time from process start to exit, plus its metrics. ``backend``:
    ``plain``, ``inline`` or ``ray``, optionally ``+screen`` (the default screening on) and ``@before`` (the
    checkout ``root`` instead of this one)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "out": str(out), **(SCREEN_DEFAULTS if "+screen" in backend else {})}
    if "+plot" in backend:
        cfg["plot"] = True
    if "@before" in backend:  # a checkout from before the plot option: it always plots
        cfg.pop("plot", None)
    backend = backend.split("+")[0].split("@")[0]
    code = f"import json, sys; sys.path.insert(0, {str(root)!r}); cfg = json.loads({json.dumps(json.dumps(cfg))})\n"
    if backend == "plain":  # a fresh interpreter that imports torch and numpy only, and does everything itself
        (out / "config.json").write_text(json.dumps(cfg))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_fedavg.py"), str(out / "config.json"), str(out)]
    elif backend == "inline":
        code += (
            "from fedfuse.runners.inline import InlineGrid; from strategies.server_app import run_server\n"
            "from clients.client_app import app; run_server(InlineGrid(app, cfg['num-clients']), cfg); r = {}\n"
        )
    else:
        code += (
            "import logging; logging.getLogger('flwr').setLevel(logging.WARNING)\n"
            "from flwr.simulation import run_simulation\n"
            "from strategies.server_app import make_server_app; from clients.client_app import app\n"
            "run_simulation(server_app=make_server_app(cfg), client_app=app, num_supernodes=cfg['num-clients'],\n"
            "  backend_config={'client_resources': {'num_cpus': 1, 'num_gpus': 0.0},\n"
            "                  'init_args': {'logging_level': 'ERROR', 'log_to_driver': False}}); r = {}\n"
        )
    code += (
        "import resource; r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print('RESULT', json.dumps(r))\n"
    )
    if backend != "plain":
        cmd = [sys.executable, "-c", code]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[7:])
    result["wall_s"] = wall
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["children_peak_rss_mb"] = children
    metrics = out / "metrics.json"
    if metrics.exists():
        rows = json.loads(metrics.read_text())["rounds"]
        result["rounds"] = rows
        later = [b["wall_time"] - a["wall_time"] for a, b in zip(rows[1:], rows[2:], strict=False)]
        result["first_round_s"] = rows[1]["wall_time"] - rows[0]["wall_time"]
        result["later_round_mean_s"] = sum(later) / max(len(later), 1)
        result["aggregate_s"] = sum(r.get("aggregate_s", 0.0) for r in rows[1:])
        result["server_s"] = sum(r.get("server_s", 0.0) for r in rows[1:])
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def overhead(args: argparse.Namespace) -> list[str]:
    lines = [
        "| workload | backend | wall s | ratio vs plain | round 1 s | later rounds s (mean) | aggregation s "
        "| server s | client training s (plain) | weights == plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    results: dict[str, Any] = {}
    for name in args.workloads.split(","):
        cfg = {**WORKLOADS[name], "seed": 0}
        runs: dict[str, list[dict[str, Any]]] = {b: [] for b in args.backends.split(",")}
        for rep in range(args.repeat):  # interleaved, so a change in the machine's load hits every backend alike
            for b in runs:
                root = Path(args.before) if "@before" in b else ROOT
                runs[b].append(run_backend(b, cfg, Path(args.out) / name / b / str(rep), root))
        res = {b: median_run(rs) for b, rs in runs.items()}
        results[name] = {b: {"median": res[b], "walls": [r["wall_s"] for r in rs]} for b, rs in runs.items()}
        base_name = "plain" if "plain" in res else next(iter(res))
        base = res[base_name]
        for backend, r in res.items():
            equal = all(
                same_weights(Path(args.out) / name / backend / str(i), Path(args.out) / name / base_name / str(i))
                for i in range(args.repeat)
            )
            lines.append(
                f"| {name} | {backend} | {r['wall_s']:.2f} | {r['wall_s'] / base['wall_s']:.2f} "
                f"| {r.get('first_round_s', float('nan')):.2f} | {r.get('later_round_mean_s', float('nan')):.2f} "
                f"| {r.get('aggregate_s', float('nan')):.3f} | {r.get('server_s', float('nan')):.3f} "
                f"| {base.get('train_s', float('nan')):.1f} | {equal} |"
            )
            print(lines[-1], flush=True)
    (Path(args.out) / "overhead.json").write_text(json.dumps(results, indent=2, default=str))
    return lines


def fusion_share(args: argparse.Namespace) -> list[str]:
    """Share of each round's wall time spent in aggregation, for FedAvg and the fusion strategies."""
    lines = ["| workload | strategy | backend | round s (mean, rounds 2+) | aggregation s / round | share |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in args.workloads.split(","):
        for strategy in args.fusion.split(","):
            cfg = {**WORKLOADS[name], "seed": 0, "strategy": strategy}
            r = run_backend("inline", cfg, Path(args.out) / name / f"fusion-{strategy}")
            rows = r["rounds"][2:]  # round 1 carries first-call costs (imports, data loading)
            agg = sum(x["aggregate_s"] for x in rows) / len(rows)
            rnd = r["later_round_mean_s"]
            lines.append(f"| {name} | {strategy} | inline | {rnd:.2f} | {agg:.3f} | {agg / rnd:.1%} |")
            print(lines[-1], flush=True)
    return lines


def scale(args: argparse.Namespace) -> list[str]:
    lines = ["| clients | sampled/round | backend | wall s | peak RSS MB |", "|---|---|---|---|---|"]
    for n in [int(v) for v in args.scale.split(",")]:
        cfg = {
            "dataset": "mnist1d",
            "model": "mlp",
            "num-clients": n,
            "num-rounds": 3,
            "partition": "iid",
            "fraction-train": 0.1,
            "local-epochs": 1,
            "seed": 0,
        }
        for backend in args.scale_backends.split(","):
            r = run_backend(backend, cfg, Path(args.out) / f"scale{n}" / backend)
            lines.append(f"| {n} | {max(2, -(-n // 10))} | {backend} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="tiny", help="tiny (digits MLP; plain loop) and/or realistic (no plain)")
    p.add_argument(
        "--backends", default="plain,inline,inline+screen+plot,ray",
        help="plain, inline, ray; +screen/+plot: default screening/plot on; @before: from the --before checkout",
    )  # fmt: skip
    p.add_argument("--repeat", type=int, default=1, help="runs per backend (interleaved); the table shows medians")
    p.add_argument("--before", default="", help="another checkout (e.g. a git worktree of main) for @before")
    p.add_argument(
        "--fusion", default="", help="strategies whose aggregation share of a round to measure, e.g. fedavg,wb"
    )
    p.add_argument("--scale", default="", help="comma-separated client counts for the memory-scale run")
    p.add_argument("--scale-backends", default="inline,ray")
    p.add_argument("--out", default="/tmp/fedfuse-sim-overhead", help="directory for the runs and the report")
    p.add_argument("--results", default=None, help="report file (default: OUT/sim_overhead.md)")
    args = p.parse_args()
    from benchmarks.common import load_line

    args.results = args.results or str(Path(args.out) / "sim_overhead.md")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/sim_overhead.py {' '.join(sys.argv[1:])}"
    sections = [f"# Simulation overhead\n\nCommand: `{command}`\n\nBefore: {load_line()}\n"]
    if args.workloads and args.backends:
        sections.append("\n".join(overhead(args)))
    if args.fusion:
        sections.append("## Aggregation share of a round\n\n" + "\n".join(fusion_share(args)))
    if args.scale:
        sections.append("## Scale (10% sampled per round, 3 rounds, mnist1d MLP)\n\n" + "\n".join(scale(args)))
    sections.append(f"After: {load_line()}")
    Path(args.results).write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
