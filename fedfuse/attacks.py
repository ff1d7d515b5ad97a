"""Simulated Byzantine clients: which clients attack, and what an attacking client does to its reply.

``attack`` is ``KIND:VALUE``; ``attackers`` clients (chosen from the seed) apply it to every reply they send:

* ``scale:s``        θ_sent + s·Δ   (Δ = θ_trained − θ_sent; a boosted update, e.g. ``scale:1e6``)
* ``signflip:s``     θ_sent − s·Δ   (gradient ascent, e.g. ``signflip:10``)
* ``num-examples:v`` the reply claims ``v`` examples (``1e12``, ``nan``, ``inf``, ``-5``): a weight attack
* ``extra-bytes:b``  the first array is replaced by ``b`` bytes of float32 zeros under the same key, so
                     only the server's reply-size limit (checked before decoding) can catch it. The
                     *client* allocates ``b`` bytes (twice, with serialisation): keep ``b`` small in tests.
* ``labelflip[:b]``  trains on flipped labels ``y → C − 1 − y``, then sends θ_sent + b·Δ (``b`` = 1: plain).
* ``noise:s``        θ_sent + s·‖Δ‖·g/‖g‖, ``g ~ N(0, I)`` over the floating entries (the Gaussian attack of
                     Blanchard et al. 2017 and Fang et al. 2020, scaled to the attacker's own update): no
                     collusion, every attacker draws its own noise (seeded by run seed, partition and round), so
                     near-duplicate detection cannot group them.

Omniscient, colluding attacks: the attacker knows every honest client's update of the round (in simulation it
recomputes them, :func:`honest_updates`: μ and σ below are their coordinate-wise mean and standard deviation):

* ``alie:z``         Δ = μ − z·σ ("A little is enough", Baruch et al. 2019): inside the honest spread, so
                     medians and trimmed means follow it;
* ``ipm:ε``          Δ = −ε·μ (inner-product manipulation, Xie et al. 2020);
* ``adaptive:r``     Δ = −μ/‖μ‖ scaled to ``r`` × the server's update-norm bound for its claim (the bound is
                     in the run config it receives), claiming ``r`` × the examples cap (or bound) × the
                     round's median num-examples and × the cap scale of its local steps
                     (:func:`fedfuse.screening.cap_scale`): just under every bound with ``r`` < 1.
* ``evade:c``        aimed at the trusted reference's allowances: per parameter tensor, cosine −c with μ
                     (the attacker's stand-in for the server's update g₀), the rest along −σ made orthogonal
                     to μ, each tensor's share of the norm that of a typical honest update; claims at 0.99 ×
                     the caps like ``adaptive:0.99``, and a norm 0.99 × what the bound allows an update that
                     does not agree with g₀ (the median norm per step × its capped steps). With c inside
                     the band the guard grants honest disagreement it keeps its whole weight, and whatever
                     the guard does not project away acts.
* ``lowkey:r``       ``evade:0.4`` with claims at ``r`` × the caps (``r`` = 0.2: 2 × the median's examples and
                     the cap scale's steps): it stays under the influence test's outsized line (2 × the median's
                     influence, :mod:`fedfuse.influence`), so only the test's step on harmful steps can catch it.
* ``freeride:r``     a free rider (Lin et al. 2019; Fraboni et al. 2021) that claims like ``adaptive:r`` (``r`` × the
                     caps) and sends back the model it was sent: an update of zero, which no norm, direction or
                     loss of its own can flag, diluting the honest updates by its claimed share of the weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedfuse.catalog import ATTACKS, OMNISCIENT, attack_reason, parse_attack
from fedfuse.screening import cap_scale, lower_median
from fedfuse.validation import valid_variance

__all__ = [
    "ATTACKS",
    "parse_attack",
    "attack_reason",
    "attacker_ids",
    "is_attacker",
    "poison_state",
    "claimed_examples",
    "OMNISCIENT",
    "honest_updates",
    "omniscient_reply",
    "flip_labels",
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


def poison_state(
    kind: str, value: float, state: Mapping[str, Tensor], sent: Mapping[str, Tensor], seed: int = 0
) -> dict:
    """The state an attacking client sends instead of ``state`` (trained from ``sent``); ``seed`` draws
    ``noise``'s direction."""
    out = dict(state)
    if kind == "noise":
        keys = [k for k, v in state.items() if torch.is_floating_point(v) and k in sent]
        own = math.sqrt(sum(float((state[k].double() - sent[k].double()).pow(2).sum()) for k in keys))
        gen = torch.Generator().manual_seed(int(seed))
        g = {k: torch.randn(tuple(state[k].shape), generator=gen, dtype=torch.float64) for k in keys}
        step = value * own / (math.sqrt(sum(float(v.pow(2).sum()) for v in g.values())) or 1.0)
        for k in keys:
            out[k] = valid_variance(k, (sent[k].double() + step * g[k]).to(state[k].dtype))
    elif kind in ("scale", "signflip", "labelflip"):
        s = -value if kind == "signflip" else value
        for k, v in state.items():
            if torch.is_floating_point(v) and k in sent:
                base = sent[k].to(v.dtype)
                out[k] = valid_variance(k, base + s * (v - base))  # a negative variance: rejected as malformed
    elif kind == "extra-bytes" and out:
        first = next(iter(out))
        out[first] = torch.zeros(max(1, int(value) // 4), dtype=torch.float32)
    return out


def claimed_examples(kind: str, value: float, num_examples: int) -> float | int:
    """The num-examples an attacking client claims (the omniscient ones: :func:`omniscient_reply`)."""
    return value if kind == "num-examples" else num_examples


def flip_labels(kind: str, y: Tensor, num_classes: int) -> Tensor:
    """The labels an attacking client trains on: ``C − 1 − y`` under ``labelflip``, else ``y``."""
    return (num_classes - 1 - y) if kind == "labelflip" else y


_HONEST: dict[tuple, list[tuple[dict[str, Tensor], int, int]]] = {}  # one round's honest updates, per process


def honest_updates(
    cfg: Mapping[str, Any], sent: Mapping[str, Tensor], server_round: int, own: int | None = None
) -> list[tuple[dict[str, Tensor], int, int]]:
    """(Δ_j, num-examples, local steps) of every honest client of the round, recomputed as they train (same
    data, plan and seeds) from the model ``sent``, on the entries sent; cached per process, so colluders share
    one computation. ``own``: the attacker's partition, whose model (its width, its LoRA rank) every honest
    client is simulated in, so the updates fit what it sends (default: each honest client's own model)."""
    from fedfuse.experiment import client_data, client_model, dataset_for, local_plan, local_train
    from fedfuse.lora.run import load_received, lora_on

    n = int(cfg["num-clients"])
    bad = set(attacker_ids(int(cfg["seed"]), n, int(cfg.get("attackers", 0))))
    fingerprint = tuple((tuple(v.shape), float(v.double().sum())) for v in sent.values() if torch.is_floating_point(v))
    key = (str(cfg.get("attack")), int(cfg["seed"]), n, server_round, fingerprint)
    if key not in _HONEST:
        _HONEST.clear()
        ds, out = dataset_for(cfg), []
        for pid in (p for p in range(n) if p not in bad):
            x, y = client_data(cfg, pid, n)
            model = client_model(cfg, ds, pid if own is None else own)
            if lora_on(cfg):  # adapters (and folded base weights) only: the frozen base is the client's own
                load_received(model, sent)
            else:
                model.load_state_dict(dict(sent))
            result = local_train(cfg, model, x, y, local_plan(cfg, pid, server_round, len(x)))
            delta = {k: v.detach() - sent[k] for k, v in model.state_dict().items()
                     if k in sent and torch.is_floating_point(v)}  # fmt: skip
            out.append((delta, result.num_examples, result.steps))
        _HONEST[key] = out
    return _HONEST[key]


def omniscient_reply(
    kind: str, value: float, cfg: Mapping[str, Any], sent: Mapping[str, Tensor], server_round: int,
    num_examples: int, steps: int, own: int | None = None,
) -> tuple[dict[str, Tensor], float, float]:  # fmt: skip
    """(state, claimed num-examples, claimed local steps) an omniscient attacker (``alie``, ``ipm``, ``adaptive``,
    ``evade``, ``lowkey``, ``freeride``) of partition ``own`` sends (the entries it was sent, moved)."""
    honest = honest_updates(cfg, sent, server_round, own)
    keys = list(honest[0][0])
    stack = {k: torch.stack([d[k].double() for d, _, _ in honest]) for k in keys}
    mean = {k: v.mean(0) for k, v in stack.items()}
    std = {k: v.std(0, unbiased=False) for k, v in stack.items()} if kind in ("alie", "evade", "lowkey") else {}
    if kind == "alie":
        delta = {k: mean[k] - value * std[k] for k in keys}
    elif kind == "ipm":
        delta = {k: -value * mean[k] for k in keys}
    else:  # adaptive, evade: just under every bound the server's run config sets
        cap = float(cfg.get("examples-cap", 0) or 0) or float(cfg.get("examples-bound", 0) or 0) or 10.0
        ratio = value if kind in ("adaptive", "lowkey", "freeride") else 0.99
        top = [math.inf] * (int(cfg["num-clients"]) - len(honest))  # the attackers' own claims: the largest
        ns, ss = [float(n) for _, n, _ in honest], [float(s) for _, _, s in honest]
        med_n = min(lower_median(ns + top), max(ns))  # the server's scales for this round (capped: most attack)
        scale_s = min(cap_scale(ss + top), max(ss))
        num_examples, steps = max(1, int(ratio * cap * med_n)), max(1, int(ratio * cap * scale_s))
        if kind == "freeride":
            return dict(sent), num_examples, steps
        norms = [math.sqrt(sum(float(d[k].pow(2).sum()) for k in keys)) for d, _, _ in honest]
        k_bound = float(cfg.get("update-norm-bound", 0) or 0)
        if kind in ("evade", "lowkey"):  # an update that does not agree with g0 may move 1 x the median per step
            k_bound = min(k_bound, 1.0) if k_bound > 0 else 0.0
        if k_bound > 0:
            per_step = lower_median([nm / s for nm, (_, _, s) in zip(norms, honest, strict=True)])
            target = ratio * k_bound * per_step * min(steps, cap * scale_s)
        else:
            target = ratio * 4.0 * lower_median(norms)
        if kind == "adaptive":
            mean_norm = math.sqrt(sum(float(v.pow(2).sum()) for v in mean.values())) or 1.0
            delta = {k: -mean[k] * (target / mean_norm) for k in keys}
        else:
            typical = {k: float(v.flatten(1).norm(dim=1).median()) for k, v in stack.items()}
            delta = _against(mean, std, value if kind == "evade" else LOWKEY_COS, target, typical)
    state = {k: valid_variance(k, (sent[k].double() + delta[k]).to(sent[k].dtype)) if k in delta else sent[k]
             for k in sent}  # fmt: skip
    return state, num_examples, steps


LOWKEY_COS = 0.4  # lowkey's cosine with the honest mean (evade:0.4's)


def _against(
    mean: dict[str, Tensor], std: dict[str, Tensor], cos: float, norm: float, typical: dict[str, float]
) -> dict[str, Tensor]:
    """Per tensor t the unit direction ``−c·u_t + √(1 − c²)·o_t`` (``u_t = μ_t/‖μ_t‖``, ``o_t`` the unit part
    of ``−σ_t`` orthogonal to ``u_t``), scaled so the tensors share ``norm`` as a typical honest update does
    (``typical``: each tensor's median norm over the honest updates)."""
    total = math.sqrt(sum(v * v for v in typical.values())) or 1.0
    out = {}
    for k, m in mean.items():
        m_norm = float(m.norm())
        if m_norm == 0.0:
            out[k] = torch.zeros_like(m)
            continue
        u = m / m_norm
        o = -std[k] - float((-std[k] * u).sum()) * u
        o_norm = float(o.norm())
        o = o / o_norm if o_norm > 0 else torch.zeros_like(o)
        out[k] = (-cos * u + math.sqrt(1.0 - cos * cos) * o) * (norm * typical[k] / total)
    return out
