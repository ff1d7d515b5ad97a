"""TNA-PFN subspace benchmark: loss barriers against the fixed ratio ρ, and FL accuracy after equal rounds.

Part 1 (``barrier``): for each data set / model / ρ / seed, build one init (``build_model(..., seed=s)``), draw
one PFN mask ``pfn_mask(model, ρ, seed=s)`` (ρ = 0 is vanilla training), and train two copies A and B on
different data: ``--pairing halves`` = disjoint random IID halves of the training set, each with its own
shuffling order; ``--pairing order`` = the full training set, only the shuffling order differs. Then report,
on the test set, the final accuracy/loss of A and B, the midpoint (and max) accuracy and loss barrier
without and with weight matching afterwards (B matched onto A with ``weight_matching``), the number of
weight-matching sweeps, and the fraction of hidden units that matching moved.

Part 2 (``fl``): FedAvg, FedPFN, FedPNU, FedWB and FedPFN+FedWB (= ``fedpfn`` with ``pfn-fusion=wb``) in
process (``InlineGrid``, same ServerApp/ClientApp as the Ray backend) under Dirichlet label skew, equal rounds,
mean ± std of the final central test accuracy over seeds.

    python benchmarks/subspace.py --part barrier   # -> benchmarks/results/subspace-barrier.{md,json}
    python benchmarks/subspace.py --part fl        # -> benchmarks/results/subspace-fl.{md,json}
    (--out DIR: every file under DIR instead)
    python benchmarks/subspace.py --quick          # tiny smoke run of both -> subspace-*-smoke.{md,json}
"""

from __future__ import annotations

import argparse
import copy
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
from fedfuse.align import apply_transport, derive_spec, weight_matching  # noqa: E402
from fedfuse.data import load_dataset  # noqa: E402
from fedfuse.lmc import barrier  # noqa: E402
from fedfuse.models import build_model  # noqa: E402
from fedfuse.subspace import MaskedTraining, pfn_mask  # noqa: E402
from fedfuse.train import evaluate, train  # noqa: E402

STRATEGIES = {
    "FedAvg": {"strategy": "fedavg"},
    "FedPFN": {"strategy": "fedpfn"},
    "FedPNU": {"strategy": "fedpnu"},
    "FedWB": {"strategy": "wb"},
    "FedPFN+FedWB": {"strategy": "fedpfn", "pfn-fusion": "wb"},
}


# ----------------------------------------------------------------------------- part 1: barriers


def moved_fraction(perms: dict[str, torch.Tensor]) -> float:
    """Fraction of hidden units (over all permuted groups) that weight matching sends elsewhere."""
    moved = total = 0
    for p in perms.values():
        moved += int((p.argmax(1) != torch.arange(p.shape[0])).sum())
        total += p.shape[0]
    return moved / max(total, 1)


def one_pair(ds: Any, model_name: str, width: int, rho: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    base = build_model(model_name, ds.input_shape, ds.num_classes, width=width, seed=seed)
    init = copy.deepcopy(base.state_dict())
    masks = pfn_mask(base, rho, seed) if rho > 0 else {}
    n = len(ds.x_train)
    gen = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(n, generator=gen)
    if args.pairing == "halves":
        parts = [perm[: n // 2], perm[n // 2 :]]
    elif args.pairing == "skew":  # label-skewed halves: A gets 90% of classes < C/2, B 90% of the others
        y = ds.y_train[perm]
        u = torch.rand(n, generator=gen)
        low = y < ds.num_classes // 2
        to_a = torch.where(low, u < 0.9, u < 0.1)
        parts = [perm[to_a], perm[~to_a]]
    else:
        parts = [perm, perm]
    states, scores = [], []
    for k, idx in enumerate(parts):
        model = copy.deepcopy(base)
        model.load_state_dict(init)
        x, y = ds.x_train[idx], ds.y_train[idx]
        with MaskedTraining(model, masks) as mt:
            train(
                model,
                x,
                y,
                epochs=args.epochs,
                lr=args.lr,
                momentum=0.9,
                batch_size=32,
                seed=1000 * seed + k + 1,
                after_step=mt.after_step,
            )
        states.append(copy.deepcopy(model.state_dict()))
        scores.append(evaluate(model, ds.x_test, ds.y_test))
    # fixed entries really stayed at init (sanity; cheap)
    for name, mask in masks.items():
        fixed = mask != 0
        assert torch.equal(states[0][name][fixed], init[name][fixed]) and torch.equal(
            states[1][name][fixed], init[name][fixed]
        )

    xt, yt = ds.x_test, ds.y_test
    before = barrier(base, states[0], states[1], xt, yt, num_points=args.points)["before"]
    model_a, model_b = copy.deepcopy(base), copy.deepcopy(base)
    model_a.load_state_dict(states[0])
    model_b.load_state_dict(states[1])
    spec = derive_spec(model_a, xt[:2])
    t0 = time.perf_counter()
    perms, sweeps = weight_matching(model_a, model_b, spec, max_iter=100, seed=0, return_iterations=True)
    wm_s = time.perf_counter() - t0
    aligned = apply_transport(model_b, spec, perms)
    after = barrier(base, states[0], aligned, xt, yt, num_points=args.points)["before"]

    def pick(stats: dict[str, Any]) -> dict[str, float]:
        curve = stats["curve"]
        mid = curve["alphas"].index(0.5)
        return {
            "mid_acc_barrier": stats["mid_error"],  # error barrier = accuracy drop at the midpoint vs the line
            "mid_loss_barrier": stats["mid_loss"],
            "max_acc_barrier": stats["max_error"],
            "max_loss_barrier": stats["max_loss"],
            "mid_accuracy": curve["accuracies"][mid],
            "mid_loss": curve["losses"][mid],
        }

    free = sum(int((m == 0).sum()) for m in masks.values()) if masks else sum(p.numel() for p in base.parameters())
    return {
        "acc_a": scores[0][1],
        "acc_b": scores[1][1],
        "loss_a": scores[0][0],
        "loss_b": scores[1][0],
        "before": pick(before),
        "after": pick(after),
        "wm_sweeps": sweeps,
        "wm_seconds": wm_s,
        "wm_moved_fraction": moved_fraction(perms),
        "free_fraction": free / sum(p.numel() for p in base.parameters()),
    }


def run_barrier(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for ds_name in args.datasets:
        ds = load_dataset(ds_name, args.data_root if ds_name == "mnist10k" else None)
        if args.train_limit and len(ds.x_train) > args.train_limit:
            ds = type(ds)(
                ds.name,
                ds.x_train[: args.train_limit],
                ds.y_train[: args.train_limit],
                ds.x_test,
                ds.y_test,
                ds.num_classes,
            )
        for model_name in args.models:
            width = args.mlp_width if model_name == "mlp" else args.cnn_width
            for rho in args.rhos:
                t0 = time.perf_counter()
                runs = [one_pair(ds, model_name, width, rho, s, args) for s in range(args.barrier_seeds)]
                row = {
                    "dataset": ds_name,
                    "model": model_name,
                    "width": width,
                    "rho": rho,
                    "runs": runs,
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                r0 = runs[0]
                print(
                    f"[barrier] {ds_name:8s} {model_name} rho={rho:.1f} acc={r0['acc_a']:.3f}/{r0['acc_b']:.3f} "
                    f"midAccB={r0['before']['mid_acc_barrier']:+.3f}->{r0['after']['mid_acc_barrier']:+.3f} "
                    f"midLossB={r0['before']['mid_loss_barrier']:+.3f}->{r0['after']['mid_loss_barrier']:+.3f} "
                    f"sweeps={r0['wm_sweeps']} moved={r0['wm_moved_fraction']:.2f} ({row['seconds']:.0f}s)",
                    flush=True,
                )
    return {"rows": rows}


def barrier_md(res: dict[str, Any], args: argparse.Namespace, cmd: str, elapsed: float) -> str:
    lines = [
        "# Subspace (TNA-PFN) benchmark — barrier against ρ",
        "",
        f"Command: `{cmd}`  ",
        f"{res.get('load') or 'Machine: ' + machine()}  ",
        f"Wall time: {elapsed / 60:.1f} min",
        "",
        "## Setup",
        "",
        f"- Pairing `{args.pairing}`: "
        + {
            "halves": "A and B train on disjoint random IID halves of the training set, each with its own "
            "shuffling order.",
            "order": "A and B train on the full training set with different shuffling orders.",
            "skew": "A and B train on disjoint label-skewed halves (A gets 90% of the examples of classes 0–4 "
            "and 10% of classes 5–9, B the rest), each with its own shuffling order; accuracy on the full "
            "(balanced) test set.",
        }[args.pairing],
        "- Same init (`build_model(..., seed=s)`) and the same PFN mask (`pfn_mask(model, ρ, seed=s)`, weight "
        "granularity, every tensor incl. biases) for A and B; ρ = 0 is vanilla training.",
        f"- SGD lr {args.lr}, momentum 0.9, batch 32, {args.epochs} epochs; MLP width {args.mlp_width} × 2 hidden "
        f"layers, CNN = `build_model('cnn', width={args.cnn_width})` (VGG-style, 3 conv blocks + hidden FC "
        f"{args.cnn_width}), no BatchNorm.",
        f"- {args.barrier_seeds} seed(s) per cell (each seed = new init, new mask, new halves); mean ± std over seeds"
        + (f"; training set truncated to {args.train_limit} examples" if args.train_limit else "")
        + ".",
        f"- Barriers on the test set, {args.points} interpolation points. *Acc barrier* = midpoint error barrier "
        "= ½(acc A + acc B) − acc(θ(½)) (accuracy lost by averaging); *loss barrier* = L(θ(½)) − ½(L_A + L_B). "
        "*WM* = B weight-matched onto A (`weight_matching`, max_iter 100) before interpolating. *Sweeps* = "
        "coordinate-descent sweeps weight matching ran, the final non-improving one included (1 = identity "
        "already a fixed point). *Moved* = fraction of hidden units the matching permuted.",
        "",
    ]
    for ds_name in args.datasets:
        for model_name in args.models:
            rows = [r for r in res["rows"] if r["dataset"] == ds_name and r["model"] == model_name]
            if not rows:
                continue
            lines += [
                f"## {ds_name} / {model_name}",
                "",
                "| ρ | free params | acc A | acc B | mid acc | acc barrier | loss barrier | mid acc (WM) | "
                "acc barrier (WM) | loss barrier (WM) | WM sweeps | moved |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                runs = r["runs"]

                def g(f: Any, runs: list[dict[str, Any]] = runs) -> list[Any]:
                    return [f(x) for x in runs]

                lines.append(
                    f"| {r['rho']:.1f} | {statistics.fmean(g(lambda x: x['free_fraction'])):.2f} "
                    f"| {ms(g(lambda x: x['acc_a']))} | {ms(g(lambda x: x['acc_b']))} "
                    f"| {ms(g(lambda x: x['before']['mid_accuracy']))} "
                    f"| {ms(g(lambda x: x['before']['mid_acc_barrier']))} "
                    f"| {ms(g(lambda x: x['before']['mid_loss_barrier']))} "
                    f"| {ms(g(lambda x: x['after']['mid_accuracy']))} "
                    f"| {ms(g(lambda x: x['after']['mid_acc_barrier']))} "
                    f"| {ms(g(lambda x: x['after']['mid_loss_barrier']))} "
                    f"| {ms([float(v) for v in g(lambda x: x['wm_sweeps'])], 1)} "
                    f"| {ms(g(lambda x: x['wm_moved_fraction']), 2)} |"
                )
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- part 2: FL


def run_fl(args: argparse.Namespace) -> dict[str, Any]:
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="subspace-fl-"))
    for clients in args.clients:
        for alpha in args.alphas:
            for label, extra in STRATEGIES.items():
                if label not in args.strategies:
                    continue
                accs, secs = [], []
                for seed in range(args.fl_seeds):
                    cfg = {
                        "dataset": args.fl_dataset,
                        "model": args.fl_model,
                        "num-clients": clients,
                        "num-rounds": args.rounds,
                        "partition": "dirichlet",
                        "alpha": alpha,
                        "local-epochs": args.local_epochs,
                        "seed": seed,
                        "pfn-ratio": args.pfn_ratio,
                        "out": str(tmp / f"{label}-{clients}-{alpha}-{seed}"),
                        **extra,
                    }
                    if args.fl_dataset == "mnist10k":
                        cfg["data-root"] = args.data_root
                    if args.fl_width:
                        cfg["width"] = args.fl_width
                    t0 = time.perf_counter()
                    last = run_server(InlineGrid(app, clients), cfg)
                    secs.append(time.perf_counter() - t0)
                    accs.append(float(last["central_accuracy"]))
                rows.append(
                    {
                        "clients": clients,
                        "alpha": alpha,
                        "method": label,
                        "config": extra,
                        "accuracies": accs,
                        "seconds": secs,
                    }
                )
                print(f"[fl] K={clients} alpha={alpha} {label:13s} acc={ms(accs)} ({sum(secs):.0f}s)", flush=True)
    return {"rows": rows}


def fl_md(res: dict[str, Any], args: argparse.Namespace, cmd: str, elapsed: float) -> str:
    methods = [m for m in STRATEGIES if m in args.strategies]
    lines = [
        "# Subspace (TNA-PFN) benchmark — FL accuracy after equal rounds",
        "",
        f"Command: `{cmd}`  ",
        f"{res.get('load') or 'Machine: ' + machine()}  ",
        f"Wall time: {elapsed / 60:.1f} min",
        "",
        "## Setup",
        "",
        f"- {args.fl_dataset}, model `{args.fl_model}`"
        + (f" width {args.fl_width}" if args.fl_width else " (default width)")
        + f", Dirichlet label skew, {args.rounds} rounds, {args.local_epochs} local epochs, all clients every round, "
        f"SGD lr 0.05 momentum 0.9 batch 32 (config defaults), in-process `InlineGrid` (same ServerApp/ClientApp "
        "as the Ray backend).",
        f"- FedPFN / FedPNU / FedPFN+FedWB: ρ = {args.pfn_ratio}, weight granularity; FedPFN+FedWB = `fedpfn` with "
        "`pfn-fusion=wb`; FedWB = `wb` (exact OT, default barycenter iterations).",
        f"- Final-round central test accuracy, mean ± std over seeds {list(range(args.fl_seeds))} (a seed fixes "
        "partition, init, mask and shuffling).",
        "",
        "| clients | α | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for clients in args.clients:
        for alpha in args.alphas:
            cells = []
            for m in methods:
                row = next(
                    (r for r in res["rows"] if r["clients"] == clients and r["alpha"] == alpha and r["method"] == m),
                    None,
                )
                cells.append(ms(row["accuracies"]) if row else "–")
            lines.append(f"| {clients} | {alpha} | " + " | ".join(cells) + " |")
    lines += ["", "Per-seed accuracies are in the JSON next to this file.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("barrier", "fl", "both"), default="both")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (writes subspace-*-smoke.*)")
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--suffix", default="", help="appended to the result file names")
    # barrier
    p.add_argument("--datasets", nargs="+", default=["mnist10k", "mnist1d"])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--rhos", nargs="+", type=float, default=[0.0, 0.2, 0.4, 0.6, 0.8])
    p.add_argument("--pairing", choices=("halves", "order", "skew"), default="halves")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--mlp-width", type=int, default=128)
    p.add_argument("--cnn-width", type=int, default=64)
    p.add_argument("--barrier-seeds", type=int, default=2)
    p.add_argument("--points", type=int, default=5, help="interpolation points (odd, so α = ½ is on the grid)")
    p.add_argument("--train-limit", type=int, default=0, help="truncate the training set (0 = all)")
    # fl
    p.add_argument("--fl-dataset", default="mnist1d")
    p.add_argument("--fl-model", default="mlp")
    p.add_argument("--fl-width", type=int, default=0)
    p.add_argument("--clients", nargs="+", type=int, default=[10, 20])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--fl-seeds", type=int, default=3)
    p.add_argument("--pfn-ratio", type=float, default=0.4)
    add_out(p, RESULTS)
    args = p.parse_args(argv)
    if args.points % 2 == 0:
        p.error("--points must be odd so that α = ½ is on the grid")
    if args.quick:
        args.datasets, args.models, args.rhos = ["mnist1d"], ["mlp"], [0.0, 0.4]
        args.epochs, args.barrier_seeds, args.points, args.mlp_width = 1, 1, 3, 32
        args.clients, args.alphas, args.rounds, args.local_epochs, args.fl_seeds = [4], [0.5], 2, 1, 1
        args.strategies = ["FedAvg", "FedPFN"]
        args.suffix = args.suffix or "-smoke"
    torch.set_num_threads(1)
    cmd = " ".join(
        shlex.quote(a)
        for a in [
            sys.executable.replace(str(ROOT) + "/", ""),
            "benchmarks/subspace.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    parts = ["barrier", "fl"] if args.part == "both" else [args.part]
    for part in parts:
        t0, start = time.perf_counter(), load_line()
        print(start, flush=True)
        res = run_barrier(args) if part == "barrier" else run_fl(args)
        elapsed = time.perf_counter() - t0
        end = load_line()
        print(end, flush=True)
        res.update({"command": cmd, "machine": machine(), "load": load_header(start, end), "seconds": elapsed})
        res["args"] = {**vars(args), "out": str(args.out)}
        stem = args.out / f"subspace-{part}{args.suffix}"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
        md = barrier_md(res, args, cmd, elapsed) if part == "barrier" else fl_md(res, args, cmd, elapsed)
        stem.with_suffix(".md").write_text(md)
        print(f"wrote {stem}.md / .json ({elapsed:.0f}s)")


if __name__ == "__main__":
    main()
