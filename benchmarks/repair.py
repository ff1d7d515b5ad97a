"""One-shot fusion with fused-GW barycenters and (federated) REPAIR, on N parents from different inits.

For each model (MLP 784-256-256-10, the CNN, the CNN with BatchNorm): N parents trained from different
inits on Dirichlet(α) splits of the training set (cached on disk under ``--cache``, not in git); test accuracy
of the parents, the λ-weighted logit ensemble, and the fused model by ``average`` / ``match`` / ``wb`` /
``gw`` (plain GW barycenter, the paper's) / ``gwb`` (fused GW, α swept) — each without and with REPAIR
computed the federated way (:mod:`fedfuse.align.repair`: every parent reports per-unit statistics of the
fused model and of its own aligned model *on its own partition*; no raw data is pooled), with ``rounds``
Jacobi rounds; for BN models also the federated BatchNorm reset. Then the midpoint barrier between parents
0 and 1, before/after alignment and after alignment + REPAIR.

    python benchmarks/repair.py --data-root /work/shared/data --models mlp cnn cnn-bn --epochs 5

``--bn-fold``: BN models also fused with ``fuse(bn_fold=True)`` (BatchNorm folded into its conv for the alignment
cost and the average), an extra before/after table; results then go to ``repair-bn-<tag>``.

Runs on one torch thread (the machine is shared). Writes ``repair-<tag>.md`` and ``.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
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
from fedfuse.align.gw import DEFAULT_ALPHA  # noqa: E402
from fedfuse.align.repair import bn_statistics, pool_bn_statistics, repair, repair_sites  # noqa: E402
from fedfuse.data import load_dataset  # noqa: E402
from fedfuse.data.partition import partition_indices  # noqa: E402
from fedfuse.models import build_model  # noqa: E402
from fedfuse.train import evaluate, train  # noqa: E402

MODELS = {  # name -> (builder name, width, depth, batch_norm)
    "mlp": ("mlp", 256, 2, False),
    "cnn": ("cnn", 128, 1, False),
    "cnn-bn": ("cnn", 128, 1, True),
}


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    return net.eval()


def parents(
    args: argparse.Namespace, data: Any, name: str, n: int, shared: bool = False
) -> tuple[list[nn.Module], list[np.ndarray]]:
    """``n`` trained parents and their partitions (trained once, then loaded from ``args.cache``); ``shared``:
    every parent trains on the whole training set (REPAIR's two-model setting)."""
    kind, width, depth, bn = MODELS[name]
    if shared:
        parts = [np.arange(len(data.y_train))] * n
    else:
        parts = partition_indices(data.y_train.numpy(), "dirichlet", n, alpha=args.alpha, seed=args.seed)
    key = f"{name}-{n}-{args.epochs}-{args.alpha}-{args.seed}-{args.lr}-{args.batch_size}" + (
        "-shared" if shared else ""
    )
    path = Path(args.cache) / f"parents-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    models = [
        build_model(kind, data.input_shape, data.num_classes, width=width, depth=depth, batch_norm=bn,
                    seed=args.seed * 100 + i)
        for i in range(n)
    ]  # fmt: skip
    if path.exists():
        for m, s in zip(models, torch.load(path, weights_only=True), strict=True):
            m.load_state_dict(s)
        return [m.eval() for m in models], parts
    for i, (m, idx) in enumerate(zip(models, parts, strict=True)):
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        train(m, data.x_train[idx_t], data.y_train[idx_t], epochs=args.epochs, lr=args.lr, momentum=0.9,
              batch_size=args.batch_size, seed=args.seed + i)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save([m.state_dict() for m in models], tmp)
    os.replace(tmp, path)
    return [m.eval() for m in models], parts


@torch.no_grad()
def _ensemble_acc(models: list[nn.Module], lam: list[float], x: torch.Tensor, y: torch.Tensor) -> float:
    logits = sum(w * m.eval()(x) for w, m in zip(lam, models, strict=True))
    return float((logits.argmax(1) == y).float().mean())  # type: ignore[union-attr]


def _federated_repair(
    template: nn.Module, fused: dict, aligned: list[dict], xs: list[torch.Tensor], lam: list[float], rounds: int | None
) -> dict:
    """REPAIR with every parent's statistics on its own partition (what the federated round computes)."""
    net = _load(template, fused)
    repair(net, [_load(template, a) for a in aligned], xs, lam, rounds=rounds)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _federated_bn_reset(template: nn.Module, fused: dict, xs: list[torch.Tensor], lam: list[float]) -> dict:
    net = _load(template, fused)
    pooled = pool_bn_statistics([bn_statistics(net, x) for x in xs], lam)
    return {**fused, **pooled}


def _barrier(a: nn.Module, b_state: dict, x: torch.Tensor, y: torch.Tensor, mid: dict | None = None) -> dict:
    """``L(mid) − ½(L(a) + L(b))`` and ``½(acc a + acc b) − acc(mid)``; ``mid`` defaults to the plain midpoint."""
    b = _load(a, b_state)
    mid_state = mid if mid is not None else fuse([a, b], method="average")
    la, aa = evaluate(a, x, y)
    lb, ab = evaluate(b, x, y)
    lm, am = evaluate(_load(a, mid_state), x, y)
    return {"loss_barrier": lm - (la + lb) / 2, "acc_barrier": (aa + ab) / 2 - am, "mid_acc": am}


def _stats_batch(x: torch.Tensor, idx: np.ndarray, args: argparse.Namespace, salt: int = 0) -> torch.Tensor:
    """A client's statistics data: a seeded subset of at most ``--stats-samples`` of its partition."""
    idx = np.asarray(idx)
    if args.stats_samples and len(idx) > args.stats_samples:
        idx = np.random.default_rng([args.seed, salt, len(idx)]).choice(idx, args.stats_samples, replace=False)
    return x[torch.as_tensor(idx, dtype=torch.long)]


def run_model(args: argparse.Namespace, data: Any, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    models, parts = parents(args, data, name, args.parents)
    train_s = time.perf_counter() - t0
    xt, yt = data.x_test, data.y_test
    sizes = [len(p) for p in parts]
    lam = [s / sum(sizes) for s in sizes]
    xs = [_stats_batch(data.x_train, p, args) for p in parts]
    ex = xt[:2]
    template = models[0]
    spec = derive_spec(template, ex)
    sites = repair_sites(template, spec)
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in template.modules())
    row: dict[str, Any] = {
        "model": name, "parents": args.parents, "sizes": sizes, "train_or_load_s": train_s,
        "params": sum(v.numel() for v in template.state_dict().values()),
        "parent_acc": [evaluate(m, xt, yt)[1] for m in models],
        "ensemble_acc": _ensemble_acc(models, lam, xt, yt),
        "repair_sites": [s.module for s in sites], "batch_norm": bn,
    }  # fmt: skip
    methods: dict[str, dict[str, Any]] = {"average": {}, "match": {}, "wb": {}, "gw": {}}
    methods.update({f"gwb_a{a:g}": {"method": "gwb", "alpha": a} for a in args.gwb_alphas})
    methods = {k: v for k, v in methods.items() if k.split("_")[0] in args.methods}
    results = {}
    wb_transports = None
    folds = (False, True) if args.bn_fold and bn else (False,)
    runs = [(key + ("+fold" if fold else ""), {"method": key, **kw, "bn_fold": fold}) for key, kw in methods.items()
            for fold in folds]  # fmt: skip
    for key, kw in runs:
        t = time.perf_counter()
        fused, aligned = fuse(models, lam, spec=spec, template=template, return_aligned=True, bn_repair=None, **kw)
        res: dict[str, Any] = {"fuse_s": time.perf_counter() - t, "acc": evaluate(_load(template, fused), xt, yt)[1]}
        for label, rounds in (("repair", None), ("repair_1round", 1)):
            t = time.perf_counter()
            rep = _federated_repair(template, fused, aligned, xs, lam, rounds)
            res[f"{label}_s"] = time.perf_counter() - t
            res[f"{label}_acc"] = evaluate(_load(template, rep), xt, yt)[1]
        if bn:
            res["bn_reset_acc"] = evaluate(_load(template, _federated_bn_reset(template, fused, xs, lam)), xt, yt)[1]
        if key == "wb":
            wb_transports = aligned
        elif key.startswith("gwb") and wb_transports is not None:  # how far the structure term moved the plan
            res["rel_diff_vs_wb"] = float(
                sum(
                    sum(float((a[k] - w[k]).norm()) for k in a if a[k].is_floating_point())
                    for a, w in zip(aligned, wb_transports, strict=True)
                )
                / max(sum(sum(float(w[k].norm()) for k in w if w[k].is_floating_point()) for w in wb_transports), 1e-12)
            )
        results[key] = res
        print(name, key, {k: round(v, 4) for k, v in res.items()}, flush=True)
    row["methods"] = results
    # extra traffic of federated REPAIR / BN reset per client (float32 payloads, no framing)
    model_bytes = sum(v.numel() * v.element_size() for v in template.state_dict().values())
    unit_bytes = sum(2 * 4 * template.get_submodule(s.module).weight.shape[0] for s in sites)
    bn_bytes = sum(
        v.numel() * v.element_size()
        for k, v in template.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    )
    rounds = len(sites)
    row["bytes_per_client"] = {
        "model": model_bytes,
        "repair_down": 2 * model_bytes + (rounds - 1) * model_bytes,
        "repair_up": 2 * unit_bytes + (rounds - 1) * unit_bytes,
        "repair_rounds": rounds,
        "repair_1round_down": 2 * model_bytes,
        "repair_1round_up": 2 * unit_bytes,
        "bn_reset_down": model_bytes if bn else 0,
        "bn_reset_up": bn_bytes,
    }
    # two-parent barrier: plain midpoint, aligned midpoint (match / OT), aligned + federated REPAIR
    a, b = models[0], models[1]
    lam2 = [0.5, 0.5]
    bar: dict[str, Any] = {"before": _barrier(a, b.state_dict(), xt, yt)}
    for key, how in (("match", "weight"), ("ot", "ot")):
        b_al = align(a, b, how, spec)
        mid = fuse([a.state_dict(), b_al], lam2, method="average")
        bar[key] = _barrier(a, b_al, xt, yt, mid)  # type: ignore[arg-type]
        rep = _federated_repair(template, mid, [a.state_dict(), b_al], xs[:2], lam2, None)  # type: ignore[list-item]
        bar[f"{key}_repair"] = _barrier(a, b_al, xt, yt, rep)  # type: ignore[arg-type]
    row["barrier"] = bar
    if args.shared_pair:  # REPAIR's setting: two parents from different inits on the same (whole) training set
        pair, pair_parts = parents(args, data, name, 2, shared=True)
        a, b = pair
        xs2 = [_stats_batch(data.x_train, p, args, salt=i) for i, p in enumerate(pair_parts)]
        shared_bar: dict[str, Any] = {"before": _barrier(a, b.state_dict(), xt, yt)}
        for key, how in (("match", "weight"), ("ot", "ot")):
            b_al = align(a, b, how, spec)
            mid = fuse([a.state_dict(), b_al], lam2, method="average")
            shared_bar[key] = _barrier(a, b_al, xt, yt, mid)  # type: ignore[arg-type]
            rep = _federated_repair(template, mid, [a.state_dict(), b_al], xs2, lam2, None)  # type: ignore[list-item]
            shared_bar[f"{key}_repair"] = _barrier(a, b_al, xt, yt, rep)  # type: ignore[arg-type]
        row["barrier_shared"] = shared_bar
        print(name, "barrier (shared data)", json.dumps(shared_bar), flush=True)
    print(name, "barrier", json.dumps(bar), flush=True)
    return row


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace, elapsed: float, load: str = "") -> str:
    """The report; ``load`` is the :func:`load_header` line of the run."""
    lines = [
        f"# One-shot fusion with fused GW and federated REPAIR ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Command: `{' '.join(args.argv)}`",
        "",
        f"{load}; torch threads 1; total wall time {elapsed:.0f} s.",
        "",
        f"Setup: `{args.dataset}` (the 10,000 official MNIST test images split 8,000/2,000, stratified, seed "
        f"{args.seed}); {args.parents} parents from different inits on Dirichlet(α={args.alpha}) splits of the 8,000, "
        f"{args.epochs} epochs SGD lr {args.lr} momentum 0.9 batch {args.batch_size}; λ ∝ client size; reference = "
        "largest client; test accuracy on the 2,000. MLP 784-256-256-10; CNN `build_model('cnn', width=128)` "
        "(conv 32-64-64, head 128), cnn-bn the same with BatchNorm. *+REPAIR* = federated REPAIR: each parent's "
        "statistics (of the fused model and of its own aligned model) on its own partition only, λ-averaged, "
        "one round per repaired layer (exact); *1 round* = a single statistics round (Jacobi); *BN reset* = "
        f"federated BN statistics (clients recompute, server pools). Statistics use at most {args.stats_samples or 'all'} "
        "samples per client (seeded subset of its partition).",
        "",
        "## Test accuracy of the fused model (5 parents)",
        "",
        "| model | parents | ensemble | method | fused | +REPAIR | +REPAIR 1 round | BN reset | fuse s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pa = r["parent_acc"]
        for key, res in r["methods"].items():
            bn = f"{res['bn_reset_acc']:.3f}" if "bn_reset_acc" in res else "—"
            lines.append(
                f"| {r['model']} | {min(pa):.3f}–{max(pa):.3f} | {r['ensemble_acc']:.3f} | {key} | {res['acc']:.3f} | "
                f"{res['repair_acc']:.3f} | {res['repair_1round_acc']:.3f} | {bn} | {res['fuse_s']:.1f} |"
            )
    lines += ["", "## Goals", ""]
    for r in rows:
        m = r["methods"]
        gwb = m.get(f"gwb_a{DEFAULT_ALPHA:g}")
        if gwb and all(k in m for k in ("average", "wb", "gw")):
            lines.append(
                f"- {r['model']}: gwb (α={DEFAULT_ALPHA}) − average = {gwb['acc'] - m['average']['acc']:+.3f} "
                f"(goal ≥ +0.30); gwb − wb = {gwb['acc'] - m['wb']['acc']:+.3f} (goal ≥ −0.03); plain gw − average "
                f"= {m['gw']['acc'] - m['average']['acc']:+.3f}; relative change of the aligned weights vs WB: "
                f"{gwb.get('rel_diff_vs_wb', float('nan')):.4f}"
            )
        cands = [k for k in m if k.split("+")[0] in ("wb", "match", f"gwb_a{DEFAULT_ALPHA:g}")]
        best = max(cands or ["wb"], key=lambda k: m[k]["repair_acc"] if k in m else -1)
        if best not in m or "wb" not in m:
            continue
        lines.append(
            f"- {r['model']}: ensemble − (wb + REPAIR) = {r['ensemble_acc'] - m['wb']['repair_acc']:+.3f}, "
            f"ensemble − (best fused + REPAIR: {best}) = {r['ensemble_acc'] - m[best]['repair_acc']:+.3f} "
            "(goal ≤ 0.05)"
        )
    if any(k.endswith("+fold") for r in rows for k in r["methods"]):
        lines += [
            "",
            "## BN-aware alignment: raw parameters (before) vs BatchNorm folded into its conv (after, `bn_fold=True`)",
            "",
            "Same parents and statistics as above; *after* aligns and averages the folded (eval-mode) affine maps "
            "and unfolds onto the aligned parents' averaged γ, β, σ². Gap = ensemble − accuracy.",
            "",
            "| model | ensemble | method | fused before | fused after | BN reset before | BN reset after | "
            "REPAIR before | REPAIR after | REPAIR gap before | REPAIR gap after |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            m, ens = r["methods"], r["ensemble_acc"]
            for key in m:
                if key.endswith("+fold") or f"{key}+fold" not in m:
                    continue
                a, b = m[key], m[f"{key}+fold"]
                lines.append(
                    f"| {r['model']} | {ens:.3f} | {key} | {a['acc']:.3f} | {b['acc']:.3f} | "
                    f"{a.get('bn_reset_acc', float('nan')):.3f} | {b.get('bn_reset_acc', float('nan')):.3f} | "
                    f"{a['repair_acc']:.3f} | {b['repair_acc']:.3f} | {ens - a['repair_acc']:+.3f} | "
                    f"{ens - b['repair_acc']:+.3f} |"
                )
    lines += [
        "",
        "## Extra traffic per sampled client for one fusion (float32 payload bytes, no framing)",
        "",
        "| model | model bytes | REPAIR rounds | REPAIR down | REPAIR up | 1 round down | 1 round up | BN reset down | "
        "BN reset up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["bytes_per_client"]
        lines.append(
            f"| {r['model']} | {b['model']:,} | {b['repair_rounds']} | {b['repair_down']:,} | {b['repair_up']:,} | "
            f"{b['repair_1round_down']:,} | {b['repair_1round_up']:,} | {b['bn_reset_down']:,} | {b['bn_reset_up']:,} |"
        )
    lines += [
        "",
        "## Midpoint barrier between parents 0 and 1 (test loss barrier / accuracy drop / midpoint accuracy)",
        "",
        "*+REPAIR*: federated REPAIR of the aligned midpoint (each parent's statistics on its own partition). "
        "Reduction = 1 − barrier(aligned + REPAIR) / barrier(aligned), on the loss and on the accuracy barrier "
        "(n/a where the aligned barrier is already ≤ 0).",
        "",
        "| model | before | match | match + REPAIR | reduction | OT | OT + REPAIR | reduction |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(d: dict[str, float]) -> str:
        return f"{d['loss_barrier']:.3f} / {d['acc_barrier']:.3f} / {d['mid_acc']:.3f}"

    def red(a: dict[str, float], b: dict[str, float]) -> str:
        parts = []
        for key, what in (("loss_barrier", "loss"), ("acc_barrier", "acc")):
            parts.append(f"{what} {1 - b[key] / a[key]:.0%}" if a[key] > 0 else f"{what} n/a (≤ 0)")
        return ", ".join(parts)

    for r in rows:
        for label, key in (("Dirichlet parents 0, 1", "barrier"), ("same data (whole train set)", "barrier_shared")):
            if key not in r:
                continue
            bar = r[key]
            lines.append(
                f"| {r['model']}, {label} | {cell(bar['before'])} | {cell(bar['match'])} | "
                f"{cell(bar['match_repair'])} | {red(bar['match'], bar['match_repair'])} | {cell(bar['ot'])} | "
                f"{cell(bar['ot_repair'])} | {red(bar['ot'], bar['ot_repair'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="")
    p.add_argument("--dataset", default="mnist10k")
    p.add_argument("--models", nargs="+", default=["mlp", "cnn", "cnn-bn"], choices=sorted(MODELS))
    p.add_argument("--parents", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="/tmp/fedfuse-parents")
    p.add_argument("--gwb-alphas", nargs="+", type=float, default=sorted({0.1, DEFAULT_ALPHA, 0.9, 1.0}))
    p.add_argument("--stats-samples", type=int, default=400, help="per-client samples for statistics (0 = all)")
    p.add_argument("--methods", nargs="+", default=["average", "match", "wb", "gw", "gwb"])
    p.add_argument("--shared-pair", action="store_true", help="also two parents trained on the same whole train set")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--bn-fold", action="store_true", help="BN models: every method also with fuse(bn_fold=True)")
    p.add_argument("--tag", default="")
    add_out(p)
    args = p.parse_args(argv)
    start = load_line()
    print(start, flush=True)
    args.argv = ["python", "benchmarks/repair.py", *(argv if argv is not None else sys.argv[1:])]
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, data_root=args.data_root or None, seed=args.seed)
    if args.train_only:
        for name in args.models:
            t0 = time.perf_counter()
            models, _ = parents(args, data, name, args.parents)
            if args.shared_pair:
                models += parents(args, data, name, 2, shared=True)[0]
            accs = [evaluate(m, data.x_test, data.y_test)[1] for m in models]
            print(name, f"{time.perf_counter() - t0:.0f}s", [f"{a:.3f}" for a in accs], flush=True)
        return
    t0 = time.perf_counter()
    rows = [run_model(args, data, name) for name in args.models]
    tag = ("bn-" if args.bn_fold else "") + (args.tag or f"{args.dataset}-{args.parents}")
    end = load_line()
    print(end, flush=True)
    load = load_header(start, end)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(args.argv), "load": load, "rows": rows}
    (out / f"repair-{tag}.json").write_text(json.dumps(record, indent=1))
    (out / f"repair-{tag}.md").write_text(_markdown(rows, args, time.perf_counter() - t0, load))
    print(f"wrote {out / f'repair-{tag}.md'}")


if __name__ == "__main__":
    main()
