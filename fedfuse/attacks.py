"""Simulated Byzantine clients: which clients attack, and what an attacking client does to its reply.

``attack`` is ``KIND:VALUE``; ``attackers`` clients (chosen from the seed) apply it to every reply they send:

* ``scale:s``        θ_sent + s·Δ   (Δ = θ_trained − θ_sent; a boosted update, e.g. ``scale:1e6``)
* ``signflip:s``     θ_sent − s·Δ   (gradient ascent, e.g. ``signflip:10``)
* ``num-examples:v`` the reply claims ``v`` examples (``1e12``, ``nan``, ``inf``, ``-5``): a weight attack
* ``extra-bytes:b``  the first array is replaced by ``b`` bytes of float32 zeros under the same key, so
                     only the server's reply-size limit (checked before decoding) can catch it. The
                     *client* allocates ``b`` bytes (twice, with serialisation): keep ``b`` small in tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedfuse.catalog import ATTACKS, attack_reason, parse_attack

__all__ = [
    "ATTACKS",
    "parse_attack",
    "attack_reason",
    "attacker_ids",
    "is_attacker",
    "poison_state",
    "claimed_examples",
]


def attacker_ids(seed: int, num_clients: int, attackers: int) -> list[int]:
    """The partition ids (sorted) of the ``attackers`` attacking clients, drawn from ``seed``."""
    from fedfuse.experiment import derive_seed

    k = max(0, min(int(attackers), int(num_clients)))
    rng = np.random.default_rng(derive_seed(int(seed), 11))
    return sorted(rng.choice(int(num_clients), size=k, replace=False).tolist())


def is_attacker(cfg: Mapping[str, Any], partition_id: int) -> bool:
    """Whether this client attacks under the run config (``attack`` set and it is one of the attackers)."""
    if parse_attack(str(cfg.get("attack", ""))) is None:
        return False
    return partition_id in attacker_ids(int(cfg["seed"]), int(cfg["num-clients"]), int(cfg.get("attackers", 0)))


def poison_state(kind: str, value: float, state: Mapping[str, Tensor], sent: Mapping[str, Tensor]) -> dict:
    """The state an attacking client sends instead of ``state`` (trained from ``sent``)."""
    out = dict(state)
    if kind in ("scale", "signflip"):
        s = value if kind == "scale" else -value
        for k, v in state.items():
            if torch.is_floating_point(v) and k in sent:
                base = sent[k].to(v.dtype)
                out[k] = base + s * (v - base)
    elif kind == "extra-bytes" and out:
        first = next(iter(out))
        out[first] = torch.zeros(max(1, int(value) // 4), dtype=torch.float32)
    return out


def claimed_examples(kind: str, value: float, num_examples: int) -> float | int:
    """The num-examples an attacking client claims."""
    return value if kind == "num-examples" else num_examples
