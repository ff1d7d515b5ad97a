"""Flower's own FedAvg (``flwr.serverapp.strategy.FedAvg``, Message API) on sklearn's digits with fedfuse's default
MLP (64-128-128-10), one local epoch of SGD (lr 0.05, momentum 0.9, batch 32) per client and round, Dirichlet(0.3)
label partitions, and a central evaluation on the 20 % test split after every round — the work of
``fedfuse simulate --dataset digits --model mlp`` at its defaults, written as a Flower user would, importing no
fedfuse. Run by benchmarks/ray_overhead.py through ``flwr run`` on a local SuperLink (simulation runtime)."""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn


def net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))  # fmt: skip


@lru_cache(maxsize=1)
def data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """digits scaled to [0, 1], a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(y)))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


@lru_cache(maxsize=1)
def partitions(seed: int, n: int, alpha: float) -> list[np.ndarray]:
    """Dirichlet(α) label partitions of the training split."""
    y = data(seed)[1].numpy()
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * n)) * len(idx)).astype(int)[:-1]
        for p, chunk in enumerate(np.split(idx, cuts)):
            parts[p] += chunk.tolist()
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    x_train, y_train, _, _ = data(int(cfg["seed"]))
    idx = torch.as_tensor(partitions(int(cfg["seed"]), n, float(cfg["alpha"]))[pid])
    x, y = x_train[idx], y_train[idx]
    torch.set_num_threads(1)
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]))
    order = torch.randperm(len(x))
    total = 0.0
    bs = int(cfg["batch-size"])
    for start in range(0, len(x), bs):
        b = order[start : start + bs]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[b]), y[b])
        loss.backward()
        opt.step()
        total += float(loss) * len(b)
    metrics = MetricRecord({"num-examples": len(x), "train-loss": total / max(len(x), 1)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    seed, rounds = int(rc["seed"]), int(rc["num-rounds"])
    n = len(list(grid.get_node_ids()))
    _, _, x_test, y_test = data(seed)
    model = net()
    stamps: list[dict[str, float]] = []
    t0 = time.perf_counter()

    @torch.no_grad()
    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
        stamps.append({"round": server_round, "accuracy": acc, "wall_time": time.perf_counter() - t0})
        return MetricRecord({"accuracy": acc})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n)
    config = ConfigRecord({k: rc[k] for k in ("lr", "momentum", "batch-size", "alpha", "seed")})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                            train_config=config, evaluate_fn=central)  # fmt: skip
    if rc["out"]:
        out = Path(str(rc["out"]))
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result.arrays.to_torch_state_dict(), out / "model.pt")
        (out / "rounds.json").write_text(json.dumps(stamps))
