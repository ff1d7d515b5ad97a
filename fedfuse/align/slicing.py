"""HeteroFL's sub-model slicing and masked averaging (Diao et al. 2021), driven by a transport spec.

A client of a narrower width holds the *top-left* sub-model of the global one: the first ``k_g`` units of
every hidden group ``g`` (:class:`~fedfuse.align.spec.TransportSpec`), on every axis the group indexes —
weight rows and columns, biases, norm vectors, each gate block of an RNN, each channel's spatial block after
a flatten, our segment of a concatenation. Slicing is the transport by the selection matrix
``E_g = I_{n_g}[:k_g]`` (``k_g × n_g``), embedding back the transport by ``E_gᵀ`` (zero outside the
sub-model); both go through :func:`~fedfuse.align.transport.apply_transport`, so every axis layout the spec
describes is handled once, there. (Out axes: ``E W`` keeps the first rows; in axes: ``S = E / 1ᵀE = E``,
``W Eᵀ`` keeps the first columns; ``Eᵀ`` likewise pads with zeros.)

Masked averaging: with ``e_i = embed(θ_i)`` and ``m_i = embed(1)`` (1 where client i's sub-model holds the
entry), ``θ = Σ_i λ_i e_i / Σ_i λ_i m_i`` entry-wise, λ_i = n_i / Σ n_j; an entry no client holds keeps its
previous global value. With equal full widths this is FedAvg. (The official HeteroFL code averages by
client count; ``weights=None`` gives that, the strategy passes the examples counts as FedAvg does.)

*(our reading)*: HeteroFL's ``Scaler`` (activations × 1/r while training) and static BatchNorm are model
changes, not part of the aggregation; they are left out here — BatchNorm running statistics are sliced and
masked-averaged like every other entry, integer buffers (``num_batches_tracked``) keep the global value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedfuse.align.spec import TransportSpec
from fedfuse.align.transport import apply_transport
from fedfuse.errors import ConfigError
from fedfuse.state import normalise_weights

__all__ = ["slice_state", "embed_state", "holds_mask", "masked_average"]

State = dict[str, Tensor]


def _selections(from_sizes: Mapping[str, int], to_sizes: Mapping[str, int]) -> dict[str, Tensor]:
    """Per group whose width changes, ``I[:k]`` (narrowing ``n → k``) or ``I[:, :k]`` (widening ``k → n``)."""
    out = {}
    for name, n in from_sizes.items():
        k = int(to_sizes.get(name, n))
        if k == n:
            continue
        out[name] = torch.eye(n, dtype=torch.float64)[:k] if k < n else torch.eye(k, dtype=torch.float64)[:, :n]
    return out


def _check_sizes(spec: TransportSpec, sizes: Mapping[str, int], full: Mapping[str, int]) -> None:
    unknown = set(sizes) - set(full)
    if unknown:
        raise ConfigError(f"unknown transport groups {sorted(unknown)}; groups are {spec.names}")
    for name, k in sizes.items():
        if not 1 <= int(k) <= full[name]:
            raise ConfigError(f"sub-model width {k} for group {name!r} is out of range; allowed: 1..{full[name]}")


def slice_state(state: Mapping[str, Tensor], spec: TransportSpec, sizes: Mapping[str, int]) -> State:
    """The top-left sub-model of ``state``: the first ``sizes[g]`` units of every group ``g`` (missing: all)."""
    spec = spec.for_state(dict(state))
    _check_sizes(spec, sizes, spec.sizes)
    return apply_transport(state, spec, _selections(spec.sizes, sizes))


def embed_state(sub: Mapping[str, Tensor], spec: TransportSpec, sizes: Mapping[str, int]) -> State:
    """``sub`` placed top-left into a model of group widths ``sizes``, zero elsewhere (inverse of slicing on
    the sub-model's entries)."""
    spec = spec.for_state(dict(sub))
    _check_sizes(spec, spec.sizes, {**spec.sizes, **{n: int(k) for n, k in sizes.items()}})
    return apply_transport(sub, spec, _selections(spec.sizes, sizes))


def holds_mask(sub: Mapping[str, Tensor], spec: TransportSpec, sizes: Mapping[str, int]) -> State:
    """1 where a global model of widths ``sizes`` has an entry the sub-model ``sub`` holds, else 0."""
    ones = {k: torch.ones_like(v) if torch.is_floating_point(v) else v for k, v in sub.items()}
    return embed_state(ones, spec, sizes)


def masked_average(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None,
    spec: TransportSpec,
    global_state: Mapping[str, Tensor],
) -> State:
    """HeteroFL's aggregation: each global entry the λ-weighted average over the sub-models that hold it.

    ``θ[e] = Σ_i λ_i θ_i[e] / Σ_{i holds e} λ_i`` (accumulated in float64, cast to the global dtype); entries
    no state holds keep ``global_state``'s value, as do integer buffers. ``states`` are top-left sub-models
    (any widths ≤ the global ones) of ``global_state``'s architecture.
    """
    if not states:
        raise ConfigError("masked_average needs at least one state dict")
    lam = normalise_weights(weights, len(states))
    spec = spec.for_state(dict(global_state))
    full = spec.sizes
    num = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items() if torch.is_floating_point(v)}
    den = {k: torch.zeros_like(v) for k, v in num.items()}
    for i, (s, w) in enumerate(zip(states, lam, strict=True)):
        if set(s) != set(global_state):
            raise ConfigError(f"state {i} has other keys than the global model: {sorted(set(s) ^ set(global_state))}")
        sub_spec = spec.for_state(dict(s))
        _check_sizes(sub_spec, sub_spec.sizes, full)
        wide = embed_state({k: v.double() if torch.is_floating_point(v) else v for k, v in s.items()}, sub_spec, full)
        mask = holds_mask(s, sub_spec, full)
        for k in num:
            if wide[k].shape != num[k].shape:
                raise ConfigError(f"state {i}: {k!r} has shape {tuple(s[k].shape)}, not a sub-tensor of the global")
            num[k] += wide[k].double() * w
            den[k] += mask[k].double() * w
    out: State = {}
    for k, v in global_state.items():
        if k not in num:
            out[k] = v.detach().clone()
            continue
        held = den[k] > 0
        avg = torch.where(held, num[k] / den[k].clamp_min(1e-300), v.detach().double())
        out[k] = avg.to(v.dtype)
    return out
