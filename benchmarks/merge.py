"""Merging parents trained apart: every fuse method, with REPAIR and FedDF distillation, against the logit ensemble.

Parents start from their own inits and train on label-skewed (Dirichlet α) splits of mnist10k's training images
less a held-out *server batch* (unlabeled: the data of cca/zip/REPAIR/distillation); test accuracy on the 2,000
test images. Writes ``merge-<tag>.md`` and ``.json`` under ``--out`` (default ``benchmarks/results``).

    python benchmarks/merge.py --data-root /work/shared/data --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common when run as a script

from benchmarks.common import add_out, load_header, load_line, ms  # noqa: E402
from fedfuse import build_model, evaluate, load_dataset, train  # noqa: E402
from fedfuse.align import fuse  # noqa: E402
from fedfuse.data.partition import partition_indices  # noqa: E402
from fedfuse.merge.distill import distill, ensemble_logits, synthetic_inputs  # noqa: E402
from fedfuse.merge.partial import multihead_bytes, partial_zip  # noqa: E402

MODELS = {"mlp": ("mlp", 128, 2, False), "cnn": ("cnn", 64, None, False), "cnn-bn": ("cnn", 64, None, True)}
METHODS = ("average", "match", "wb", "gwb", "cca", "zip")


def _net(name: str, data: Any, seed: int | None = None) -> nn.Module:
    kind, width, depth, bn = MODELS[name]
    return build_model(kind, data.input_shape, data.num_classes, width=width, depth=depth, batch_norm=bn, seed=seed)


def _acc(net: nn.Module, data: Any) -> float:
    return evaluate(net, data.x_test, data.y_test)[1]


def _loaded(name: str, data: Any, state: dict) -> nn.Module:
    net = _net(name, data)
    net.load_state_dict(state)
    return net.eval()


def run_cell(args: argparse.Namespace, data: Any, name: str, n: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y_train), generator=gen)
    server, pool = order[: args.server_samples], order[args.server_samples :]
    x_server = data.x_train[server]
    parts = partition_indices(data.y_train[pool].numpy(), "dirichlet", n, alpha=args.alpha, seed=seed)
    parents = []
    t0 = time.perf_counter()
    for i, idx in enumerate(parts):
        net = _net(name, data, seed=seed * 100 + i)
        sel = pool[torch.as_tensor(idx, dtype=torch.long)]
        train(net, data.x_train[sel], data.y_train[sel], epochs=args.epochs, lr=args.lr, momentum=0.9,
              batch_size=64, seed=seed * 100 + i)  # fmt: skip
        parents.append(net.eval())
    train_s = time.perf_counter() - t0
    lam = [len(p) / sum(len(q) for q in parts) for p in parts]
    with torch.no_grad():
        ens = float((ensemble_logits(parents, data.x_test, lam).argmax(1) == data.y_test).float().mean())
    row: dict[str, Any] = {
        "model": name, "parents_n": n, "seed": seed, "train_s": round(train_s, 1),
        "parents": [round(_acc(p, data), 4) for p in parents], "ensemble": round(ens, 4), "methods": {},
    }  # fmt: skip
    template = _net(name, data)
    model_bytes = sum(v.numel() * v.element_size() for v in template.state_dict().values())
    data_bytes = x_server.numel() * 4
    fused_states: dict[str, dict] = {}
    for method in args.methods:
        for rep in (None, "repair"):
            label = method + ("+REPAIR" if rep else "")
            t = time.perf_counter()
            try:
                state = fuse(parents, lam, method=method, template=template, data=x_server, bn_repair=rep,
                             bn_fold=MODELS[name][3] and method in ("match", "wb", "gwb"), seed=seed)  # fmt: skip
            except Exception as exc:  # a failure is a result too: recorded, not hidden
                row["methods"][label] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            sec = time.perf_counter() - t
            uses_data = rep is not None or method in ("cca", "zip")
            row["methods"][label] = {"acc": round(_acc(_loaded(name, data, state), data), 4), "s": round(sec, 2),
                                     "bytes": model_bytes + (data_bytes if uses_data else 0)}  # fmt: skip
            fused_states[label] = state
    for k in args.partial:  # partial zipping: the last k hidden groups kept apart per parent (a multi-head model)
        t = time.perf_counter()
        head = partial_zip(parents, lam, template=template, data=x_server, keep_last=k)
        sec = time.perf_counter() - t
        acc = evaluate(head, data.x_test, data.y_test)[1]
        row["methods"][f"zip, last {k} apart"] = {"acc": round(acc, 4), "s": round(sec, 2),
                                                  "bytes": multihead_bytes(head) + data_bytes}  # fmt: skip
    # FedDF: distil the λ-averaged parents' logits into a fused start, on the server batch (and smaller / synthetic)
    synth = synthetic_inputs(args.server_samples, x_server, seed=seed)
    for start in ("average", "zip+REPAIR", "cca+REPAIR"):
        if start not in fused_states:
            continue
        for tag, batch in (("", x_server), ("@250", x_server[:250]), ("@synthetic", synth)):
            t = time.perf_counter()
            state = distill(_loaded(name, data, fused_states[start]), parents, batch, epochs=args.distill_epochs,
                            seed=seed, weights=lam)  # fmt: skip
            sec = time.perf_counter() - t
            row["methods"][f"{start}+distill{tag}"] = {
                "acc": round(_acc(_loaded(name, data, state), data), 4), "s": round(sec, 2),
                "bytes": model_bytes + batch.numel() * 4,
            }  # fmt: skip
    print(json.dumps({k: row[k] for k in ("model", "parents_n", "seed", "ensemble")}),
          {k: v.get("acc") for k, v in row["methods"].items()}, flush=True)  # fmt: skip
    return row


def _cell(rows: list[dict], key: str) -> str:
    vals = [r["methods"][key]["acc"] for r in rows if "acc" in r["methods"].get(key, {})]
    return ms(vals) if vals else "fails"


def markdown(rows: list[dict], args: argparse.Namespace, argv: list[str], elapsed: float, load: str) -> str:
    """The report; ``load`` is the :func:`load_header` line."""
    cmd = "python benchmarks/merge.py " + " ".join(shlex.quote(a) for a in argv)
    seeds = sorted({r["seed"] for r in rows})
    out = [
        f"# Merging parents trained apart on mnist10k ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Command: `{cmd}`",
        "",
        f"{load}; total wall time {elapsed:.0f} s.",
        "",
        f"Setup: `mnist10k` (8,000/2,000 split of the official MNIST test images); {args.server_samples} training "
        "images held out as the server's *unlabeled* batch (cca/zip activations, REPAIR statistics, distillation "
        f"inputs); parents from their own inits (seed·100 + i) on Dirichlet(α={args.alpha}) splits of the rest, "
        f"{args.epochs} epochs SGD lr {args.lr} momentum 0.9 batch 64; λ ∝ client size, reference = largest "
        "client. MLP 784-128-128-10; CNN `build_model('cnn', width=64)` (conv 16-32-32, head 64), cnn-bn the same "
        f"with BatchNorm (match/wb/gwb with `bn_fold=True`; cca/zip fold BN themselves). Seeds {seeds}: mean ± "
        "std of test accuracy. *+REPAIR*: `bn_repair='repair'` on the server batch. *+distill*: FedDF "
        f"(`fedfuse.merge.distill`, KL to the λ-averaged parents' logits, T = 1, Adam 1e-3, {args.distill_epochs} "
        "epochs, label-free held-out early stop) from the named start, on the server batch, on its first 250 "
        "images (@250), or on Gaussian inputs with the batch's per-pixel mean/std (@synthetic).",
        "",
        "## Test accuracy (fused / +REPAIR)",
        "",
        "| model | parents | parents (mean) | " + " | ".join(args.methods) + " | ensemble |",
        "|---|---|---|" + "---|" * len(args.methods) + "---|",
    ]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["parents_n"]), []).append(r)
    for (name, n), rs in groups.items():
        pm = ms([statistics.fmean(r["parents"]) for r in rs])
        cells = [f"{_cell(rs, m)} / {_cell(rs, m + '+REPAIR')}" for m in args.methods]
        out.append(f"| {name} | {n} | {pm} | " + " | ".join(cells) + f" | {ms([r['ensemble'] for r in rs])} |")
    dist_keys = sorted({k for r in rows for k in r["methods"] if "distill" in k or "apart" in k})
    out += ["", "## FedDF distillation after fusion; partial zipping (*last k apart*: a multi-head model, not one fused model)", "", "| model | parents | " + " | ".join(dist_keys)
            + " | ensemble |", "|---|---|" + "---|" * (len(dist_keys) + 1)]  # fmt: skip
    for (name, n), rs in groups.items():
        cells = [_cell(rs, k) for k in dist_keys]
        out.append(f"| {name} | {n} | " + " | ".join(cells) + f" | {ms([r['ensemble'] for r in rs])} |")
    out += ["", "## Gap to the ensemble (ensemble − best, mean over seeds) and the goal", "",
            "| model | parents | best fused (no distillation) | gap | best overall | gap | goal |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (name, n), rs in groups.items():
        ens = statistics.fmean(r["ensemble"] for r in rs)
        keys = sorted({k for r in rs for k in r["methods"]})

        def mean_acc(k: str, rs: list[dict] = rs) -> float:
            v = [r["methods"][k]["acc"] for r in rs if "acc" in r["methods"].get(k, {})]
            return statistics.fmean(v) if len(v) == len(rs) else -1.0

        keys = [k for k in keys if "apart" not in k]  # the goal is about one fused model
        plain = max((k for k in keys if "distill" not in k), key=mean_acc)
        best = max(keys, key=mean_acc)
        goal = 0.03 if n >= 5 else 0.01
        gap = ens - mean_acc(best)
        out.append(f"| {name} | {n} | {plain} {mean_acc(plain):.3f} | {ens - mean_acc(plain):+.3f} | {best} "
                   f"{mean_acc(best):.3f} | {gap:+.3f} | ≤ {goal:.2f}: {'met' if gap <= goal else 'missed'} |")  # fmt: skip
    out += ["", "## Seconds and bytes per method (mean over cells; bytes = fused model + the server batch it reads)",
            "", "| method | seconds | bytes |", "|---|---|---|"]  # fmt: skip
    keys = list(dict.fromkeys(k for r in rows for k in r["methods"]))
    for k in keys:
        secs = [r["methods"][k]["s"] for r in rows if "s" in r["methods"].get(k, {})]
        byts = [r["methods"][k]["bytes"] for r in rows if "bytes" in r["methods"].get(k, {})]
        out.append(f"| {k} | {ms(secs, 2)} | {', '.join(sorted({f'{b:,}' for b in byts}))} |")
    errors = [(r["model"], r["parents_n"], r["seed"], k, v["error"]) for r in rows for k, v in r["methods"].items()
              if "error" in v]  # fmt: skip
    if errors:
        out += ["", "## Failures", ""] + [f"- {m} {n} parents seed {s}, {k}: {e}" for m, n, s, k, e in errors]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--parents", nargs="+", type=int, default=[2, 5])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--server-samples", type=int, default=1000)
    p.add_argument("--distill-epochs", type=int, default=20)
    p.add_argument("--tag", default="mnist10k")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--partial", nargs="*", type=int, default=[], help="partial zipping: keep the last K groups apart")
    add_out(p)
    args = p.parse_args(argv)
    start = load_line()
    print(start, flush=True)
    torch.set_num_threads(1)
    data = load_dataset("mnist10k", data_root=args.data_root, seed=0)
    t0 = time.perf_counter()
    rows = []
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seeds outermost: a run cut short still covers every model
        for name in args.models:
            for n in args.parents:
                rows.append(run_cell(args, data, name, n, seed))
                (out / f"merge-{args.tag}.json").write_text(json.dumps(rows, indent=1))
                load = load_header(start, load_line())
                (out / f"merge-{args.tag}.md").write_text(markdown(rows, args, argv, time.perf_counter() - t0, load))
    print(load_line(), flush=True)


if __name__ == "__main__":
    main()
