"""Layer-wise and cumulative barriers: interpolate one group of state-dict keys (or a growing set of them).

Layer-wise: interpolate one group only, the rest from A (and, separately, from B); the reference line stays
the full models' (as in Adilova et al.'s code), so a single-layer B_mid near 0 means "averaging this layer alone
costs nothing". Cumulative: grow the interpolated set one group at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.lmc.curves import BarrierStats, _curve, _reference_of, barrier_stats
from fedfuse.selection import matches

__all__ = [
    "GroupBarrier",
    "LayerwiseResult",
    "CumulativeStep",
    "CumulativeResult",
    "ORDERS",
    "layer_groups",
    "layerwise_barriers",
    "cumulative_barriers",
]

State = Mapping[str, torch.Tensor]
ORDERS = ("shallow", "deep", "random")


# --------------------------------------------------------------------------- results


@dataclass
class GroupBarrier:
    """Layer-wise barriers of one group: only ``keys`` interpolated, the rest held at A (``base_a``) or B."""

    group: str
    keys: list[str]
    base_a: BarrierStats
    base_b: BarrierStats


@dataclass
class LayerwiseResult:
    """One :class:`GroupBarrier` per group, plus the full-model barrier for reference."""

    groups: list[GroupBarrier]
    full: BarrierStats


@dataclass
class CumulativeStep:
    """Barriers after adding group ``added``; ``groups`` is the whole interpolated set so far."""

    added: str
    groups: list[str]
    stats: BarrierStats


@dataclass
class CumulativeResult:
    """Cumulative barriers in one ``order``; the last step equals ``full`` when the groups cover every float key."""

    order: str
    seed: int
    steps: list[CumulativeStep]
    full: BarrierStats


# --------------------------------------------------------------------------- layer groups


def _is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.modules.conv._ConvNd)


def layer_groups(
    model: nn.Module, patterns: Mapping[str, str | Sequence[str]] | Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Partition the state-dict keys of ``model`` into named groups, in registration (≈ shallow→deep) order.

    Default: one group per module owning parameters/buffers, named after the module; a BatchNorm joins the
    group of the Conv/Linear registered right before it. With ``patterns`` (a list of globs in the grammar of
    :func:`fedfuse.selection.matches`, each its own group, or a mapping name → glob(s)), a key goes to the first
    group whose pattern matches it; keys matching nothing belong to no group.
    """
    state_keys = list(model.state_dict().keys())
    if patterns is not None:
        if isinstance(patterns, Mapping):
            items = [(str(n), [p] if isinstance(p, str) else list(p)) for n, p in patterns.items()]
        else:
            items = [(str(p), [str(p)]) for p in patterns]
        groups: dict[str, list[str]] = {name: [] for name, _ in items}
        for key in state_keys:
            for name, pats in items:
                if any(matches(key, p) for p in pats):
                    groups[name].append(key)
                    break
        empty = [name for name, keys in groups.items() if not keys]
        if empty:
            raise ConfigError(f"layer group patterns match no state-dict key: {empty}")
        return groups

    known = set(state_keys)
    groups = {}
    owner: dict[str, str] = {}
    pair_with: str | None = None  # the group a following BatchNorm joins
    for name, module in model.named_modules():
        own = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        keys = [f"{name}.{n}" if name else n for n, _ in own]
        keys = [k for k in keys if k in known]
        if not keys:
            continue
        group = name or "model"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and pair_with is not None:
            group, pair_with = pair_with, None
        else:
            pair_with = group if _is_weight_layer(module) else None
        groups.setdefault(group, []).extend(keys)
        owner.update(dict.fromkeys(keys, group))
    for key in state_keys:  # entries no module enumerates (e.g. extra state) go to their module's group
        if key not in owner:
            groups.setdefault(key.rsplit(".", 1)[0] if "." in key else "model", []).append(key)
    return groups


def _resolve_groups(model: nn.Module, groups: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    resolved = layer_groups(model) if groups is None else {str(k): list(v) for k, v in groups.items()}
    if not resolved:
        raise ConfigError("no layer groups to evaluate")
    return resolved


def layerwise_barriers(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Mapping[str, Sequence[str]] | None = None,
    num_points: int = 11,
    bn_reset_data: torch.Tensor | None = None,
) -> LayerwiseResult:
    """For each group G: barriers of θ_G(α) = (1 − α)θA_G + αθB_G with every other entry from A (``base_a``)
    and, separately, from B (``base_b``), against the full models' line (1 − α)L(θA) + αL(θB).
    ``groups`` defaults to :func:`layer_groups`."""
    resolved = _resolve_groups(model, groups)
    full = _curve(model, state_a, state_b, x, y, num_points, None, "a", bn_reset_data, None)
    ref = _reference_of(full)
    rows = []
    for name, keys in resolved.items():
        per_base = [
            barrier_stats(_curve(model, state_a, state_b, x, y, num_points, keys, b, bn_reset_data, ref))
            for b in ("a", "b")
        ]
        rows.append(GroupBarrier(name, list(keys), per_base[0], per_base[1]))
    return LayerwiseResult(rows, barrier_stats(full))


def cumulative_barriers(
    model: nn.Module,
    state_a: State,
    state_b: State,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: Mapping[str, Sequence[str]] | None = None,
    order: Literal["shallow", "deep", "random"] = "shallow",
    seed: int = 0,
    num_points: int = 11,
    bn_reset_data: torch.Tensor | None = None,
) -> CumulativeResult:
    """Grow the interpolated set S one group at a time (others from A) and record the barrier of θ_S(α) after
    each addition. ``order``: ``"shallow"`` (registration order), ``"deep"`` (reversed) or ``"random"``
    (a permutation from ``seed``). When the groups cover every float key the last step is the full barrier."""
    if order not in ORDERS:
        raise ConfigError(f"order={order!r} is not supported; allowed: {', '.join(ORDERS)}")
    resolved = _resolve_groups(model, groups)
    names = list(resolved)
    if order == "deep":
        names.reverse()
    elif order == "random":
        names = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    full = _curve(model, state_a, state_b, x, y, num_points, None, "a", bn_reset_data, None)
    ref = _reference_of(full)
    steps: list[CumulativeStep] = []
    keys: list[str] = []
    for i, name in enumerate(names):
        keys.extend(resolved[name])
        curve = _curve(model, state_a, state_b, x, y, num_points, keys, "a", bn_reset_data, ref)
        steps.append(CumulativeStep(name, names[: i + 1], barrier_stats(curve)))
    return CumulativeResult(order, int(seed), steps, barrier_stats(full))
