"""Where alignment pays in multi-round FL: local epochs E × Dirichlet α, at the same total training budget.

Every row (model, α, E) spends the same local training: each client trains ``budget`` epochs in all, so
``rounds = budget / E`` (E = 1 → budget rounds of 1 epoch; E = budget → one round). All clients every round
(10 by default), mnist10k (real MNIST images, 8 000 train / 2 000 test), real ServerApp/ClientApp in process
(``InlineGrid`` + ``run_server``, the same path as the Ray backend), local SGD (lr 0.05, momentum 0.9,
batch 32). Methods (``METHODS``):

* FedAvg, FedProx (``proximal-mu``), FedMatch (``match``), FedWB (``wb``), FedWB + federated REPAIR
  (``wb`` with ``bn-repair=repair``), FedPFN (``fedpfn``): final central test accuracy of the global model.
* LayerwiseAvg(body) (FedPer: body averaged, head personal): its global model has an untrained head, so it
  is scored by the clients' *personal* accuracy (``personal_accuracy``: each client's body + own head on a
  seeded 20 % holdout of its partition; it trains on the other 80 %). To compare fairly it is paired with
  ``FedAvg(holdout)`` = ``layerwise`` with every layer shared (= FedAvg on the same 80 % splits, scored on the
  same holdouts); its Δ is against that baseline, not against the central FedAvg.
* One-shot: every client trains the whole budget locally from its own init, the server fuses once (``wb`` +
  federated REPAIR and plain ``wb``); it does not depend on E (one value per model × α).

Mean ± std over seeds (a seed fixes partition, init and shuffling); Δ = accuracy − FedAvg of the same seed
(paired), mean ± std of the paired differences. Resumable: each finished run is written at once to
``regimes-<tag>.json`` (under a file lock, so two processes — ``--shard i/2`` — can share it) and skipped on
restart; ``--report`` only rewrites the table and plot from that file.

    python benchmarks/regimes.py --data-root /work/shared/data --budget 20 --shard 0/2 &
    python benchmarks/regimes.py --data-root /work/shared/data --budget 20 --shard 1/2 &
    python benchmarks/regimes.py --data-root /work/shared/data --budget 20 --report
    python benchmarks/regimes.py --quick          # digits smoke -> regimes-smoke.{md,json,png}
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_out, load_line, note_load, parse_shard, recorded_loads  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS: dict[str, dict[str, Any]] = {
    "FedAvg": {"strategy": "fedavg"},
    "FedProx": {"strategy": "fedprox"},
    "FedMatch": {"strategy": "match"},
    "FedWB": {"strategy": "wb"},
    "FedWB+REPAIR": {"strategy": "wb", "bn-repair": "repair"},
    "FedPFN": {"strategy": "fedpfn"},
    "LayerwiseAvg(body)": {"strategy": "layerwise", "layerwise-preset": "body"},
    "FedAvg(holdout)": {"strategy": "layerwise", "layerwise-preset": "layers=*"},
    "OneShot-WB+REPAIR": {"strategy": "wb", "bn-repair": "repair", "one-shot": True},
    "OneShot-WB": {"strategy": "wb", "one-shot": True},
}
PERSONAL = {"LayerwiseAvg(body)", "FedAvg(holdout)"}  # scored by personal_accuracy on the clients' holdouts
ONE_SHOT = {m for m, c in METHODS.items() if c.get("one-shot")}
BASELINE = {m: ("FedAvg(holdout)" if m in PERSONAL else "FedAvg") for m in METHODS}


def run_key(model: str, alpha: float, epochs: int, method: str, seed: int) -> str:
    """One run's id in the results file (one-shot runs do not depend on E: stored with E = budget)."""
    return f"{model}|a={alpha:g}|E={epochs}|{method}|s={seed}"


def rounds_for(budget: int, epochs: int) -> int:
    """Rounds at local epochs E for a total of ``budget`` local epochs per client (E must divide it)."""
    if epochs < 1 or budget % epochs:
        raise ValueError(f"local epochs E={epochs} must divide the budget {budget} (same epochs per row)")
    return budget // epochs


def plan(args: argparse.Namespace) -> list[tuple[str, float, int, str, int]]:
    """Every (model, α, E, method, seed) to run: models in the given order (the first model's grid finishes
    first), then seeds (a cut-off model still covers its grid with fewer seeds); one-shot once per
    (model, α, seed), stored at E = budget. ``--cut`` narrows seeds / methods / epochs / alphas per model."""
    todo = []
    for model in args.models:
        cut = args.cuts.get(model, {})
        methods = [m for m in args.methods if m in cut.get("methods", args.methods)]
        for seed in range(cut.get("seeds", args.seeds)):
            for alpha in [a for a in args.alphas if a in cut.get("alphas", args.alphas)]:
                for epochs in [e for e in args.epochs if e in cut.get("epochs", args.epochs)]:
                    todo += [(model, alpha, epochs, m, seed) for m in methods if m not in ONE_SHOT]
                todo += [(model, alpha, args.budget, m, seed) for m in methods if m in ONE_SHOT]
    return todo


@contextlib.contextmanager
def locked(path: Path) -> Iterator[dict[str, Any]]:
    """The results file's content under an exclusive lock; written back atomically on exit."""
    lock = path.with_suffix(".lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
            yield data
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def one_run(args: argparse.Namespace, model: str, alpha: float, epochs: int, method: str, seed: int) -> dict:
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    rounds = rounds_for(args.budget, epochs)
    extra = dict(METHODS[method])
    if method in ONE_SHOT:
        rounds, epochs = 1, args.budget
    cfg = {
        "dataset": args.dataset,
        "model": model,
        "num-clients": args.clients,
        "num-rounds": rounds,
        "partition": "dirichlet",
        "alpha": alpha,
        "local-epochs": epochs,
        "seed": seed,
        "batch-size": args.batch_size,
        **extra,
    }
    if extra["strategy"] == "fedprox":
        cfg["proximal-mu"] = args.proximal_mu
    if args.dataset == "mnist10k":
        cfg["data-root"] = args.data_root
    if args.width.get(model):
        cfg["width"] = args.width[model]
    with tempfile.TemporaryDirectory(prefix="regimes-") as tmp:
        cfg["out"] = tmp
        t0 = time.perf_counter()
        last = run_server(InlineGrid(app, args.clients), cfg)
        seconds = time.perf_counter() - t0
    score = "personal_accuracy" if method in PERSONAL else "central_accuracy"
    return {
        "accuracy": float(last[score]),
        "metric": score,
        "central_accuracy": float(last["central_accuracy"]),
        "rounds": rounds,
        "local_epochs": epochs,
        "seconds": seconds,
        "config": {k: v for k, v in cfg.items() if k != "out"},
    }


# ----------------------------------------------------------------------------- report


def _ms(values: list[float], scale: float = 100.0, signed: bool = False) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    sign = "+" if signed else ""
    if len(values) < 2:
        return f"{mean:{sign}.1f}"
    return f"{mean:{sign}.1f} ± {statistics.stdev(values) * scale:.1f}"


def in_grid(args: argparse.Namespace, model: str, alpha: float, epochs: int | None = None) -> bool:
    """Whether (model, α, E) is in the planned grid after ``--cut`` (rows and panels outside it are left out)."""
    cut = args.cuts.get(model, {})
    return alpha in cut.get("alphas", [alpha]) and (epochs is None or epochs in cut.get("epochs", [epochs]))


def cell(runs: dict[str, Any], model: str, alpha: float, epochs: int, method: str, seeds: int, budget: int):
    """(accuracies, paired differences to the method's baseline) over the seeds that finished."""
    e = budget if method in ONE_SHOT else epochs
    accs, diffs = [], []
    for s in range(seeds):
        run = runs.get(run_key(model, alpha, e, method, s))
        if run is None:
            continue
        accs.append(run["accuracy"])
        base = runs.get(run_key(model, alpha, epochs, BASELINE[method], s))
        if base is not None:
            diffs.append(run["accuracy"] - base["accuracy"])
    return accs, diffs


def verdict(runs: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Does some alignment-aware method beat FedAvg by ≥ 2 pts beyond the seed spread somewhere, and what
    does it cost at E = 1?  'Beyond the spread' = mean paired Δ − std of the paired Δ ≥ 2 pts."""
    aware = [m for m in ("FedMatch", "FedWB", "FedWB+REPAIR", "FedPFN") if m in args.methods]
    lines, wins = [], []
    best: tuple[float, str] | None = None
    for model in args.models:
        for alpha in args.alphas:
            for epochs in args.epochs:
                for m in aware:
                    _, d = cell(runs, model, alpha, epochs, m, args.seeds, args.budget)
                    if len(d) < 2:
                        continue
                    mean, sd = statistics.fmean(d), statistics.stdev(d)
                    where = f"{m} on {model}, α={alpha:g}, E={epochs}: Δ = {100 * mean:+.1f} ± {100 * sd:.1f} pts"
                    if best is None or mean - sd > best[0]:
                        best = (mean - sd, where)
                    if mean - sd >= 0.02:
                        wins.append(where)
    if wins:
        lines.append("Regimes where an alignment-aware method beats FedAvg by ≥ 2 pts beyond the seed spread "
                     "(mean paired Δ − its std ≥ 2 pts): " + "; ".join(wins) + ".")  # fmt: skip
    else:
        lines.append("**No regime in this grid** where an alignment-aware method (FedMatch, FedWB, FedWB+REPAIR, "
                     "FedPFN) beats FedAvg by ≥ 2 pts beyond the seed spread (mean paired Δ − its std ≥ 2 pts)."
                     + (f" Closest: {best[1]}." if best else ""))  # fmt: skip
    if 1 in args.epochs:
        costs = []
        for model in args.models:
            for alpha in args.alphas:
                for m in aware:
                    _, d = cell(runs, model, alpha, 1, m, args.seeds, args.budget)
                    if d:
                        costs.append(f"{m} {model} α={alpha:g}: {100 * statistics.fmean(d):+.1f}")
        lines.append("Cost at E = 1 (mean paired Δ, pts; goal ≥ −0.5): " + "; ".join(costs) + ".")
    return lines


def table(runs: dict[str, Any], args: argparse.Namespace, compact: bool = False) -> list[str]:
    """Accuracy % (mean ± std) and paired Δ per method; ``compact``: FedAvg's accuracy, then Δ only."""
    methods = [m for m in args.methods if m in METHODS]
    head = [m if (not compact or m == BASELINE[m]) else f"{m} Δ" for m in methods]
    lines = [
        "| model | α | E | rounds | " + " | ".join(head) + " |",
        "|---|---|---|---|" + "---|" * len(methods),
    ]
    for model in args.models:
        for alpha in args.alphas:
            for epochs in args.epochs:
                if not in_grid(args, model, alpha, epochs):
                    continue
                cells = []
                for m in methods:
                    accs, diffs = cell(runs, model, alpha, epochs, m, args.seeds, args.budget)
                    if not accs:
                        cells.append("–")
                    else:
                        n = f" [n={len(accs)}]" if len(accs) < args.seeds else ""  # fewer seeds than asked
                        delta = "" if m == BASELINE[m] else f" ({_ms(diffs, signed=True)})"
                        if compact and m != BASELINE[m]:
                            cells.append((_ms(diffs, signed=True) if diffs else "–") + n)
                        else:
                            cells.append(f"{_ms(accs)}{delta}{n}")
                lines.append(f"| {model} | {alpha:g} | {epochs} | {rounds_for(args.budget, epochs)} | "
                             + " | ".join(cells) + " |")  # fmt: skip
    return lines


def plot(runs: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, a) for m in args.models for a in args.alphas if in_grid(args, m, a)]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.2 * len(panels), 8), 4.4), squeeze=False, sharey=False)
    methods = [m for m in args.methods if m != BASELINE[m]]
    for ax, (model, alpha) in zip(axes[0], panels, strict=True):
        for k, m in enumerate(methods):
            xs, ys, es = [], [], []
            for epochs in args.epochs:
                _, d = cell(runs, model, alpha, epochs, m, args.seeds, args.budget)
                if d:
                    xs.append(epochs * (1 + 0.03 * (k - len(methods) / 2)))  # small offsets: bars stay readable
                    ys.append(100 * statistics.fmean(d))
                    es.append(100 * statistics.stdev(d) if len(d) > 1 else 0.0)
            if xs:
                style = "--" if m in PERSONAL or m in ONE_SHOT else "-"
                label = m + (" (vs FedAvg(holdout))" if m in PERSONAL else "")
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, ls=style, label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(args.epochs, [str(e) for e in args.epochs])
        ax.set_xlabel(f"local epochs E (rounds = {args.budget}/E)")
        ax.set_title(f"{model}, Dirichlet α={alpha:g}")
    axes[0][0].set_ylabel("accuracy − FedAvg (pts, paired by seed)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.1 + 0.03 * (len(labels) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, path: Path, cmd: str) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    runs = data["runs"]
    total = sum(r["seconds"] for r in runs.values())
    done = len([1 for t in plan(args) if run_key(*t) in runs])
    lines = [
        "# Where alignment pays in multi-round FL (E × α at equal training budget)",
        "",
        f"Command: `{cmd}`  ",
        f"Runs: {done} of {len(plan(args))} planned finished; summed run time {total / 60:.1f} min "
        f"(torch threads per process: 1).",
        "",
        *recorded_loads(data),
        "",
        f"- {args.dataset}, {args.clients} clients, Dirichlet(α) label skew, all clients every round, "
        f"local SGD lr 0.05, momentum 0.9, batch {args.batch_size}; **same budget per row: E × rounds = {args.budget} local epochs per client**. Models: "
        + ", ".join(f"`{m}`" + (f" width {args.width[m]}" if args.width.get(m) else "") for m in args.models)
        + ".",
        f"- FedProx μ = {args.proximal_mu}; FedPFN ρ = 0.4 (default); FedWB exact OT; REPAIR = federated REPAIR "
        "(`bn-repair=repair`, one statistics round per repaired layer).",
        "- Cell: accuracy % mean ± std over seeds (Δ vs FedAvg of the same seed, pts, mean ± std of the paired "
        "differences). LayerwiseAvg(body) and FedAvg(holdout) are *personal* accuracies on the clients' 20 % "
        "holdouts (train on 80 %); LayerwiseAvg's Δ is vs FedAvg(holdout). One-shot columns: every client "
        f"trains {args.budget} epochs from its own init, fused once (same value in every E row; Δ vs FedAvg at "
        "that E).",
        f"- Seeds: {args.seeds}. Cut to fit the machine: "
        + ("; ".join(f"{m}: " + ", ".join(f"{k} = {v}" for k, v in c.items()) for m, c in args.cuts.items()) or "none")
        + ".",
        "",
        *table(runs, args),
        "",
        *verdict(runs, args),
        "",
        "Compact (FedAvg accuracy %, then Δ pts vs FedAvg; LayerwiseAvg(body) vs FedAvg(holdout)):",
        "",
        *table(runs, args, compact=True),
        "",
    ]
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines))
    plot(runs, args, path.with_suffix(".png"))
    print(f"wrote {md} and {path.with_suffix('.png')}", flush=True)


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--dataset", default="mnist10k")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--alphas", nargs="+", type=float, default=[0.1, 1.0])
    p.add_argument("--epochs", nargs="+", type=int, default=[1, 5, 20])
    p.add_argument("--budget", type=int, default=20, help="local epochs per client in all (E × rounds)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--cut", action="append", default=[], metavar="MODEL:seeds=N|MODEL:methods=A,B",
                   help="fewer seeds or methods for one model (to fit the machine)")  # fmt: skip
    p.add_argument("--width", action="append", default=[], metavar="MODEL=W")
    p.add_argument("--proximal-mu", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=32, help="local SGD batch size (all methods)")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th planned run starting at i")
    p.add_argument("--report", action="store_true", help="only rewrite the table and plot from the results file")
    p.add_argument("--quick", action="store_true", help="digits smoke: 3 clients, budget 2, E ∈ {1, 2}, 2 seeds")
    p.add_argument("--tag", default="")
    add_out(p, RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.models, args.alphas, args.epochs, args.budget = "digits", ["mlp"], [0.5], [1, 2], 2
        args.seeds, args.clients, args.width = 2, 3, args.width or ["mlp=16"]
        args.tag = args.tag or "smoke"
    args.tag = args.tag or f"{args.dataset}-b{args.budget}"
    for e in args.epochs:
        try:
            rounds_for(args.budget, e)
        except ValueError as exc:
            p.error(str(exc))
    args.cuts = {}
    for c in args.cut:
        model, _, rule = c.partition(":")
        key, _, value = rule.partition("=")
        items = [v for v in value.split(",") if v]
        try:
            if key == "seeds":
                parsed: Any = int(value)
            elif key == "methods" and items and set(items) <= set(METHODS):
                parsed = items
            elif key == "epochs":
                parsed = [int(v) for v in items]
            elif key == "alphas":
                parsed = [float(v) for v in items]
            else:
                raise ValueError
        except ValueError:
            p.error(f"--cut {c!r} is not allowed; allowed: MODEL:seeds=N, MODEL:methods=A,B (names from METHODS), "
                    "MODEL:epochs=1,20 or MODEL:alphas=0.1")  # fmt: skip
        args.cuts.setdefault(model, {})[key] = parsed
    args.width = {m: int(w) for m, _, w in (x.partition("=") for x in args.width)}
    args.shard_i, args.shard_n = parse_shard(p, args.shard)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's per-round summaries: the progress lines suffice
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"regimes-{args.tag}.json"
    cmd = "python benchmarks/regimes.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    start = load_line()
    print(start, flush=True)
    if not args.report:
        todo = plan(args)
        mine = todo[args.shard_i :: args.shard_n]
        for k, (model, alpha, epochs, method, seed) in enumerate(mine):
            key = run_key(model, alpha, epochs, method, seed)
            with locked(path) as data:
                if key in data["runs"]:
                    continue
            res = one_run(args, model, alpha, epochs, method, seed)
            with locked(path) as data:
                data["runs"][key] = res
                data.setdefault("commands", [])
                if cmd not in data["commands"]:
                    data["commands"].append(cmd)
            print(f"[{k + 1}/{len(mine)}] {key}: acc={res['accuracy']:.4f} ({res['seconds']:.0f}s)", flush=True)
        with locked(path) as data:
            note_load(data, start, load_line())
    report(args, path, cmd)
    print(load_line(), flush=True)


if __name__ == "__main__":
    main()
