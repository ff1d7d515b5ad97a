"""Does gwb (fused Gromov-Wasserstein barycenter) beat wb where GW should help: parents of different widths?

Parents of different hidden widths, own inits, Dirichlet splits of mnist10k; fused at the widest parent's width with
wb, gwb at α = 0.5 (default), 0.9, 1.0, and plain gw; each also with REPAIR; and whether gwb's state equals wb's bit
for bit. Writes ``gwb-widths-mnist10k.md`` and ``.json`` under ``--out`` (default ``benchmarks/results``).

    python benchmarks/gwb_widths.py --data-root /work/shared/data
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common when run as a script

from benchmarks.common import add_out, load_header, load_line, ms  # noqa: E402
from fedfuse import ConfigError, build_model, evaluate, load_dataset, train  # noqa: E402
from fedfuse.align import fuse  # noqa: E402
from fedfuse.data.partition import partition_indices  # noqa: E402

VARIANTS = (("wb", None), ("gwb", 0.5), ("gwb", 0.9), ("gwb", 1.0), ("gw", None))


def run(args: argparse.Namespace, data: Any, widths: tuple[int, ...], seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y_train), generator=gen)
    server, pool = order[: args.server_samples], order[args.server_samples :]
    parts = partition_indices(data.y_train[pool].numpy(), "dirichlet", len(widths), alpha=args.alpha, seed=seed)
    parents = []
    for i, (w, idx) in enumerate(zip(widths, parts, strict=True)):
        net = build_model("mlp", data.input_shape, data.num_classes, width=w, depth=2, seed=seed * 100 + i)
        sel = pool[torch.as_tensor(idx, dtype=torch.long)]
        train(net, data.x_train[sel], data.y_train[sel], epochs=args.epochs, lr=0.05, momentum=0.9, batch_size=64,
              seed=seed * 100 + i)  # fmt: skip
        parents.append(net.eval())
    lam = [len(p) / sum(len(q) for q in parts) for p in parts]
    target = max(widths)
    template = build_model("mlp", data.input_shape, data.num_classes, width=target, depth=2)
    row: dict[str, Any] = {"widths": list(widths), "seed": seed, "parents": [], "methods": {}}
    row["parents"] = [round(evaluate(p, data.x_test, data.y_test)[1], 4) for p in parents]
    wb_state: dict | None = None
    for method, alpha in VARIANTS:
        for rep in (None, "repair"):
            label = f"{method}{'' if alpha is None else f' α={alpha}'}{'+REPAIR' if rep else ''}"
            t = time.perf_counter()
            state = fuse(parents, lam, method=method, template=template, target_width=target, alpha=alpha,
                         bn_repair=rep, data=data.x_train[server], seed=seed)  # fmt: skip
            sec = time.perf_counter() - t
            net = build_model("mlp", data.input_shape, data.num_classes, width=target, depth=2)
            net.load_state_dict(state)
            entry = {"acc": round(evaluate(net, data.x_test, data.y_test)[1], 4), "s": round(sec, 2)}
            if method == "wb" and rep is None:
                wb_state = state
            if method == "gwb" and rep is None and wb_state is not None:
                entry["equals_wb"] = all(torch.equal(state[k], wb_state[k]) for k in state)
            row["methods"][label] = entry
    # unequal depths: neither wb nor gwb pairs layers of different depths
    deep = build_model("mlp", data.input_shape, data.num_classes, width=target, depth=3, seed=seed)
    try:
        fuse([parents[0], deep], method="gwb", template=template)
        row["depths"] = "fused"
    except ConfigError as exc:
        row["depths"] = f"refused: {str(exc)[:140]}"
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], argv: list[str], elapsed: float, args: argparse.Namespace, load: str) -> str:
    """The report; ``load`` is the :func:`load_header` line."""
    labels = list(dict.fromkeys(k for r in rows for k in r["methods"]))
    out = [
        f"# gwb vs wb on parents of different widths (mnist10k MLP, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        "Command: `python benchmarks/gwb_widths.py " + " ".join(shlex.quote(a) for a in argv) + "`",
        "",
        f"{load}; total wall time {elapsed:.0f} s.",
        "",
        f"Setup: MLP 784-w-w-10 parents (own inits, Dirichlet α={args.alpha} splits, {args.epochs} epochs SGD lr "
        "0.05 momentum 0.9), fused at the widest parent's width (`target_width`); λ ∝ client size; REPAIR on "
        f"{args.server_samples} held-out training images. Test accuracy, mean ± std over seeds "
        f"{sorted({r['seed'] for r in rows})}; *= wb*: gwb's fused state equal to wb's bit for bit in every seed.",
        "",
        "| widths | parents | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault(tuple(r["widths"]), []).append(r)
    for widths, rs in by.items():
        cells = []
        for k in labels:
            cell = ms([r["methods"][k]["acc"] for r in rs])
            eq = [r["methods"][k].get("equals_wb") for r in rs]
            if all(e is True for e in eq):
                cell += " (= wb)"
            cells.append(cell)
        parents = ms([sum(r["parents"]) / len(r["parents"]) for r in rs])
        out.append(f"| {'/'.join(map(str, widths))} | {parents} | " + " | ".join(cells) + " |")
    out += ["", f"Unequal depths (MLP depth 2 with depth 3): {rows[0]['depths']}"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--server-samples", type=int, default=1000)
    add_out(p)
    args = p.parse_args(argv)
    start = load_line()
    print(start, flush=True)
    torch.set_num_threads(1)
    data = load_dataset("mnist10k", data_root=args.data_root, seed=0)
    t0, rows = time.perf_counter(), []
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for widths in ((64, 256), (64, 128, 256), (128, 128, 128)):
            rows.append(run(args, data, widths, seed))
            (out / "gwb-widths-mnist10k.json").write_text(json.dumps(rows, indent=1))
            load = load_header(start, load_line())
            (out / "gwb-widths-mnist10k.md").write_text(markdown(rows, argv, time.perf_counter() - t0, args, load))
    print(load_line(), flush=True)


if __name__ == "__main__":
    main()
