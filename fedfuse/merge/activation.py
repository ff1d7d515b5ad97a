"""``fuse(method="cca" | "zip", data=batch)``: fusion by activation statistics (the entry point fuse() calls).

Fold BatchNorms (:func:`fedfuse.merge.linear.folded_parents`), read every parent's group activations on ``data``,
build each parent's linear maps (:mod:`.cca` / :mod:`.zip`), λ-average the mapped parents, unfold the fused
model onto its own statistics. Also returns every parent written in the fused model's coordinates (what
REPAIR compares the fused model with), in folded form (BN = identity + shift: the same eval function).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fedfuse.align.spec import TransportSpec
from fedfuse.errors import ConfigError
from fedfuse.merge.cca import DEFAULT_REG, cca_maps
from fedfuse.merge.linear import apply_maps, folded_parents, group_activations, unfold_measured
from fedfuse.merge.zip import zip_maps
from fedfuse.state import weighted_average

__all__ = ["ACTIVATION_METHODS", "merge_by_activations"]

ACTIVATION_METHODS = ("cca", "zip")


def _inputs(data: object) -> Tensor:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        data = data[0]
    if not isinstance(data, Tensor) or data.dim() < 2 or len(data) < 2:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ConfigError(f"data= must be a batch of at least 2 inputs (a tensor N×…), got {shape}")
    return data if data.dtype in (torch.int64, torch.int32) else data.float()  # token ids stay integers


def _fill_empty(state: dict[str, Tensor], fused: Mapping[str, Tensor], spec: TransportSpec, empty: dict) -> None:
    """Rows of merged features a parent has no member in take the fused model's rows (plain axes only)."""
    for g in spec.groups:
        idx = empty.get(g.name)
        if idx is None or not idx.numel():
            continue
        for m in g.members:
            if m.role == "out" and m.repeat == 1 and m.expand == 1 and m.segments is None:
                state[m.key] = state[m.key].index_copy(m.axis, idx, fused[m.key].index_select(m.axis, idx))


@torch.no_grad()
def merge_by_activations(
    method: str,
    states: Sequence[Mapping[str, Tensor]],
    lam: Sequence[float],
    spec: TransportSpec,
    module: nn.Module,
    data: object,
    ref: int,
    *,
    reg: float = DEFAULT_REG,
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """(fused state, parents in the fused coordinates; folded) for ``method`` in :data:`ACTIVATION_METHODS`."""
    if method not in ACTIVATION_METHODS:
        raise ConfigError(f"method={method!r} is not an activation method; allowed: {', '.join(ACTIVATION_METHODS)}")
    if module is None:
        raise ConfigError(f"method={method!r} runs the models on data: pass template= (an nn.Module)")
    x = _inputs(data)
    try:
        module(x[:2])
    except Exception as exc:  # any layer may fail on a wrong shape
        raise ConfigError(f"method={method!r}: the model cannot run on data of shape {tuple(x.shape)} ({exc})") from exc
    folded, pairs, frozen = folded_parents(method, states, spec, module, x[:2])
    acts = group_activations(method, states, spec, module, x)
    if method == "cca":
        maps = cca_maps(acts, ref, reg)
        aligned = [apply_maps(s, spec, mp, frozen) for s, mp in zip(folded, maps, strict=True)]
        fused = weighted_average(aligned, list(lam), ref=ref)
    else:
        fuse_maps, own_maps, empty = zip_maps(acts, lam, ref)
        fused = weighted_average(
            [apply_maps(s, spec, mp, frozen) for s, mp in zip(folded, fuse_maps, strict=True)], list(lam), ref=ref
        )
        aligned = []
        for i, (s, mp) in enumerate(zip(folded, own_maps, strict=True)):
            a = apply_maps(s, spec, mp, frozen)
            _fill_empty(a, fused, spec, {g: e[i] for g, e in empty.items()})
            aligned.append(a)
    return unfold_measured(fused, pairs, module, x), aligned
