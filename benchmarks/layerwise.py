"""Layer-wise linear mode connectivity (Adilova et al., ICLR 2024) at CPU scale, and partial averaging in FL.

(1) Barriers: for MLP and CNN on each data set, the loss barrier (max over α) of the full model and of each
    single layer (others held at A, and at B), and cumulative barriers in the shallow→deep, deep→shallow and
    random orders, for two pairings:
    - ``independent``: two models from different inits trained on the full training set;
    - ``clients``: a shared init, then two clients train ``--local-epochs`` epochs each on a 2-client
      Dirichlet(0.1) split (the FL situation).
(2) FL: a 10-client CNN (with BatchNorm, so FedBN is defined) under IID, Dirichlet(0.5), Dirichlet(0.1) and
    pathological (2 classes per client) splits, equal rounds, for full averaging and the ``body`` (FedPer),
    ``head`` and ``no-bn`` (FedBN) presets of ``LayerwiseAvg``. Full averaging runs as ``layers=*`` so that
    every method trains on the same 80 % of each partition and reports the same personalised accuracy (the
    model a client holds, on its 20 % holdout); central accuracy is the server's model on the test split.

    python benchmarks/layerwise.py                       # mnist10k (real MNIST) + mnist1d, ~15 min on 2 cores
    python benchmarks/layerwise.py --smoke               # digits, seconds

Runs on one torch thread (the machine is shared). Writes ``layerwise[-<tag>].md`` + ``.json`` (+ plots) under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common when run as a script

from benchmarks.common import RESULTS, add_out, load_header, load_line  # noqa: E402
from fedfuse import lmc  # noqa: E402
from fedfuse.data import load_dataset  # noqa: E402
from fedfuse.data.partition import partition_indices  # noqa: E402
from fedfuse.models import build_model  # noqa: E402
from fedfuse.train import train  # noqa: E402

PARTITIONS = {
    "iid": {"partition": "iid"},
    "dir0.5": {"partition": "dirichlet", "alpha": 0.5},
    "dir0.1": {"partition": "dirichlet", "alpha": 0.1},
    "patho2": {"partition": "pathological", "classes-per-client": 2},
}
METHODS = {"full": "layers=*", "body": "body", "head": "head", "no-bn": "no-bn"}


def _trained(
    name: str,
    ds: Any,
    width: int,
    init_seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    init: dict | None = None,
) -> dict[str, torch.Tensor]:
    model = build_model(name, ds.input_shape, ds.num_classes, width=width, seed=init_seed)
    if init is not None:
        model.load_state_dict(init)
    train(model, x, y, epochs=epochs, lr=0.05, momentum=0.9, batch_size=32, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def barrier_study(
    ds: Any,
    model_name: str,
    width: int,
    epochs: int,
    local_epochs: int,
    samples: int,
    points: int,
    out_dir: Path = RESULTS,
) -> dict[str, Any]:
    """Full / per-layer / cumulative barriers for the two pairings."""
    template = build_model(model_name, ds.input_shape, ds.num_classes, width=width, seed=0)
    x, y = ds.x_test[:samples], ds.y_test[:samples]
    pairs: dict[str, tuple[dict, dict]] = {}
    pairs["independent"] = (
        _trained(model_name, ds, width, 1, ds.x_train, ds.y_train, epochs, seed=1),
        _trained(model_name, ds, width, 2, ds.x_train, ds.y_train, epochs, seed=2),
    )
    parts = partition_indices(ds.y_train.numpy(), "dirichlet", 2, alpha=0.1, seed=0)
    init = template.state_dict()
    pairs["clients"] = tuple(  # type: ignore[assignment]
        _trained(
            model_name,
            ds,
            width,
            0,
            ds.x_train[torch.as_tensor(p)],
            ds.y_train[torch.as_tensor(p)],
            local_epochs,
            seed=10 + i,
            init=init,
        )
        for i, p in enumerate(parts)
    )
    out: dict[str, Any] = {}
    for pairing, (a, b) in pairs.items():
        t0 = time.perf_counter()
        lw = lmc.layerwise_barriers(template, a, b, x, y, num_points=points)
        cum = {o: lmc.cumulative_barriers(template, a, b, x, y, order=o, seed=0, num_points=points) for o in lmc.ORDERS}
        out[pairing] = {
            "full": lw.full.__dict__,
            "layers": {g.group: {"base_a": g.base_a.__dict__, "base_b": g.base_b.__dict__} for g in lw.groups},
            "cumulative": {o: [s.stats.max_loss for s in r.steps] for o, r in cum.items()},
            "cumulative_groups": {o: [s.added for s in r.steps] for o, r in cum.items()},
            "client_sizes": [len(p) for p in parts] if pairing == "clients" else None,
            "seconds": time.perf_counter() - t0,
        }
        lmc.plot_layerwise(lw, out_dir / f"layerwise-{ds.name}-{model_name}-{pairing}.png")
        lmc.plot_cumulative(cum, out_dir / f"layerwise-{ds.name}-{model_name}-{pairing}-cumulative.png")
    return out


def fl_study(
    dataset: str, data_root: str, width: int, rounds: int, local_epochs: int, clients: int, seed: int
) -> list[dict[str, Any]]:
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    rows = []
    for pname, pcfg in PARTITIONS.items():
        for method, preset in METHODS.items():
            cfg = {
                "strategy": "layerwise",
                "layerwise-preset": preset,
                "dataset": dataset,
                "data-root": data_root,
                "model": "cnn",
                "width": width,
                "batch-norm": True,
                "num-clients": clients,
                "num-rounds": rounds,
                "local-epochs": local_epochs,
                "seed": seed,
                "out": f"/tmp/fedfuse-bench-layerwise/{dataset}-{pname}-{method}",
                **pcfg,
            }
            t0 = time.perf_counter()
            last = run_server(InlineGrid(app, clients), cfg)
            rows.append(
                {
                    "dataset": dataset,
                    "partition": pname,
                    "method": method,
                    "central_accuracy": last["central_accuracy"],
                    "personal_accuracy": last["personal_accuracy"],
                    "shared_fraction": last["shared_fraction"],
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(
                f"FL {dataset} {pname:7s} {method:6s} central {last['central_accuracy']:.3f} "
                f"personal {last['personal_accuracy']:.3f}  ({rows[-1]['seconds']:.0f} s)",
                flush=True,
            )
    return rows


def _md(results: dict[str, Any]) -> str:
    a = results["args"]
    lines = [
        "# Layer-wise LMC and partial averaging (benchmarks/layerwise.py)",
        "",
        f"{results.get('load') or 'Machine: ' + results['machine']}; torch threads 1; total {results['seconds']:.0f} s; seed {a['seed']} "
        "(one seed: differences below ~2 points are within noise).",
        "",
        f"## 1. Barriers (loss, max over α on an α grid of {a['points']} points, first {a['samples']} test samples)",
        "",
        f"Independent: two inits, {a['epochs']} epochs on the full training set. Clients: one shared init, "
        f"{a['local_epochs']} local epochs each on a 2-client Dirichlet(0.1) split. Per layer: only that group "
        "interpolated, the rest held at A / at B; reference line = the full end models' losses. "
        f"MLP width 128 × 2 hidden layers; CNN = `build_model('cnn', width={a['cnn_width']})` "
        "(3 conv blocks + hidden FC), no BN.",
        "",
        "full = full-model barrier, max over α / midpoint (the midpoint is negative when the average is better "
        "than the endpoints' mean, as for clients that each saw a few classes).",
        "",
        "| data | model | pairing | full (max / mid) | per layer max (base A / base B) | max single layer |",
        "|---|---|---|---|---|---|",
    ]
    for key, study in results["barriers"].items():
        dataset, model = key.split("/")
        for pairing, r in study.items():
            per = ", ".join(
                f"{g}: {v['base_a']['max_loss']:.3f}/{v['base_b']['max_loss']:.3f}" for g, v in r["layers"].items()
            )
            worst = max(max(v["base_a"]["max_loss"], v["base_b"]["max_loss"]) for v in r["layers"].values())
            full = f"{r['full']['max_loss']:.3f} / {r['full']['mid_loss']:.3f}"
            lines.append(f"| {dataset} | {model} | {pairing} | {full} | {per} | {worst:.3f} |")
    lines += [
        "",
        "Cumulative barriers (max loss after adding each group):",
        "",
        "| data | model | pairing | shallow→deep | deep→shallow | random |",
        "|---|---|---|---|---|---|",
    ]
    for key, study in results["barriers"].items():
        dataset, model = key.split("/")
        for pairing, r in study.items():
            cells = [" → ".join(f"{v:.2f}" for v in r["cumulative"][o]) for o in lmc.ORDERS]
            lines.append(f"| {dataset} | {model} | {pairing} | " + " | ".join(cells) + " |")
    if results["fl"]:
        lines += [
            "",
            f"## 2. FL: {a['clients']} clients, {a['rounds']} rounds × {a['fl_local_epochs']} local epochs, "
            f"CNN width {a['fl_width']} with BatchNorm, SGD lr 0.05 momentum 0.9 (inline backend)",
            "",
            "central = server model on the test split (personal layers at their initial values); "
            "personal = each client's own model on its 20 % holdout, example-weighted. `full` = all layers "
            "averaged (FedAvg on the same 80 % training split).",
            "",
            "| data | partition | " + " | ".join(f"{m} central / personal" for m in METHODS) + " |",
            "|---|---|" + "---|" * len(METHODS),
        ]
        for dataset in dict.fromkeys(r["dataset"] for r in results["fl"]):
            for pname in PARTITIONS:
                cells = []
                for m in METHODS:
                    r = next(
                        x for x in results["fl"] if (x["dataset"], x["partition"], x["method"]) == (dataset, pname, m)
                    )
                    cells.append(f"{r['central_accuracy']:.3f} / {r['personal_accuracy']:.3f}")
                lines.append(f"| {dataset} | {pname} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rewrite_md(stem: str, out: Path = RESULTS) -> None:
    """Regenerate ``out/<stem>.md`` from ``out/<stem>.json`` (after editing the table layout; the recorded load stays)."""
    results = json.loads((out / f"{stem}.json").read_text())
    (out / f"{stem}.md").write_text(_md(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="mnist10k,mnist1d")
    p.add_argument("--data-root", default="/work/shared/data")
    p.add_argument("--epochs", type=int, default=5, help="independent pairing: epochs on the full train set")
    p.add_argument("--local-epochs", type=int, default=5, help="client pairing: local epochs from a shared init")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--points", type=int, default=5)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fl-local-epochs", type=int, default=2)
    p.add_argument("--fl-width", type=int, default=32)
    p.add_argument("--cnn-width", type=int, default=32, help="barrier study CNN width (channels width/4, width/2)")
    p.add_argument("--fl-datasets", default="mnist1d", help="data sets of the FL study (CPU time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fl", action="store_true")
    p.add_argument("--smoke", action="store_true", help="digits, tiny: checks the script runs")
    p.add_argument("--tag", default="")
    add_out(p)
    args = p.parse_args()
    start = load_line()
    print(start, flush=True)
    if args.smoke:
        args.datasets, args.epochs, args.local_epochs, args.samples = "digits", 1, 1, 200
        args.clients, args.rounds, args.fl_local_epochs, args.tag = 4, 1, 1, args.tag or "smoke"
        args.fl_datasets = "digits"
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "args": vars(args),
        "machine": f"{platform.processor() or platform.machine()}",
        "barriers": {},
        "fl": [],
    }
    for dataset in args.datasets.split(","):
        ds = load_dataset(dataset, args.data_root if dataset == "mnist10k" else None, args.seed)
        for model_name, width in (("mlp", 128), ("cnn", args.cnn_width)):
            t = time.perf_counter()
            results["barriers"][f"{dataset}/{model_name}"] = barrier_study(
                ds, model_name, width, args.epochs, args.local_epochs, args.samples, args.points, args.out
            )
            r = results["barriers"][f"{dataset}/{model_name}"]
            print(
                f"barriers {dataset}/{model_name}: full indep {r['independent']['full']['max_loss']:.3f}, "
                f"clients {r['clients']['full']['max_loss']:.3f} ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
        if not args.no_fl and dataset in args.fl_datasets.split(","):
            results["fl"] += fl_study(
                dataset, args.data_root, args.fl_width, args.rounds, args.fl_local_epochs, args.clients, args.seed
            )
    results["seconds"] = time.perf_counter() - t0
    end = load_line()
    print(end, flush=True)
    results["load"] = load_header(start, end)
    stem = "layerwise" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(_md(results))
    print(f"wrote {args.out / stem}.md/.json in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
