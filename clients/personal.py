"""Layer-wise mode (``strategies.layerwise.LayerwiseAvg``): personal layers never leave the client.

The round config's ``shared-keys`` lists the state-dict keys the server averages; every other key is
personal and lives in ``Context.state`` under :data:`fedfuse.protocol.PERSONAL_STATE` between rounds.
The client trains on a seeded 80 % of its partition and evaluates its personal model on the other 20 %.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context

from fedfuse import protocol
from fedfuse.experiment import derive_seed

__all__ = ["shared_keys_of", "holdout_split", "load_personal", "keep_personal"]


def shared_keys_of(cfg: Mapping[str, Any]) -> list[str] | None:
    """The keys the server averages (round config ``shared-keys``), or None outside layer-wise mode."""
    keys = str(cfg.get(protocol.SHARED_KEYS, ""))
    return keys.split(",") if keys else None


def holdout_split(seed: int, pid: int, x: Any, y: Any, part: str) -> tuple[Any, Any]:
    """``part`` = "train" (80 %) or "test" (a seeded 20 % holdout, >= 1 sample) of this client's partition."""
    n = len(x)
    perm = np.random.default_rng(derive_seed(seed, pid, 17)).permutation(n)
    n_test = max(1, round(0.2 * n)) if n >= 2 else 0
    idx = np.sort(perm[:n_test] if part == "test" else perm[n_test:])
    if len(idx) == 0:  # a one-sample partition: train and evaluate on it
        idx = np.arange(n)
    t = torch.as_tensor(idx)
    return x[t], y[t]


def load_personal(model: torch.nn.Module, received: Mapping[str, torch.Tensor], context: Context, shared: list[str]):
    """Model = this client's personal layers (Context.state; the initial model before its first round) + the
    received shared keys, which must be exactly ``shared``."""
    if set(received) != set(shared):
        raise ValueError(f"layer-wise mode: received keys {sorted(received)[:3]}... differ from shared-keys")
    state = model.state_dict()
    if protocol.PERSONAL_STATE in context.state.array_records:
        state.update(context.state.array_records[protocol.PERSONAL_STATE].to_torch_state_dict())
    state.update(received)
    model.load_state_dict(state)


def keep_personal(model: torch.nn.Module, context: Context, shared: list[str]) -> dict[str, torch.Tensor]:
    """Store the personal layers in Context.state; return the shared part (all that goes to the server)."""
    state = model.state_dict()
    keep = set(shared)
    context.state[protocol.PERSONAL_STATE] = ArrayRecord({k: v for k, v in state.items() if k not in keep})
    return {k: state[k] for k in shared}
