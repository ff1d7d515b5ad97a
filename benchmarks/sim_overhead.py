"""Simulation overhead: the same federated training through Ray, the inline backend and a plain loop.

    python benchmarks/sim_overhead.py                       # tiny (digits MLP) + realistic (CNN on mnist10k)
    python benchmarks/sim_overhead.py --workloads tiny --backends inline,plain
    python benchmarks/sim_overhead.py --scale 100,1000      # peak RSS with 10% of N clients sampled per round

"Identical" = same partitions, seeds, client sampling, local epochs, model and aggregation order; the
script checks that the final weights of every backend are bit-identical to the plain loop's. Each
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

WORKLOADS: dict[str, dict[str, Any]] = {
    "tiny": {"dataset": "digits", "model": "mlp", "num-clients": 10, "num-rounds": 5, "local-epochs": 1},
    "realistic": {
        "dataset": "mnist10k",
        "data-root": str(ROOT.parent / "shared" / "data"),
        "model": "cnn",
        "num-clients": 10,
        "num-rounds": 5,
        "local-epochs": 1,
    },
}


def plain_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """FedAvg as a plain Python loop over the same fedfuse functions the ClientApp and strategy use,
    with the same per-round central evaluation on the test set (the work a researcher's loop does too)."""
    import torch

    from fedfuse.config import validate_config
    from fedfuse.experiment import client_data, dataset_for, local_plan, local_train, model_for, sample_clients
    from fedfuse.state import torch_threads
    from fedfuse.train import evaluate
    from strategies.base import FedFuseStrategy

    t0 = time.perf_counter()
    cfg = validate_config(cfg)
    ds = dataset_for(cfg)
    n = cfg["num-clients"]
    model = model_for(cfg, ds)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    aggregate = FedFuseStrategy(seed=cfg["seed"]).aggregate_arrays
    data = {}
    t_setup = time.perf_counter() - t0
    train_s = agg_s = eval_s = 0.0
    t = time.perf_counter()
    evaluate(model, ds.x_test, ds.y_test)
    eval_s += time.perf_counter() - t
    for rnd in range(1, cfg["num-rounds"] + 1):
        sampled = sample_clients(cfg["seed"], rnd, n, cfg["fraction-train"], min(2, n))
        states, weights = [], []
        t = time.perf_counter()
        for pid in sampled:
            if pid not in data:
                data[pid] = client_data(cfg, pid, n)
            x, y = data[pid]
            local = model_for(cfg, ds)
            local.load_state_dict(state)
            with torch_threads(cfg["client-threads"]):
                res = local_train(cfg, local, x, y, local_plan(cfg, pid, rnd, len(x)))
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(float(res.num_examples))
        train_s += time.perf_counter() - t
        t = time.perf_counter()
        state = aggregate(rnd, states, weights)
        agg_s += time.perf_counter() - t
        t = time.perf_counter()
        model.load_state_dict(state)
        evaluate(model, ds.x_test, ds.y_test)
        eval_s += time.perf_counter() - t
    torch.save(state, Path(cfg["out"]) / "model.pt")
    return {"setup_s": t_setup, "train_s": train_s, "aggregate_s": agg_s, "eval_s": eval_s}


def run_backend(backend: str, cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run one backend in a subprocess; wall time from process start to exit, plus its metrics."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "out": str(out)}
    code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); cfg = json.loads({json.dumps(json.dumps(cfg))})\n"
    if backend == "plain":
        code += "from benchmarks.sim_overhead import plain_loop; r = plain_loop(cfg)\n"
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
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
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
    return result


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def overhead(args: argparse.Namespace) -> list[str]:
    lines = [
        "| workload | backend | wall s | ratio vs plain | round 1 s | later rounds s (mean) | aggregation s "
        "| client training s (plain) | weights == plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results: dict[str, Any] = {}
    for name in args.workloads.split(","):
        cfg = {**WORKLOADS[name], "seed": 0}
        res = {b: run_backend(b, cfg, Path(args.out) / name / b) for b in args.backends.split(",")}
        results[name] = res
        base = res["plain"]
        for backend, r in res.items():
            equal = same_weights(Path(args.out) / name / backend, Path(args.out) / name / "plain")
            lines.append(
                f"| {name} | {backend} | {r['wall_s']:.1f} | {r['wall_s'] / base['wall_s']:.2f} "
                f"| {r.get('first_round_s', float('nan')):.2f} | {r.get('later_round_mean_s', float('nan')):.2f} "
                f"| {r.get('aggregate_s', float('nan')):.3f} | {base['train_s']:.1f} | {equal} |"
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
    p.add_argument("--workloads", default="tiny,realistic")
    p.add_argument("--backends", default="plain,inline,ray")
    p.add_argument(
        "--fusion", default="", help="strategies whose aggregation share of a round to measure, e.g. fedavg,wb"
    )
    p.add_argument("--scale", default="", help="comma-separated client counts for the memory-scale run")
    p.add_argument("--scale-backends", default="inline,ray")
    p.add_argument("--out", default="/tmp/fedfuse-sim-overhead")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "sim_overhead.md"))
    args = p.parse_args()
    sections = [f"# Simulation overhead\n\nCommand: `python benchmarks/sim_overhead.py {' '.join(sys.argv[1:])}`\n"]
    if args.workloads and args.backends:
        sections.append("\n".join(overhead(args)))
    if args.fusion:
        sections.append("## Aggregation share of a round\n\n" + "\n".join(fusion_share(args)))
    if args.scale:
        sections.append("## Scale (10% sampled per round, 3 rounds, mnist1d MLP)\n\n" + "\n".join(scale(args)))
    Path(args.results).write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
