"""One-shot fusion and fusion speed benchmark.

(1) one-shot: N parents (different inits) trained on Dirichlet(α) splits; test accuracy of each parent, the
logit ensemble, and the fused model by ``average`` / ``match`` / ``wb`` (exact, Sinkhorn) / ``gwb``; the
midpoint barrier between parents 0 and 1 before and after alignment; fusion wall time.
(2) ``--speed``: wall time of fusing random-init ResNet-20 clients (wb exact, match, average) versus the
width multiplier and the number of clients.

    python benchmarks/fusion.py --dataset digits --smoke
    python benchmarks/fusion.py --dataset mnist10k --data-root /work/shared/data --epochs 5
    python benchmarks/fusion.py --speed --profile

Runs on one torch thread (the fusion engine is single-threaded anyway; the machine is shared).

Writes ``fusion-<tag>.md`` and ``.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common when run as a script

from benchmarks.common import add_out, load_header, load_line  # noqa: E402
from fedfuse.align import align, derive_spec, fuse  # noqa: E402
from fedfuse.data import load_dataset  # noqa: E402
from fedfuse.data.partition import partition_indices  # noqa: E402
from fedfuse.models import build_model  # noqa: E402
from fedfuse.train import evaluate, train  # noqa: E402


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    return net


@torch.no_grad()
def _ensemble(models: list[nn.Module], lam: list[float], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) of the λ-weighted average of the parents' logits."""
    logits = sum(w * m.eval()(x) for w, m in zip(lam, models, strict=True))
    loss = float(nn.functional.cross_entropy(logits, y))  # type: ignore[arg-type]
    return loss, float((logits.argmax(1) == y).float().mean())  # type: ignore[union-attr]


def _midpoint_barrier(
    a: nn.Module, b_state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """Loss/accuracy barrier at α = ½: ``L(½θa + ½θb) − ½(L(θa) + L(θb))`` (accuracy: the drop)."""
    b = _load(a, b_state)
    mid = _load(a, fuse([a, b], method="average"))
    la, aa = evaluate(a, x, y)
    lb, ab = evaluate(b, x, y)
    lm, am = evaluate(mid, x, y)
    return {"loss_barrier": lm - (la + lb) / 2, "acc_barrier": (aa + ab) / 2 - am}


def _width(args: argparse.Namespace, model_name: str) -> int:
    return args.cnn_width if model_name == "cnn" else args.width


def one_shot(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = load_dataset(args.dataset, data_root=args.data_root or None, seed=args.seed)
    x_test, y_test = data.x_test, data.y_test
    rows = []
    for model_name in args.models:
        for n in args.parents:
            parts = partition_indices(data.y_train.numpy(), "dirichlet", n, alpha=args.alpha, seed=args.seed)
            parents = []
            t_train = time.perf_counter()
            for i, idx in enumerate(parts):
                m = build_model(
                    model_name,
                    data.input_shape,
                    data.num_classes,
                    width=_width(args, model_name),
                    depth=args.depth,
                    seed=args.seed * 100 + i,
                )
                idx_t = torch.as_tensor(idx, dtype=torch.long)
                train(
                    m,
                    data.x_train[idx_t],
                    data.y_train[idx_t],
                    epochs=args.epochs,
                    lr=args.lr,
                    momentum=args.momentum,
                    batch_size=args.batch_size,
                    seed=args.seed + i,
                )
                parents.append(m.eval())
            train_s = time.perf_counter() - t_train
            sizes = [len(p) for p in parts]
            lam = [s / sum(sizes) for s in sizes]
            row: dict[str, Any] = {
                "model": model_name,
                "width": _width(args, model_name),
                "parents": n,
                "dataset": args.dataset,
                "sizes": sizes,
                "train_s": train_s,
                "params": sum(v.numel() for v in parents[0].state_dict().values()),
            }
            row["parent_acc"] = [evaluate(p, x_test, y_test)[1] for p in parents]
            row["ensemble_acc"] = _ensemble(parents, lam, x_test, y_test)[1]
            ex = x_test[:2]
            methods = {
                "average": {"method": "average"},
                "match": {"method": "match"},
                "wb_exact": {"method": "wb"},
                "wb_sinkhorn": {"method": "wb", "solver": "sinkhorn", "epsilon": args.epsilon},
                "gwb": {"method": "gwb"},
            }
            if n > args.gwb_max_parents:
                methods.pop("gwb")
            for key, kw in methods.items():
                t0 = time.perf_counter()
                state = fuse(parents, weights=lam, example_input=ex, **kw)  # type: ignore[arg-type]
                row[f"{key}_time_s"] = time.perf_counter() - t0
                row[f"{key}_loss"], row[f"{key}_acc"] = evaluate(_load(parents[0], state), x_test, y_test)
            spec = derive_spec(parents[0], ex)
            a, b = parents[0], parents[1]
            row["barrier_before"] = _midpoint_barrier(a, b.state_dict(), x_test, y_test)
            for key, how in (("barrier_match", "weight"), ("barrier_ot", "ot")):
                t0 = time.perf_counter()
                aligned_b = align(a, b, how, spec)  # type: ignore[arg-type]
                row[f"{key}_align_s"] = time.perf_counter() - t0
                row[key] = _midpoint_barrier(a, aligned_b, x_test, y_test)  # type: ignore[arg-type]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sizes"}, default=float))
    return rows


def _timed(fn: Any, repeats: int) -> float:
    """Median wall time of ``repeats`` calls (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Rows of (method, width ×, clients, params, median time); and the cProfile text of 10-client wb (if asked)."""
    shape = (3, 32, 32)
    rows = []
    grid = [(w, args.speed_clients_at_width) for w in args.widths] + [(1, c) for c in args.clients]
    seen = set()
    profile_text = ""
    for mult, clients in grid:
        if (mult, clients) in seen:
            continue
        seen.add((mult, clients))
        models = [build_model("resnet20", shape, 10, width=16 * mult, seed=i) for i in range(clients)]
        spec = derive_spec(models[0], torch.zeros(2, *shape))
        states = [m.state_dict() for m in models]
        n_params = sum(v.numel() for v in states[0].values())
        for method in args.speed_methods:
            if method == "match" and clients * mult > args.match_budget:
                continue
            repeats = 1 if mult >= 4 or clients >= 20 else args.repeats
            t = _timed(lambda m=method, s=states, sp=spec: fuse(s, method=m, spec=sp), repeats)
            row = {
                "method": method,
                "width_mult": mult,
                "clients": clients,
                "params": n_params,
                "time_s": t,
                "repeats": repeats,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.profile and mult == 1 and clients == 10:
            prof = cProfile.Profile()
            prof.enable()
            fuse(states, method="wb", spec=spec)
            prof.disable()
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf)
            st.sort_stats("tottime").print_stats(15)
            st.sort_stats("cumulative").print_stats(15)
            profile_text = "\n".join(ln.rstrip() for ln in buf.getvalue().splitlines() if ln.strip())
    return rows, profile_text


def _stats(v: list[float]) -> str:
    if len(v) <= 2:
        return "/".join(f"{a:.3f}" for a in v)
    return f"{statistics.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})"


def _markdown(
    one: list[dict[str, Any]],
    fast: list[dict[str, Any]],
    args: argparse.Namespace,
    profile_text: str = "",
    elapsed: float = 0.0,
    load: str = "",
) -> str:
    """The report; ``load`` is the :func:`load_header` line of the run."""
    lines = [
        f"# Fusion benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Command: `{' '.join(args.argv)}`",
        "",
        f"{load}; torch threads {torch.get_num_threads()}; total wall time {elapsed:.0f} s.",
        "",
    ]
    if one:
        r0 = one[0]
        lines += [
            f"Setup: data set `{r0['dataset']}`; parents trained from different inits (seed 100·s+i) on "
            f"Dirichlet(α={args.alpha}) splits (seed {args.seed}) for {args.epochs} epochs, SGD lr {args.lr}, "
            f"momentum {args.momentum}, batch {args.batch_size}. MLP: {args.depth}×{args.width} hidden; CNN: "
            f"`build_model('cnn', width={args.cnn_width})` (conv {max(1, args.cnn_width // 4)}-"
            f"{2 * max(1, args.cnn_width // 4)}-{2 * max(1, args.cnn_width // 4)}, head {args.cnn_width}). "
            f"λ ∝ client size; reference = largest client. WB Sinkhorn ε={args.epsilon} (relative to the "
            f"cost range). " + (f"GWB up to {args.gwb_max_parents} parents." if args.gwb_max_parents < 10**9 else ""),
            "",
        ]
        lines += [
            "## One-shot fusion: test accuracy (parents: one value each, or mean (min–max))",
            "",
            "| model | N | parents | ensemble | average | match | WB exact | WB sinkhorn | GWB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in one:
            cells = [
                f"{r[k]:.3f}" if k in r else "—"
                for k in ("ensemble_acc", "average_acc", "match_acc", "wb_exact_acc", "wb_sinkhorn_acc", "gwb_acc")
            ]
            lines.append(f"| {r['model']} | {r['parents']} | {_stats(r['parent_acc'])} | {' | '.join(cells)} |")
        lines += [
            "",
            "## One-shot fusion: test loss of the fused model",
            "",
            "| model | N | average | match | WB exact | WB sinkhorn | GWB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in one:
            cells = [
                f"{r[k]:.3f}" if k in r else "—"
                for k in ("average_loss", "match_loss", "wb_exact_loss", "wb_sinkhorn_loss", "gwb_loss")
            ]
            lines.append(f"| {r['model']} | {r['parents']} | {' | '.join(cells)} |")
        lines += [
            "",
            "## Fusion wall time (s; training time for reference)",
            "",
            "| model | N | params/model | train (all parents) | average | match | WB exact | WB sinkhorn | GWB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in one:
            cells = [
                f"{r[k]:.2f}" if k in r else "—"
                for k in ("average_time_s", "match_time_s", "wb_exact_time_s", "wb_sinkhorn_time_s", "gwb_time_s")
            ]
            lines.append(
                f"| {r['model']} | {r['parents']} | {r['params']:,} | {r['train_s']:.0f} | {' | '.join(cells)} |"
            )
        lines += [
            "",
            "## Midpoint barrier between parents 0 and 1 (test set; loss barrier / accuracy drop)",
            "",
            "`L(½θa+½θb) − ½(L(θa)+L(θb))`; accuracy: `½(acc a + acc b) − acc(mid)`. *after match* = B weight-"
            "matched to A (Git Re-Basin), *after OT* = B aligned by layer-wise exact OT (`align(..., 'ot')`).",
            "",
            "| model | N | before | after match | after OT |",
            "|---|---|---|---|---|",
        ]
        for r in one:
            bars = [
                f"{r[k]['loss_barrier']:.3f} / {r[k]['acc_barrier']:.3f}"
                for k in ("barrier_before", "barrier_match", "barrier_ot")
            ]
            lines.append(f"| {r['model']} | {r['parents']} | {' | '.join(bars)} |")
    if fast:
        lines += [
            "",
            "## Fusion wall time, random-init ResNet-20 (3×32×32, no BN), seconds",
            "",
            f"Median of {args.repeats} timed calls after one warm-up (1 call where the `repeats` column says so).",
            "",
            "| method | width × | clients | params/model | repeats | time s |",
            "|---|---|---|---|---|---|",
        ]
        for r in fast:
            lines.append(
                f"| {r['method']} | {r['width_mult']} | {r['clients']} | {r['params']:,} | "
                f"{r['repeats']} | {r['time_s']:.3f} |"
            )
    if profile_text:
        lines += ["", "## cProfile of one 10-client wb fusion (width ×1)", "", "```", profile_text, "```"]
    if args.notes:
        lines += ["", "## Notes", "", Path(args.notes).read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist1d", "mnist10k"])
    p.add_argument("--data-root", default="")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--parents", nargs="+", type=int, default=[2, 5])
    p.add_argument("--width", type=int, default=512, help="MLP hidden width")
    p.add_argument("--cnn-width", type=int, default=128, help="CNN head width (conv channels width/4, width/2)")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--epsilon", type=float, default=0.01)
    p.add_argument("--gwb-max-parents", type=int, default=10**9, help="skip gwb above this many parents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--speed", action="store_true", help="run the speed benchmark instead of one-shot fusion")
    p.add_argument("--profile", action="store_true", help="with --speed: cProfile the 10-client wb fusion")
    p.add_argument("--widths", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--clients", nargs="+", type=int, default=[2, 5, 10, 20])
    p.add_argument("--speed-clients-at-width", type=int, default=10)
    p.add_argument("--speed-methods", nargs="+", default=["wb", "match", "average"])
    p.add_argument("--match-budget", type=int, default=10**9, help="skip match when clients×width exceeds this")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny settings to check the script runs")
    p.add_argument("--notes", default="", help="a markdown file appended to the report as 'Notes'")
    p.add_argument("--tag", default="")
    add_out(p)
    args = p.parse_args(argv)
    start = load_line()
    print(start, flush=True)
    args.argv = ["python", "benchmarks/fusion.py", *(argv if argv is not None else __import__("sys").argv[1:])]
    if args.smoke:
        args.width, args.cnn_width, args.depth, args.epochs, args.parents = 64, 32, 2, 4, [2, 3]
        args.widths, args.clients, args.repeats = [1, 2], [2, 5], 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.perf_counter()
    one = [] if args.speed else one_shot(args)
    fast, prof = speed(args) if args.speed else ([], "")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("speed" if args.speed else f"oneshot-{args.dataset}") + ("-smoke" if args.smoke else "")
    elapsed = time.perf_counter() - t0
    end = load_line()
    print(end, flush=True)
    load = load_header(start, end)
    meta = {"command": " ".join(args.argv), "machine": load, "elapsed_s": elapsed}
    (out / f"fusion-{tag}.json").write_text(
        json.dumps({"meta": meta, "one_shot": one, "speed": fast, "profile": prof}, indent=1, default=float)
    )
    (out / f"fusion-{tag}.md").write_text(_markdown(one, fast, args, prof, elapsed, load))
    print(f"wrote {out / f'fusion-{tag}.md'}")


if __name__ == "__main__":
    main()
