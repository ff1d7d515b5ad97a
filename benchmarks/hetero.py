"""Width-heterogeneous FL: HeteroFL's sub-model slicing against fedfuse's FedWB (and FedAvg at full width).

Clients cycle over the widths ¼, ½, 1 of the global model (``client-widths``: partition p gets width
``widths[p % 3]``). Each method runs the real ServerApp/ClientApp in process (``InlineGrid``), on the same
Dirichlet partitions, inits and seeds. Reported: the final global model's central test accuracy, and per width
the accuracy of the model a client of that width receives from the final global — HeteroFL's top-left slice
(:func:`fedfuse.align.slicing.slice_state`), FedWB's one-model barycenter at that width (``fuse([global],
method="wb", target_width=...)``, exactly what the strategy sends). FedAvg (every client at full width, no
heterogeneity) is the reference a full-width federation reaches with the same data and rounds.

    python benchmarks/hetero.py [--out DIR]          # -> DIR/hetero.{md,json} (default benchmarks/results; resumable)
    python benchmarks/hetero.py --quick              # tiny smoke run -> hetero-smoke.{md,json}
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, add_out, load_header, load_line, machine, ms  # noqa: E402
from fedfuse.align import derive_spec, fuse  # noqa: E402
from fedfuse.align.slicing import slice_state  # noqa: E402
from fedfuse.align.transport import member_features  # noqa: E402
from fedfuse.experiment import dataset_for, model_for  # noqa: E402
from fedfuse.results import atomic_write_bytes  # noqa: E402
from fedfuse.train import evaluate  # noqa: E402

METHODS = {
    "HeteroFL": {"strategy": "heterofl", "hetero": True},
    "FedWB": {"strategy": "wb", "hetero": True},
    "FedAvg-full": {"strategy": "fedavg", "hetero": False},
}


def widths_of(width: int) -> list[int]:
    return [width // 4, width // 2, width]


def run_config(args: argparse.Namespace, model: str, method: str, seed: int, out: Path) -> dict[str, Any]:
    width = args.mlp_width if model == "mlp" else args.cnn_width
    cfg: dict[str, Any] = {
        "dataset": args.dataset,
        "model": model,
        "width": width,
        "num-clients": args.clients,
        "num-rounds": args.rounds,
        "partition": "dirichlet",
        "alpha": args.alpha,
        "local-epochs": args.local_epochs,
        "seed": seed,
        "strategy": METHODS[method]["strategy"],
        "out": str(out),
    }
    if args.dataset == "mnist10k":
        cfg["data-root"] = args.data_root
    if METHODS[method]["hetero"]:
        cfg["client-widths"] = ",".join(str(w) for w in widths_of(width))
    return cfg


def width_accuracies(cfg: dict[str, Any], method: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Test accuracy of the model a client of each width receives from the final global ``state``."""
    ds = dataset_for(cfg)
    template = model_for(cfg, ds)
    spec = derive_spec(template, ds.x_test[:2])
    out = {}
    for w in widths_of(int(cfg["width"])):
        small = model_for(cfg, ds, width=w)
        sizes = derive_spec(small, ds.x_test[:2]).sizes
        if sizes == spec.sizes:
            sub = state
        elif method == "HeteroFL":
            sub = slice_state(state, spec, sizes)
        else:  # FedWB: the global model transported to width w (FedFusion.configure_train's call)
            sub = fuse([state], method="wb", spec=spec, template=template, target_width=sizes, bn_repair=None)
        small.load_state_dict(sub)
        out[str(w)] = evaluate(small, ds.x_test, ds.y_test)[1]
    return out


def distinct_units(cfg: dict[str, Any], state: dict[str, torch.Tensor], tol: float = 1e-3) -> list[int]:
    """(distinct, total) hidden units over all groups of ``state``: a unit's row = its incoming weights (every
    ``out`` member of its group, concatenated); rows closer than ``tol`` × the mean row norm count once
    (duplicated units — what a barycenter onto a wider support produces — are not extra capacity)."""
    ds = dataset_for(cfg)
    spec = derive_spec(model_for(cfg, ds), ds.x_test[:2])
    distinct = total = 0
    for g in spec.groups:
        rows = torch.cat([member_features(state, spec, g, m).double() for m in g.members if m.role == "out"], 1)
        close = torch.cdist(rows, rows) <= tol * rows.norm(dim=1).mean()
        seen = torch.zeros(len(rows), dtype=torch.bool)
        for i in range(len(rows)):
            if not seen[i]:
                distinct += 1
                seen |= close[i]
        total += len(rows)
    return [distinct, total]


def one_run(args: argparse.Namespace, model: str, method: str, seed: int, tmp: Path) -> dict[str, Any]:
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    out = tmp / f"{model}-{method.split()[0]}-{seed}"
    cfg = run_config(args, model, method, seed, out)
    t0 = time.perf_counter()
    last = run_server(InlineGrid(app, args.clients), cfg)
    seconds = time.perf_counter() - t0
    state = torch.load(out / "model.pt")
    per_width = width_accuracies(cfg, method, state) if METHODS[method]["hetero"] else {}
    return {
        "model": model,
        "method": method,
        "seed": seed,
        "config": cfg | {"out": None},
        "global_accuracy": float(last["central_accuracy"]),
        "width_accuracy": per_width,
        "distinct_units": distinct_units(cfg, state),
        "seconds": seconds,
        "curve": [r["central_accuracy"] for r in json.loads((out / "metrics.json").read_text())["rounds"]],
    }


def to_md(res: dict[str, Any], args: argparse.Namespace) -> str:
    used = [r for r in res["runs"] if r["seed"] < args.seeds]
    lines = [
        "# Heterogeneous widths: HeteroFL vs FedWB",
        "",
        f"Command: `{res['command']}`  ",
        f"{res.get('load') or 'Machine: ' + res['machine']}  ",
        f"Run time: {sum(r['seconds'] for r in used) / 60:.1f} min in the {len(used)} runs below (this invocation: "
        f"{res['seconds'] / 60:.1f} min)",
        "",
        "## Setup",
        "",
        f"- {args.dataset}"
        + (" (real MNIST digits: 8,000 train / 2,000 test)" if args.dataset == "mnist10k" else "")
        + f", {args.clients} clients, Dirichlet "
        f"α = {args.alpha} label skew, {args.rounds} rounds × {args.local_epochs} local epochs, every client "
        "every round, SGD lr 0.05 momentum 0.9 batch 32 (config defaults), in-process `InlineGrid` (the same "
        "ServerApp/ClientApp as the Ray backend).",
        f"- Client widths ¼, ½, 1 of the global model cycled over partitions (`client-widths`): MLP "
        f"784-w-w-10 with global w = {args.mlp_width} ({', '.join(map(str, widths_of(args.mlp_width)))}); CNN = "
        f"`build_model('cnn', width=w)` (conv w/4, w/2, w/2 channels + hidden FC w, no BatchNorm) with global "
        f"w = {args.cnn_width} ({', '.join(map(str, widths_of(args.cnn_width)))}).",
        "- HeteroFL = `heterofl` (top-left sub-model slicing, masked averaging; without HeteroFL's Scaler and "
        "static BN); FedWB = `wb` (exact OT, default barycenter iterations; a client gets the global model "
        "transported to its width, the server fuses all widths back to the global width); FedAvg = every client "
        "at full width (reference, no heterogeneity).",
        f"- Same seeds {list(range(args.seeds))} for every method (a seed fixes partition, init and shuffling). "
        "*global* = the final global model's central test accuracy; *width w* = test accuracy of the model a "
        "client of width w receives from the final global (HeteroFL's slice, FedWB's transported model). "
        "Mean ± std over seeds. *distinct units* = hidden units of the final global model (all groups) whose "
        "incoming weights differ by more than 10⁻³ × the mean row norm (mean over seeds / total): duplicated units "
        "are not extra capacity.",
        "",
    ]
    for model in args.models:
        widths = widths_of(args.mlp_width if model == "mlp" else args.cnn_width)
        lines += [
            f"## {model}",
            "",
            "| method | seeds | global | " + " | ".join(f"width {w}" for w in widths) + " | distinct units | s / run |",
            "|---|---|---|" + "---|" * len(widths) + "---|---|",
        ]
        for method in METHODS:  # every method with runs (a resume may have run only some)
            runs = [r for r in used if r["model"] == model and r["method"] == method]
            if not runs:
                continue
            cells = [str(len(runs)), ms([r["global_accuracy"] for r in runs])]
            for w in widths:
                vals = [r["width_accuracy"][str(w)] for r in runs if str(w) in r["width_accuracy"]]
                cells.append(ms(vals) if vals else "–")
            units = [r["distinct_units"] for r in runs if "distinct_units" in r]
            cells.append(f"{statistics.fmean(d for d, _ in units):.0f} / {units[0][1]}" if units else "–")
            secs = statistics.fmean(r["seconds"] for r in runs)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {secs:.0f} |")
        lines.append("")
    lines += ["Per-seed accuracies and curves are in the JSON next to this file.", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], args: argparse.Namespace, cmd: str, seconds: float, stem: Path, start: str) -> None:
    """JSON (every run so far) and Markdown (the runs of seeds < ``--seeds``), each written atomically; both record
    the machine and load at ``start`` (a :func:`load_line`) and now."""
    load = load_header(start, load_line())
    res.update({"command": cmd, "machine": machine(), "load": load, "seconds": seconds})
    res["args"] = {**vars(args), "out": str(args.out)}
    atomic_write_bytes(stem.with_suffix(".json"), json.dumps(res, indent=1, default=float).encode())
    atomic_write_bytes(stem.with_suffix(".md"), to_md(res, args).encode())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run on digits (writes hetero-smoke.*)")
    p.add_argument("--dataset", default="mnist10k")
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=("mlp", "cnn"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--mlp-width", type=int, default=256)
    p.add_argument("--cnn-width", type=int, default=128)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--suffix", default="")
    p.add_argument("--fresh", action="store_true", help="ignore runs already in the JSON (default: resume)")
    add_out(p, RESULTS)
    args = p.parse_args(argv)
    start = load_line()
    print(start, flush=True)
    if args.quick:
        args.dataset, args.models, args.mlp_width, args.cnn_width = "digits", ["mlp"], 64, 32
        args.clients, args.rounds, args.local_epochs, args.seeds = 3, 2, 1, 1
        args.suffix = args.suffix or "-smoke"
    for name in ("mlp_width", "cnn_width"):
        if getattr(args, name) % 4:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be a multiple of 4 (widths ¼, ½, 1)")
    torch.set_num_threads(1)
    cmd = " ".join(
        shlex.quote(a)
        for a in [
            sys.executable.replace(str(ROOT) + "/", ""),
            "benchmarks/hetero.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"hetero{args.suffix}"
    json_path = stem.with_suffix(".json")
    runs: list[dict[str, Any]] = []
    if json_path.exists() and not args.fresh:
        runs = json.loads(json_path.read_text())["runs"]
        print(f"resuming: {len(runs)} run(s) already in {json_path}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hetero-"))
    t0 = time.perf_counter()
    res: dict[str, Any] = {"runs": runs}
    for seed in range(args.seeds):
        for model in args.models:
            for method in args.methods:
                if any(r["model"] == model and r["method"] == method and r["seed"] == seed for r in runs):
                    continue
                run = one_run(args, model, method, seed, tmp)
                runs.append(run)
                print(
                    f"[hetero] {model} {method:12s} seed={seed} global={run['global_accuracy']:.3f} "
                    f"widths={ {w: round(a, 3) for w, a in run['width_accuracy'].items()} } units={run['distinct_units']} "
                    f"({run['seconds']:.0f}s)",
                    flush=True,
                )
                write(res, args, cmd, time.perf_counter() - t0, stem, start)
    write(res, args, cmd, time.perf_counter() - t0, stem, start)  # also when every run was already there (resume)
    print(load_line(), flush=True)
    print(f"wrote {stem}.md / .json ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
