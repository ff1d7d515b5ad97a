"""Merging by linear maps between hidden units (beyond permutations): the machinery CCA Merge and zipping share.

A method gives, per model ``i`` and hidden group ``g``, an *out-side* matrix ``O`` (``n × n_i``: merged unit ``c``
is ``Σ_f O[c, f]·unit_f``) and an *in-side* matrix ``S`` (``n × n_i``: a consumer's columns ``W ← W Sᵀ``). Unlike a
transport (:mod:`fedfuse.align.transport`) ``S`` is not derived from ``O``: CCA Merge uses ``O = M`` and
``S = M⁻ᵀ`` (so ``W_next M⁻¹ · M h = W_next h``), zipping an averaging ``O`` and a summing ``S``. The map is exact
between linear layers and approximate through ReLU/pooling (``M·relu(z) ≈ relu(M z)``), as in both papers.

BatchNorm: every BatchNorm must follow a Linear/Conv (the usual ``conv → BN → ReLU``); it is folded into that
producer first (:func:`fedfuse.align.bn.fold_bn`: per unit an affine map, BN left as identity + shift), so the
shift moves like a bias and the BN's constant γ = 1, μ = 0, σ² = 1 − ε are not mapped. The fused model is
unfolded onto its own statistics (:func:`unfold_measured`): same eval function, BN running statistics equal to the
fused units' statistics on the data. Other norms (LayerNorm, GroupNorm) do not commute with a linear map
of their units and are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.align.bn import fold_bn, fold_pairs
from fedfuse.align.solvers import capture_activations
from fedfuse.align.spec import TransportSpec
from fedfuse.align.transport import load_state, transport_axis
from fedfuse.errors import ConfigError

__all__ = ["Maps", "apply_maps", "folded_parents", "group_activations", "linear_units", "unfold_measured"]

Maps = dict[str, tuple[Tensor, Tensor]]  # group -> (out-side O, in-side S), both n × n_i
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm


def apply_maps(
    state: Mapping[str, Tensor], spec: TransportSpec, maps: Maps, frozen: frozenset[str] = frozenset()
) -> dict[str, Tensor]:
    """``state`` with every group's ``out`` axes contracted with ``O`` and ``in`` axes with ``S`` (``frozen`` keys
    kept as they are: a folded BatchNorm's constants)."""
    spec = spec.for_state(dict(state))
    sizes = spec.sizes
    out: dict[str, Tensor] = {}
    for key, w in state.items():
        if key in frozen or not torch.is_floating_point(w):
            out[key] = w.clone()
            continue
        per_axis: dict[int, list[tuple[Any, Tensor | None]]] = {}
        for g, ax in spec.members_of(key):
            pair = maps.get(g.name)
            per_axis.setdefault(ax.axis, []).append((ax, None if pair is None else pair[0 if ax.role == "out" else 1]))
        for axis, members in per_axis.items():
            w = transport_axis(w, axis, members, sizes)
        out[key] = w.contiguous()
    return out


def linear_units(
    method: str, spec: TransportSpec, module: nn.Module, example: Tensor
) -> tuple[list[tuple[str, str, float]], frozenset[str]]:
    """The fold pairs of ``module`` and the keys never mapped (a folded BatchNorm's constant γ, μ, σ²).

    Refuses (one line) a group unit owned by anything but a Linear/Conv or a foldable BatchNorm: run it on the
    architecture before any training (it reads no weights)."""
    pairs = fold_pairs(module, example)
    folded_bn = {bn for _, bn, _ in pairs}
    modules = dict(module.named_modules())
    frozen = set()
    for g in spec.groups:
        for m in g.members:
            if m.role != "out":
                continue
            owner, _, leaf = m.key.rpartition(".")
            mod = modules.get(owner)
            if owner in folded_bn:
                if leaf in ("weight", "running_mean", "running_var"):
                    frozen.add(m.key)
            elif not isinstance(mod, _PRODUCERS):
                kind = type(mod).__name__ if mod is not None else "a bare parameter"
                raise ConfigError(
                    f"method={method!r} maps hidden units linearly and supports Linear/Conv units with an optional "
                    f"BatchNorm right after them; {m.key!r} belongs to {kind}"
                )
    return pairs, frozenset(frozen)


def folded_parents(
    method: str, states: Sequence[Mapping[str, Tensor]], spec: TransportSpec, module: nn.Module, example: Tensor
) -> tuple[list[dict[str, Tensor]], list[tuple[str, str, float]], frozenset[str]]:
    """Parents with every BatchNorm folded into its producer, the fold pairs, and the keys never mapped
    (:func:`linear_units`, which refuses a unit no linear map can carry)."""
    pairs, frozen = linear_units(method, spec, module, example)
    return [fold_bn(dict(s), pairs) for s in states], pairs, frozen


@torch.no_grad()
def group_activations(
    method: str, states: Sequence[Mapping[str, Tensor]], spec: TransportSpec, module: nn.Module, data: Tensor
) -> list[dict[str, Tensor]]:
    """Per parent, ``{group: (n, samples)}`` activations at each group's consumers on ``data`` (eval mode)."""
    acts = []
    for s in states:
        net = load_state(copy.deepcopy(module), dict(s)).eval()
        a = capture_activations(net, spec, data)
        missing = [g.name for g in spec.groups if g.name not in a]
        if missing:
            raise ConfigError(f"method={method!r} needs every group's activations; none observable for {missing[:5]}")
        acts.append(a)
    return acts


@torch.no_grad()
def unfold_measured(
    state: Mapping[str, Tensor], pairs: list[tuple[str, str, float]], module: nn.Module, data: Tensor
) -> dict[str, Tensor]:
    """A folded state (BN = identity + shift ``b'``) written back as producer + BN whose running statistics are the
    producer outputs' own mean ``m`` and variance ``v`` on ``data``: ``γ = √(v + ε)``, ``β = m + b'`` — the same
    function in eval mode, and in train mode BatchNorm's batch statistics ≈ ``(m, v)`` leave it close to it."""
    if not pairs:
        return dict(state)
    net = load_state(copy.deepcopy(module), dict(state)).eval()
    mods = dict(net.named_modules())
    stats: dict[str, list[Tensor]] = {}

    def hook(name: str) -> Any:
        def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().double().movedim(1, 0).reshape(args[0].shape[1], -1)
            stats.setdefault(name, []).append(
                torch.stack([x.sum(1), (x * x).sum(1), torch.full_like(x[:, 0], x.shape[1])])
            )

        return record

    handles = [mods[bn].register_forward_pre_hook(hook(bn)) for _, bn, _ in pairs]
    try:
        net(data)  # eval mode: every folded BN is the identity + shift, so each sees the fused producer's output
    finally:
        for h in handles:
            h.remove()
    out = dict(state)
    for _, bn, eps in pairs:
        s, s2, n = torch.stack(stats[bn]).sum(0)
        m = s / n
        v = (s2 / n - m * m).clamp_min(0.0)
        dt = state[f"{bn}.weight"].dtype
        out[f"{bn}.running_mean"], out[f"{bn}.running_var"] = m.to(dt), v.to(dt)
        out[f"{bn}.weight"] = (v + eps).sqrt().to(dt)
        out[f"{bn}.bias"] = (m + state[f"{bn}.bias"].double()).to(dt)
    return out
