"""FedAvg as a plain PyTorch loop that imports no fedfuse (nor Flower): the baseline of benchmarks/sim_overhead.py.

    python benchmarks/plain_fedavg.py CONFIG.json OUT_DIR

Self-contained: it loads scikit-learn's bundled digits itself (the csv file, without importing scikit-learn), splits
and standardises them, splits the training set IID over the clients, builds and seeds the MLP, samples the clients of
each round, trains them one after another (SGD, shuffled mini-batches, one torch thread), averages n-weighted and
evaluates centrally after every round, as a researcher's loop would. Every random choice is made the way fedfuse makes
it (the same numpy/torch generators seeded the same way), so with screening off the final weights (``OUT_DIR/model.pt``)
equal fedfuse's bit for bit; ``benchmarks/sim_overhead.py`` checks that, and ``tests/test_plain_fedavg.py`` checks each
piece against fedfuse's own function. Config keys: fedfuse's run option names (``num-clients``, ``seed``, ``lr``, ...);
only ``dataset = digits``, ``model = mlp`` and ``partition = iid`` are built here.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULTS: dict[str, Any] = {
    "num-clients": 10, "num-rounds": 5, "local-epochs": 1, "fraction-train": 1.0, "batch-size": 32, "lr": 0.05,
    "momentum": 0.9, "weight-decay": 0.0, "client-threads": 1, "seed": 0, "width": 128, "depth": 2,
}  # fmt: skip


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): the 1,797 8×8 digits, 20 % of every class held out (per class a seeded
    permutation), scaled by the training set's mean and std (float64 statistics, one scalar each)."""
    spec = importlib.util.find_spec("sklearn")  # only to find its data file; scikit-learn is not imported
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    x, y = data[:, :-1], data[:, -1].astype(int)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * 0.2))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    xt = torch.as_tensor(x, dtype=torch.float32).reshape(len(x), 1, 8, 8)
    yt = torch.as_tensor(y, dtype=torch.int64)
    arr = xt[tr].numpy().astype(np.float64)
    mean, std = float(arr.mean()), max(float(arr.std(ddof=1)), 1e-8)
    return (xt[tr] - mean) / std, yt[tr], (xt[te] - mean) / std, yt[te]


def iid_parts(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of 0..n-1 cut into ``num_clients`` contiguous shards (the first n mod K one longer)."""
    order = np.random.default_rng(seed).permutation(n)
    div, mod = divmod(n, num_clients)
    starts = [i * div + min(i, mod) for i in range(num_clients + 1)]
    return [order[starts[i] : starts[i + 1]] for i in range(num_clients)]


def make_mlp(in_features: int, num_classes: int, width: int, depth: int, seed: int) -> nn.Module:
    """``Flatten → [Linear → ReLU] × depth → Linear``, initialised under ``torch.manual_seed(seed)`` (global RNG
    state restored afterwards)."""

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Flatten()]
            d = in_features
            for _ in range(depth):
                layers += [nn.Linear(d, width), nn.ReLU()]
                d = width
            layers.append(nn.Linear(d, num_classes))
            self.net = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP()


def sample(seed: int, rnd: int, n: int, fraction: float) -> list[int]:
    """Sorted ``max(⌈fraction·n⌉, min(2, n))`` clients of round ``rnd``, drawn from (seed, rnd)."""
    k = min(n, max(math.ceil(fraction * n), min(2, n)))
    return sorted(np.random.default_rng(derive_seed(seed, rnd, 7)).choice(n, size=k, replace=False).tolist())


def local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any], seed: int) -> None:
    """SGD on (x, y) for ``local-epochs``: per epoch a permutation from a generator seeded with ``seed``."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight-decay"])
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    bs = cfg["batch-size"]
    for _ in range(cfg["local-epochs"]):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), bs):
            idx = order[start : start + bs]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in batches of 1,024."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), 1024):
        logits = model(x[i : i + 1024])
        loss += float(nn.functional.cross_entropy(logits, y[i : i + 1024], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + 1024]).sum())
    return loss / len(x), correct / len(x)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ λ_i θ_i, λ_i = n_i / Σ n_j, accumulated in float64 in the given order, cast back once."""
    total = sum(weights)
    out = {}
    for key, ref in states[0].items():
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].double() * (w / total)
        out[key] = acc.to(ref.dtype)
    return out


def main(config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    cfg = {**DEFAULTS, **config}
    t0 = time.perf_counter()
    seed, n = cfg["seed"], cfg["num-clients"]
    x_train, y_train, x_test, y_test = load_digits(seed)
    parts = [torch.as_tensor(p) for p in iid_parts(len(x_train), n, seed)]
    model = make_mlp(64, 10, cfg["width"], cfg["depth"], seed)
    setup_s = time.perf_counter() - t0
    train_s = agg_s = eval_s = 0.0
    t = time.perf_counter()
    evaluate(model, x_test, y_test)
    eval_s += time.perf_counter() - t
    for rnd in range(1, cfg["num-rounds"] + 1):
        t = time.perf_counter()
        states, weights = [], []
        for pid in sample(seed, rnd, n, cfg["fraction-train"]):  # partition order
            x, y = x_train[parts[pid]], y_train[parts[pid]]
            local = copy.deepcopy(model)  # the global model
            previous = torch.get_num_threads()
            torch.set_num_threads(cfg["client-threads"])
            try:
                local_sgd(local, x, y, cfg, derive_seed(seed, pid, rnd, 3))
            finally:
                torch.set_num_threads(previous)
            states.append(local.state_dict())
            weights.append(float(len(x)))
        train_s += time.perf_counter() - t
        t = time.perf_counter()
        model.load_state_dict(fedavg(states, weights))
        agg_s += time.perf_counter() - t
        t = time.perf_counter()
        evaluate(model, x_test, y_test)
        eval_s += time.perf_counter() - t
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(out_dir) / "model.pt")
    return {"setup_s": setup_s, "train_s": train_s, "aggregate_s": agg_s, "eval_s": eval_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


if __name__ == "__main__":
    result = main(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
    assert not any(m.split(".")[0] in ("fedfuse", "flwr", "strategies", "clients", "sklearn") for m in sys.modules)
    print("RESULT", json.dumps(result))
