"""FedAvg as a plain PyTorch loop that imports no fedfuse (nor Flower): the baseline of benchmarks/sim_overhead.py.

    python benchmarks/plain_fedavg.py PLAN.pt OUT_DIR

``PLAN.pt`` (written by :func:`benchmarks.sim_overhead.write_plan`) holds what defines the experiment, so both sides
do the same work: the data tensors, the clients' index arrays, the initial weights, per round the sampled clients and
each client's epochs, step cap and shuffling seed, the SGD hyper-parameters. This file only trains (SGD, shuffled
mini-batches), averages n-weighted in float64 in partition order, and evaluates centrally after every round, as a
researcher's loop would; the final weights go to ``OUT_DIR/model.pt`` (the benchmark checks they equal fedfuse's).
MLPs only (``nn.Flatten`` then ``Linear``/``ReLU`` layers, the shapes read from the initial weights).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn


class MLP(nn.Module):
    """``net = Sequential(Flatten, Linear, ReLU, ..., Linear)``: the state-dict keys of the plan's MLP."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        weights = sorted((k for k in state if k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))
        layers: list[nn.Module] = [nn.Flatten()]
        for i, key in enumerate(weights):
            out_f, in_f = state[key].shape
            layers.append(nn.Linear(in_f, out_f))
            if i < len(weights) - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def local_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict, epochs: int, max_steps: int | None,
              seed: int) -> float:  # fmt: skip
    """SGD on (x, y): per epoch a permutation from a generator seeded with ``seed``; returns the last loss."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight-decay"])
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    steps, last = 0, float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), hp["batch-size"]):
            if max_steps is not None and steps >= max_steps:
                return last
            idx = order[start : start + hp["batch-size"]]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            steps += 1
            last = float(loss.detach())
    return last


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1024]).argmax(1) == y[i : i + 1024]).sum()) for i in range(0, len(x), 1024))
    return correct / max(len(x), 1)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ λ_i θ_i, λ_i = n_i / Σ n_j, accumulated in float64 in the given order, cast back once."""
    total = sum(weights)
    lam = [w / total for w in weights]
    out = {}
    for key, ref in states[0].items():
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, w in zip(states, lam, strict=True):
            acc += state[key].double() * w
        out[key] = acc.to(ref.dtype)
    return out


def main(plan_path: str, out_dir: str) -> dict:
    t0 = time.perf_counter()
    plan = torch.load(plan_path)
    hp = plan["hp"]
    global_state = plan["init"]
    model = MLP(global_state)
    setup_s = time.perf_counter() - t0
    train_s = agg_s = eval_s = 0.0
    t = time.perf_counter()
    accuracy(model, plan["x_test"], plan["y_test"])
    eval_s += time.perf_counter() - t
    for rnd in plan["rounds"]:
        t = time.perf_counter()
        states, weights = [], []
        for client in rnd:  # partition order
            idx = plan["parts"][client["pid"]]
            x, y = plan["x_train"][idx], plan["y_train"][idx]
            local = MLP(global_state)
            previous = torch.get_num_threads()
            torch.set_num_threads(hp["client-threads"])
            try:
                local_sgd(local, x, y, hp, client["epochs"], client["max_steps"], client["seed"])
            finally:
                torch.set_num_threads(previous)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(float(len(x)))
        train_s += time.perf_counter() - t
        t = time.perf_counter()
        global_state = fedavg(states, weights)
        agg_s += time.perf_counter() - t
        t = time.perf_counter()
        model.load_state_dict(global_state)
        accuracy(model, plan["x_test"], plan["y_test"])
        eval_s += time.perf_counter() - t
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(global_state, Path(out_dir) / "model.pt")
    assert not any(m.split(".")[0] in ("fedfuse", "flwr", "strategies", "clients") for m in sys.modules)
    return {"setup_s": setup_s, "train_s": train_s, "aggregate_s": agg_s, "eval_s": eval_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


if __name__ == "__main__":
    print("RESULT", json.dumps(main(sys.argv[1], sys.argv[2])))
