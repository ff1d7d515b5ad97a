"""Multi-round FL where clients start apart: rounds to a target accuracy, and accuracy per round.

Three ways the clients start round 1 (``client-init``), then ordinary FL from the fused model:

* ``shared``: every client from the global model (the usual FL; the reference). With a shared start the
  alignment of FedMatch/FedWB is the identity, so they equal FedAvg (measured here for FedWB).
* ``own``: every client from its own seed-derived init (``--client-init own``).
* ``ckpt``: every client from its own checkpoint, pre-trained alone on its own data for ``--pretrain`` epochs
  from its own init (``--client-init-from DIR``; DIR = ``clients/round1/`` of a 1-round ``--save-client-models 1``
  run with ``--client-init own``, i.e. the files a site would bring).

Methods: FedAvg, FedMatch (``match``), FedWB (``wb``), FedWB + federated REPAIR (``wb``, ``bn-repair=repair``);
with ``--methods`` also those that need the server's unlabeled batch (``server-data`` = 500 training inputs drawn
with the run seed, i.e. the clients' own distribution — an optimistic stand-in for a server's public data):
FedZip / FedCCA (``zip``/``cca``: activation-based fusion on that batch) and ``+distill`` (FedDF after the
fusion: ``distill-epochs`` = 5 on that batch).
mnist10k MLP, 10 clients, all clients every round, Dirichlet(α) label skew, local SGD (lr 0.05, momentum 0.9,
batch 32), E local epochs per round. Each run is the real ServerApp/ClientApp in process (``InlineGrid`` +
``run_server``: what ``fedfuse simulate --backend inline`` runs). Resumable: each finished run is written at once
to ``apart-<tag>.json`` (file lock: ``--shard i/n`` processes can share it); ``--report`` rewrites the table.

    python benchmarks/apart.py --data-root /work/shared/data --shard 0/2 &
    python benchmarks/apart.py --data-root /work/shared/data --shard 1/2 &
    python benchmarks/apart.py --data-root /work/shared/data --report
    python benchmarks/apart.py --quick            # digits smoke -> apart-smoke.{md,json}
"""

from __future__ import annotations

import argparse
import atexit
import logging
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_out, load_line, note_load, parse_shard, recorded_loads  # noqa: E402
from benchmarks.regimes import METHODS as REGIME_METHODS  # noqa: E402
from benchmarks.regimes import RESULTS, locked  # noqa: E402

SERVER_DATA, DISTILL_EPOCHS = 500, 5  # the server's unlabeled batch (server-data) and FedDF epochs of the new methods
METHODS: dict[str, dict[str, Any]] = {m: REGIME_METHODS[m] for m in ("FedAvg", "FedMatch", "FedWB", "FedWB+REPAIR")}
NEW_METHODS: dict[str, dict[str, Any]] = {  # need the server's unlabeled batch; not in the default --methods
    "FedZip": {"strategy": "zip", "server-data": SERVER_DATA},
    "FedCCA": {"strategy": "cca", "server-data": SERVER_DATA},
    "FedZip+distill": {"strategy": "zip", "server-data": SERVER_DATA, "distill-epochs": DISTILL_EPOCHS},
    "FedWB+distill": {"strategy": "wb", "server-data": SERVER_DATA, "distill-epochs": DISTILL_EPOCHS},
    "FedAvg+distill": {"strategy": "fedavg", "server-data": SERVER_DATA, "distill-epochs": DISTILL_EPOCHS},
}
ALL_METHODS = {**METHODS, **NEW_METHODS}
INITS = ("shared", "own", "ckpt")
SHARED_METHODS = ("FedAvg", "FedWB")  # the reference, and the identity check


def run_key(init: str, alpha: float, method: str, seed: int) -> str:
    return f"{init}|a={alpha:g}|{method}|s={seed}"


def plan(args: argparse.Namespace) -> list[tuple[str, float, str, int]]:
    """Seeds outermost (a cut-off run still covers every cell with fewer seeds)."""
    todo = []
    for seed in range(args.seeds):
        for alpha in args.alphas:
            for init in args.inits:
                for method in args.methods:
                    if init == "shared" and method not in SHARED_METHODS:
                        continue
                    todo.append((init, alpha, method, seed))
    return todo


def base_config(args: argparse.Namespace, alpha: float, seed: int) -> dict[str, Any]:
    cfg = {
        "dataset": args.dataset,
        "model": "mlp",
        "num-clients": args.clients,
        "partition": "dirichlet",
        "alpha": alpha,
        "local-epochs": args.epochs,
        "seed": seed,
    }
    if args.dataset == "mnist10k":
        cfg["data-root"] = args.data_root
    if args.width:
        cfg["width"] = args.width
    return cfg


_PRETRAINED: dict[tuple[float, int], Path] = {}


def pretrain(args: argparse.Namespace, alpha: float, seed: int) -> Path:
    """Each client trains ``--pretrain`` epochs alone from its own init; its model is saved as
    ``clients/round1/partition<P>.pt`` of a 1-round run (whose fused model is not used). Once per (α, seed) and
    process (deterministic: every method of a seed starts from the same files)."""
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    if (alpha, seed) not in _PRETRAINED:
        where = Path(tempfile.mkdtemp(prefix="apart-pre-"))
        atexit.register(shutil.rmtree, where, ignore_errors=True)
        cfg = {**base_config(args, alpha, seed), "client-init": "own", "num-rounds": 1, "local-epochs": args.pretrain}
        run_server(InlineGrid(app, args.clients), {**cfg, "save-client-models": 1, "out": str(where)})
        _PRETRAINED[(alpha, seed)] = where / "clients" / "round1"
    return _PRETRAINED[(alpha, seed)]


def one_run(args: argparse.Namespace, init: str, alpha: float, method: str, seed: int) -> dict[str, Any]:
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    cfg = {**base_config(args, alpha, seed), "num-rounds": args.rounds, **ALL_METHODS[method]}
    with tempfile.TemporaryDirectory(prefix="apart-") as tmp:
        pre_s = 0.0
        if init == "own":
            cfg["client-init"] = "own"
        elif init == "ckpt":
            t0 = time.perf_counter()
            cfg["client-init-from"] = str(pretrain(args, alpha, seed))
            pre_s = time.perf_counter() - t0
        rows: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        run_server(InlineGrid(app, args.clients), {**cfg, "out": str(Path(tmp) / "run")}, rows.append)
        seconds = time.perf_counter() - t0
    return {
        "accuracy": [float(r["central_accuracy"]) for r in rows],  # index = round (0 = the global init)
        "seconds": seconds,
        "pretrain_seconds": pre_s,
        "config": {k: v for k, v in cfg.items() if k not in ("client-init-from", "data-root")},
    }


# ----------------------------------------------------------------------------- report


def rounds_to(acc: list[float], target: float) -> int | None:
    """The first round whose central accuracy reaches ``target`` (None: never within the run)."""
    return next((r for r, a in enumerate(acc) if r >= 1 and a >= target), None)


def _cell_rounds(runs: list[dict[str, Any]], target: float) -> str:
    got = [rounds_to(r["accuracy"], target) for r in runs]
    reached = [g for g in got if g is not None]
    if not reached:
        return f"never ({len(got)}/{len(got)})"
    text = f"{statistics.mean(reached):.1f}"
    if len(reached) > 1:
        text += f" ± {statistics.stdev(reached):.1f}"
    return text + (f" ({len(got) - len(reached)} of {len(got)} never)" if len(reached) < len(got) else "")


def _acc(runs: list[dict[str, Any]], r: int) -> str:
    vals = [100 * x["accuracy"][r] for x in runs if len(x["accuracy"]) > r]
    if not vals:
        return "–"
    return f"{statistics.mean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")


def report(args: argparse.Namespace, data: dict[str, Any], path: Path) -> None:
    runs = data["runs"]
    shown = sorted({r for r in (1, 2, 3, 5, 10, args.rounds) if r <= args.rounds})
    done = sum(1 for k in plan(args) if run_key(*k) in runs)
    total_s = sum(r["seconds"] + r["pretrain_seconds"] for r in runs.values())
    lines = [
        "# Multi-round FL where clients start apart (rounds to target, accuracy per round)",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in data.get("commands", [])) + "  ",
        f"Runs: {done} of {len(plan(args))} planned finished; summed run time {total_s / 60:.1f} min.",
        "",
        *recorded_loads(data),
        "",
        f"- {args.dataset}, MLP{f' width {args.width}' if args.width else ''}, {args.clients} clients, all every "
        f"round, Dirichlet(α) label skew, local SGD lr 0.05, momentum 0.9, batch 32, E = {args.epochs} local "
        f"epoch(s) per round, {args.rounds} rounds; central test accuracy of the global model after each round.",
        "- Start of round 1: **shared** = every client from the global model (the usual FL); **own** = every "
        "client from its own seed (`--client-init own`); **ckpt** = every client from its own checkpoint, "
        f"pre-trained alone on its own data for {args.pretrain} epochs from its own init (`--client-init-from`). "
        "Later rounds: ordinary FL from the fused model.",
        "- Cells: mean ± std over seeds (a seed fixes partition, inits and shuffling). Rounds to target: "
        "mean ± std over the seeds that reached it, and how many never did within the run.",
        "",
    ]
    copied = sorted(
        {(k.split("|")[2], r["source"]) for k, r in runs.items() if "source" in r and k.split("|")[2] in args.methods}
    )
    for method, source in copied:  # runs not run by these commands: say where they come from
        lines.insert(-1, f"- {method}: not re-run here; copied from {source} (same code path and seeds).")
    for alpha in args.alphas:
        lines += [f"## Dirichlet α = {alpha:g}", ""]
        head = "| start | method | " + " | ".join(f"rounds to {100 * t:g} %" for t in args.targets)
        head += " | " + " | ".join(f"round {r}" for r in shown) + " | seeds |"
        lines += [head, "|" + "---|" * (3 + len(args.targets) + len(shown))]
        for init in args.inits:
            for method in args.methods:
                if init == "shared" and method not in SHARED_METHODS:
                    continue
                cell = [runs[k] for s in range(args.seeds) if (k := run_key(init, alpha, method, s)) in runs]
                if not cell:
                    continue
                row = [init, method, *(_cell_rounds(cell, t) for t in args.targets)]
                row += [_acc(cell, r) for r in shown] + [str(len(cell))]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += summary_lines(args, runs) + identity_lines(args, runs)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def summary_lines(args: argparse.Namespace, runs: dict[str, Any]) -> list[str]:
    """Seed-paired differences to FedAvg with the same start: round-1 accuracy, and rounds to the first target."""
    target = args.targets[0]
    out = [f"Paired with FedAvg of the same start and seed (mean over seeds; rounds to {100 * target:g} % where both "
           "reached it; negative = fewer rounds):", ""]  # fmt: skip
    for alpha in args.alphas:
        for init in [i for i in args.inits if i != "shared"]:
            parts = []
            for method in [m for m in args.methods if m != "FedAvg"]:
                pairs = [
                    (runs[a]["accuracy"], runs[b]["accuracy"])
                    for s in range(args.seeds)
                    if (a := run_key(init, alpha, method, s)) in runs
                    and (b := run_key(init, alpha, "FedAvg", s)) in runs
                ]
                if not pairs:
                    continue
                d1 = statistics.mean(100 * (m[1] - f[1]) for m, f in pairs)
                rr = [(rounds_to(m, target), rounds_to(f, target)) for m, f in pairs]
                dr = [x - y for x, y in rr if x is not None and y is not None]
                dr_text = f"{statistics.mean(dr):+.1f}" if dr else "–"
                parts.append(f"{method} round 1 {d1:+.1f} pts, rounds {dr_text} [n={len(pairs)}]")
            if parts:
                out.append(f"- α = {alpha:g}, {init}: " + "; ".join(parts) + ".")
    return out + [""]


def identity_lines(args: argparse.Namespace, runs: dict[str, Any]) -> list[str]:
    """Shared init: is FedWB's accuracy curve FedAvg's, run for run? (Where it is not, the alignment was not the
    identity in some round: with the identity transport the barycenter is exactly the average.)"""
    pairs = [
        (alpha, s, runs[a], runs[b])
        for alpha in args.alphas
        for s in range(args.seeds)
        if (a := run_key("shared", alpha, "FedAvg", s)) in runs and (b := run_key("shared", alpha, "FedWB", s)) in runs
    ]
    if not pairs:
        return []
    same = sum(1 for _, _, a, b in pairs if a["accuracy"] == b["accuracy"])
    gap = max(max(abs(x - y) for x, y in zip(a["accuracy"], b["accuracy"], strict=True)) for _, _, a, b in pairs)
    differ = [f"α = {al:g} seed {s}" for al, s, a, b in pairs if a["accuracy"] != b["accuracy"]]
    text = (
        f"Shared init: FedWB's per-round accuracy equals FedAvg's exactly in {same} of {len(pairs)} paired runs "
        f"(largest per-round gap {100 * gap:.2f} pts): from a shared start the clients' units stay in the same "
        "order, so the alignment is the identity and the barycenter is the average."
    )
    if differ:
        text += (
            f" Not in {', '.join(differ)}: there the matching left the identity in some round (units that drifted "
            "under label skew), and the runs part by at most the gap above."
        )
    return [text, ""]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--dataset", default="mnist10k")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5])
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--pretrain", type=int, default=5, help="ckpt: local epochs each client trains alone first")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--targets", nargs="+", type=float, default=[0.85, 0.9])
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th planned run starting at i")
    p.add_argument("--report", action="store_true", help="only rewrite the table from the results file")
    p.add_argument("--quick", action="store_true", help="digits smoke: 3 clients, 3 rounds, 1 seed, α 0.5")
    p.add_argument("--tag", default="")
    add_out(p, RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.alphas, args.seeds, args.clients, args.rounds = "digits", [0.5], 1, 3, 3
        args.pretrain, args.width, args.targets, args.tag = 2, args.width or 16, [0.5, 0.7], args.tag or "smoke"
    args.tag = args.tag or f"{args.dataset}-mlp"
    args.shard_i, args.shard_n = parse_shard(p, args.shard)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"apart-{args.tag}.json"
    cmd = "python benchmarks/apart.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    start = load_line()
    print(start, flush=True)
    if not args.report:
        mine = plan(args)[args.shard_i :: args.shard_n]
        for k, item in enumerate(mine):
            key = run_key(*item)
            with locked(path) as data:
                if key in data["runs"]:
                    continue
            res = one_run(args, *item)
            with locked(path) as data:
                data["runs"][key] = res
                data.setdefault("commands", [])
                if cmd not in data["commands"]:
                    data["commands"].append(cmd)
            acc = res["accuracy"]
            print(
                f"[{k + 1}/{len(mine)}] {key}: r1 {acc[1]:.3f} last {acc[-1]:.3f} ({res['seconds']:.0f}s)", flush=True
            )
        with locked(path) as data:
            note_load(data, start, load_line())
    with locked(path) as data:
        report(args, data, path.with_suffix(".md"))
    print(load_line(), flush=True)


if __name__ == "__main__":
    main()
