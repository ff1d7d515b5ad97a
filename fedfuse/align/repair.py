"""REPAIR (Jordan et al. 2022, our implementation) as sufficient statistics, so it also runs federated.

Averaging aligned models shrinks the variance of hidden units ("variance collapse"). REPAIR rescales every
hidden unit ``c`` of the fused model so that its output's mean and std on data equal the λ-weighted average of
the same unit's statistics in the parents *aligned to the fused model*::

    μ_t = Σ_i λ_i μ_i[c],   σ_t = Σ_i λ_i σ_i[c],   s = σ_t / σ_c
    W[c] ← s · W[c],        b[c] ← s · (b[c] − μ_c) + μ_t

The corrected map is the *last affine map of the unit* (a "site"): the unit's BatchNorm in eval mode
(``γ x̂ + β``, ``x̂`` from the running statistics: affine in ``x``, so ``γ``/``β`` play ``W``/``b``) or GroupNorm
(``γ x̂ + β`` with ``x̂`` normalised per sample and group: the unit's output is still ``γ[c] x̂[c] + β[c]``, so
rescaling ``γ``/``β`` sets its mean and std exactly; the conv before it would be renormalised in part) when its
group has one, otherwise its Linear/Conv producer. A module that serves several groups (GroupNorm's channel
groups are parts of one hidden group) is one site, rescaled once. Statistics are per channel, pooled over the batch and
spatial positions, with the model in eval mode — one code path with and without BatchNorm; running
statistics are left as they are (the correction absorbs their error). A unit whose fused std is ~0 (dead on the
data) is only shifted *(our choice: scaling it would multiply its weights by a huge factor)*.

Federated form (no raw data moves): client ``i`` runs the fused model and its own aligned model on its local
data and reports ``(μ, σ)`` per unit of both (:func:`unit_statistics`). The server averages each with
``λ_i = n_i / Σ n_j`` (:func:`average_statistics`) and rescales (:func:`rescale_units`). *(our reading: the
paper computes both statistics on one shared data set; here "the data" is the union of the clients' data,
each client's statistics weighted by its size.)* Correcting a layer changes the statistics of the layers
above it, so the exact (sequential) REPAIR needs the fused statistics re-measured after each layer; we
iterate all layers at once (Jacobi): after ``r`` rounds the ``r`` shallowest depths are exact, and
``rounds = number of sites`` reproduces sequential REPAIR. The one-shot :func:`repair` uses the same
functions, with the parents' statistics on ``data`` (or, with one batch per parent, on each parent's own).

A client's statistics are its own word: before averaging, each unit's ``σ_i`` is bounded by ``K (σ_m + s)`` and
its ``μ_i`` to ``μ_m ± K (σ_m + |μ_m| + s)`` — ``(μ_m, σ_m)`` the clients' lower medians, ``s`` the larger of the
site's median and mean ``σ_m`` (:func:`bound_statistics`, ``K`` = 10), so one client cannot set a target
alone: a model trained apart with zeroed BatchNorm variances reports stds of 10⁶ and more, and took REPAIR's
targets with it *(our addition)*. Honest clients' statistics lie inside the bound (10 clean BN runs trained
apart, 5 clients, Dirichlet 0.3 and 0.1, 5 seeds: 9 bit-identical with and without it, one 1.7 points higher
with it); values inside are returned bit for bit.

Federated BatchNorm reset (:func:`bn_statistics`, :func:`pool_bn_statistics`): each client recomputes the
fused model's BN statistics on its data (:func:`fedfuse.align.bn.reset_bn_stats`); the server pools them as
the statistics of the union, ``μ = Σ λ_i μ_i``, ``v = Σ λ_i (v_i + μ_i²) − μ²``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.align.bn import reset_bn_stats
from fedfuse.align.spec import TransportSpec
from fedfuse.errors import ConfigError

__all__ = [
    "RepairSite",
    "repair_sites",
    "unit_statistics",
    "average_statistics",
    "rescale_units",
    "repair",
    "bn_statistics",
    "pool_bn_statistics",
    "bound_statistics",
    "Stats",
]

Stats = dict[str, Tensor]  # site module name -> (2, C) tensor: per-channel mean (row 0) and std (row 1)
_BN = nn.modules.batchnorm._BatchNorm
_NORMS = (_BN, nn.GroupNorm)  # per-channel γ x̂ + β after the normalisation
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_TINY = 1e-6


@dataclass(frozen=True)
class RepairSite:
    """A module whose output channels are one hidden group's units, and whose weight/bias REPAIR rescales."""

    module: str
    group: str
    kind: str  # "bn" (an affine BatchNorm or GroupNorm) or "producer"


def _inputs(data: Any) -> Tensor:
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor) and len(data) == 2:
        data = data[0]
    if not isinstance(data, Tensor) or len(data) == 0:
        raise ConfigError("repair data must be a non-empty input tensor (or an (x, y) pair)")
    return data


def repair_sites(model: nn.Module, spec: TransportSpec | None = None, example_input: Any = None) -> list[RepairSite]:
    """Per hidden group (shallow → deep): its affine BatchNorms/GroupNorms if it has any, else its Linear/Conv
    producers.

    Groups without such a module (recurrent cells, LayerNorm-only units) are not repaired.
    """
    if spec is None:
        if example_input is None:
            raise ConfigError("repair_sites needs spec= or example_input= (a small input batch)")
        from fedfuse.align.gate import gated_spec

        spec = gated_spec(model, _inputs(example_input)[:2])
    modules = dict(model.named_modules())
    sites: list[RepairSite] = []
    seen: set[str] = set()  # one module in several groups (GroupNorm's parts: a group cut at its G groups)
    for g in spec.groups:
        bns, producers = [], []
        for m in g.members:
            if m.role != "out" or not m.key.endswith(".weight") or m.axis != 0:
                continue
            mod = modules.get(m.key[: -len(".weight")])
            if isinstance(mod, _NORMS) and mod.affine:
                bns.append(m.key[: -len(".weight")])
            elif isinstance(mod, _PRODUCERS):
                producers.append(m.key[: -len(".weight")])
        chosen = [RepairSite(n, g.name, "bn") for n in bns] or [RepairSite(n, g.name, "producer") for n in producers]
        sites.extend(c for c in chosen if c.module not in seen)  # a site rescales all its channels: once
        seen.update(c.module for c in chosen)
    return sites


@torch.no_grad()
def unit_statistics(model: nn.Module, data: Any, sites: Sequence[RepairSite | str], batch_size: int = 1024) -> Stats:
    """Per site: ``(2, C)`` mean and std of each output channel on ``data`` (eval mode; batch × positions)."""
    x = _inputs(data)
    names = [s.module if isinstance(s, RepairSite) else s for s in sites]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"repair sites {missing[:3]} are not modules of the model")
    sums: dict[str, list[Tensor]] = {}

    def hook(name: str):
        def record(m: nn.Module, _i: Any, out: Tensor) -> None:
            o = out.detach().double()
            if isinstance(m, nn.Linear) or o.dim() == 2:  # (..., C): a Linear on tokens keeps units last
                flat = o.reshape(-1, o.shape[-1]).T
            else:  # (B, C, ...): conv / norm layouts
                flat = o.transpose(0, 1).reshape(o.shape[1], -1)
            acc = sums.setdefault(name, [torch.zeros(flat.shape[0], dtype=torch.float64)] * 2 + [torch.zeros(())])
            sums[name] = [acc[0] + flat.sum(1), acc[1] + (flat * flat).sum(1), acc[2] + flat.shape[1]]

        return record

    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), int(batch_size)):
            model(x[start : start + int(batch_size)])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out: Stats = {}
    for n in names:
        s, sq, cnt = sums[n]
        mean = s / cnt
        var = (sq / cnt - mean * mean).clamp_min(0.0) * (cnt / max(float(cnt) - 1.0, 1.0))
        out[n] = torch.stack([mean, var.sqrt()]).float()
    return out


def average_statistics(stats: Sequence[Stats], weights: Sequence[float] | None = None) -> Stats:
    """``Σ_i λ_i stats_i`` per site (means and stds averaged separately: REPAIR's interpolated targets)."""
    if not stats:
        raise ConfigError("average_statistics needs at least one set of statistics")
    lam = torch.full((len(stats),), 1.0 / len(stats), dtype=torch.float64) if weights is None else (
        torch.as_tensor(list(weights), dtype=torch.float64)
    )  # fmt: skip
    if len(lam) != len(stats) or not bool((lam >= 0).all()) or float(lam.sum()) <= 0:
        raise ConfigError(f"weights {list(map(float, lam))} must be {len(stats)} non-negative numbers, not all 0")
    lam = lam / lam.sum()
    keys = set(stats[0])
    for i, s in enumerate(stats):
        if set(s) != keys:
            raise ConfigError(f"statistics {i} cover sites {sorted(s)[:3]}..., expected {sorted(keys)[:3]}...")
    return {k: sum(float(w) * s[k].double() for w, s in zip(lam, stats, strict=True)).float() for k in stats[0]}


def rescale_units(
    state: Mapping[str, Tensor], sites: Sequence[RepairSite], fused: Stats, target: Stats
) -> dict[str, Tensor]:
    """New state with every site's unit ``c`` rescaled so its (mean, std) go from ``fused`` to ``target``."""
    out = {k: v.clone() for k, v in state.items()}
    for site in sites:
        n = site.module
        if n not in fused or n not in target:
            continue
        (mean_c, std_c), (mean_t, std_t) = fused[n].double(), target[n].double()
        if mean_c.shape != mean_t.shape or f"{n}.weight" not in out:
            raise ConfigError(f"statistics of site {n!r} do not match the model ({tuple(mean_c.shape)} units)")
        alive = std_c > _TINY * (1.0 + std_t)
        scale = torch.where(alive, std_t / std_c.clamp_min(1e-300), torch.ones_like(std_c))
        w = out[f"{n}.weight"]
        out[f"{n}.weight"] = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        if f"{n}.bias" in out:
            b = out[f"{n}.bias"]
            out[f"{n}.bias"] = ((b.double() - mean_c) * scale + mean_t).to(b.dtype)
    return out


def _load(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    net = copy.deepcopy(model)
    net.load_state_dict(dict(state))
    return net


@torch.no_grad()
def repair(
    model: nn.Module,
    parents: Sequence[nn.Module],
    data: Any,
    weights: Sequence[float] | None = None,
    *,
    rounds: int | None = None,
    spec: TransportSpec | None = None,
) -> nn.Module:
    """REPAIR ``model`` in place from ``parents`` *already aligned to it* (same widths and unit order).

    ``data``: one input batch for all, or a list with one batch per parent (each parent's statistics on its own
    batch, the fused model's averaged over them with ``weights`` — the federated form). ``rounds``: Jacobi
    rounds (default: the number of sites, i.e. exact sequential REPAIR).
    """
    per_parent = isinstance(data, (list, tuple)) and len(data) == len(parents) and not (
        len(data) == 2 and isinstance(data[1], Tensor) and data[1].dtype == torch.long
    )  # fmt: skip
    batches = [_inputs(d) for d in data] if per_parent else [_inputs(data)] * len(parents)
    sites = repair_sites(model, spec, batches[0])
    if not sites:
        return model
    target = average_statistics([unit_statistics(p, b, sites) for p, b in zip(parents, batches, strict=True)], weights)
    own_batches = batches if per_parent else batches[:1]
    own_weights = weights if per_parent else None
    for _ in range(len(sites) if rounds is None else max(1, int(rounds))):
        fused = average_statistics([unit_statistics(model, b, sites) for b in own_batches], own_weights)
        model.load_state_dict(rescale_units(model.state_dict(), sites, fused, target))
    return model


@torch.no_grad()
def bn_statistics(model: nn.Module, data: Any) -> dict[str, Tensor]:
    """Every tracked BatchNorm's ``running_mean``/``running_var`` recomputed on ``data`` (model unchanged)."""
    net = reset_bn_stats(copy.deepcopy(model).eval(), _inputs(data))
    out = {}
    for n, m in net.named_modules():
        if isinstance(m, _BN) and m.track_running_stats:
            out[f"{n}.running_mean"] = m.running_mean.detach().clone()
            out[f"{n}.running_var"] = m.running_var.detach().clone()
    return out


def pool_bn_statistics(stats: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Clients' BN statistics pooled as the union's: ``μ = Σ λ_i μ_i``, ``v = Σ λ_i (v_i + μ_i²) − μ²``."""
    if not stats:
        raise ConfigError("pool_bn_statistics needs at least one client's statistics")
    lam = torch.as_tensor(list(weights), dtype=torch.float64)
    lam = lam / lam.sum()
    out: dict[str, Tensor] = {}
    for key in stats[0]:
        if not key.endswith(".running_mean"):
            continue
        var_key = key[: -len("mean")] + "var"
        mean = sum(float(w) * s[key].double() for w, s in zip(lam, stats, strict=True))
        second = sum(float(w) * (s[var_key].double() + s[key].double() ** 2) for w, s in zip(lam, stats, strict=True))
        out[key] = mean.float()  # type: ignore[union-attr]
        out[var_key] = (second - mean * mean).clamp_min(0.0).float()  # type: ignore[operator,union-attr]
    return out


STATS_BOUND = 10.0  # K: how far (× the clients' median scale) one client's statistics may reach
# the smallest site scale s: a std below it is numerical noise (BatchNorm adds eps = 1e-5 to every variance)
STATS_FLOOR = 1e-6


def bound_statistics(stats: Sequence[Mapping[str, Tensor]], k: float = STATS_BOUND) -> tuple[list[Stats], int]:
    """Clients' statistics with no unit beyond ``k ×`` the clients' scale; returns them and how many clients had a
    value bounded. Per unit ``c`` of a site, with ``(μ_m, σ_m)`` the clients' lower medians and ``s`` the larger
    of the median and the mean of ``σ_m`` over the site's units (at least :data:`STATS_FLOOR`):
    ``σ_i ≤ k (σ_m + s)`` and ``|μ_i − μ_m| ≤ k (σ_m + |μ_m| + s)`` (``s`` keeps a unit that is quiet on most
    clients' data but alive on a few — non-IID — inside, also at a site where most units are quiet on most
    clients, e.g. a deep ResNet block trained apart, whose median ``σ_m`` is 0). Works on unit statistics
    (``(2, C)`` per site: mean, std) and on BatchNorm statistics (``*.running_mean`` / ``*.running_var``, their
    std the variance's root). Values inside the bound are kept bit for bit."""
    out = [dict(s) for s in stats]
    if len(out) < 2:
        return out, 0
    hit = [False] * len(out)

    def median(values: list[Tensor]) -> Tensor:
        return torch.stack([v.double() for v in values]).sort(0).values[(len(values) - 1) // 2]

    def bounded(i: int, value: Tensor, low: Tensor, high: Tensor) -> Tensor:
        inside = torch.minimum(torch.maximum(value.double(), low), high)
        if bool((inside != value.double()).any()):
            hit[i] = True
            return inside.to(value.dtype)
        return value

    for key in (key for key in out[0] if not key.endswith(".running_var")):
        bn = key.endswith(".running_mean")
        var_key = key[: -len("mean")] + "var"
        means = [s[key] if bn else s[key][0] for s in out]
        stds = [s[var_key].clamp_min(0).sqrt() if bn else s[key][1] for s in out]
        mu_m, sd_m = median(means), median(stds)
        scale = sd_m + max(float(sd_m.median()), float(sd_m.mean()), STATS_FLOOR)
        reach, top = k * (scale + mu_m.abs()), k * scale
        for i, s in enumerate(out):
            mean = bounded(i, means[i], mu_m - reach, mu_m + reach)
            if bn:
                s[key], s[var_key] = mean, bounded(i, s[var_key], torch.zeros_like(top), top * top)
                continue
            std = bounded(i, stds[i], torch.zeros_like(top), top)
            if mean is not means[i] or std is not stds[i]:  # bounded() hands back the very tensor when inside
                s[key] = torch.stack([mean, std])
    return out, sum(hit)
