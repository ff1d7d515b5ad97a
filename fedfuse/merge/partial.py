"""Partial zipping (ZipIt!, Stoica et al., ICLR 2024, "partial zipping"): zip the first layers, keep the last
``k`` hidden groups of every model apart as a small multi-head ensemble.

The first ``G − k`` groups are zipped as in :mod:`fedfuse.merge.zip` (the *trunk*: one set of weights); every model
keeps its own layers from there on (its *head*), reading the trunk's merged features through its unmerge ``S_i``
(a consumer's columns of the members of a merged feature summed). The output is the λ-average of the heads'
logits. ``k = 0`` is full zipping (one head: the fused model); ``k = G`` zips nothing (the heads are the parents:
the logit ensemble). The result is not a state dict of the template but a :class:`MultiHead` module: one copy of
the template per model whose trunk weights are equal (stored once in :func:`multihead_bytes`; recomputed per copy in
``forward``, so inference costs N trunks — graph surgery to share the computation is left out).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.align.solvers import resolve_spec
from fedfuse.align.transport import load_state, state_of
from fedfuse.errors import ConfigError
from fedfuse.merge.activation import _inputs
from fedfuse.merge.linear import apply_maps, folded_parents, group_activations, unfold_measured
from fedfuse.merge.zip import zip_maps
from fedfuse.state import normalise_weights, weighted_average

__all__ = ["MultiHead", "partial_zip", "multihead_bytes"]


class MultiHead(nn.Module):
    """``Σ_i λ_i copy_i(x)``: the models of a partial zip (trunk weights equal across copies)."""

    def __init__(self, copies: Sequence[nn.Module], weights: Sequence[float], trunk: Sequence[str] = ()) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copies)
        self.register_buffer("lam", torch.tensor(list(weights), dtype=torch.float32))
        self.trunk = tuple(trunk)  # state keys shared by every copy

    def forward(self, x: Tensor) -> Tensor:
        out = None
        for w, m in zip(self.lam, self.copies, strict=True):
            z = w * m(x)
            out = z if out is None else out + z
        return out  # type: ignore[return-value]


def multihead_bytes(model: MultiHead) -> int:
    """Bytes of the distinct parameters and buffers: the trunk once, every head."""
    total = 0
    for i, m in enumerate(model.copies):
        for k, v in m.state_dict().items():
            if i == 0 or k not in model.trunk:
                total += v.numel() * v.element_size()
    return total


@torch.no_grad()
def partial_zip(
    models: Sequence[nn.Module | Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    template: nn.Module,
    data: Any,
    keep_last: int = 1,
    init: int | None = None,
) -> MultiHead:
    """Zip all but the last ``keep_last`` hidden groups; every model keeps its own layers after them (see module)."""
    if not isinstance(template, nn.Module):
        raise ConfigError("partial_zip needs template= (an nn.Module of the models' architecture)")
    x = _inputs(data)
    states = [state_of(m) for m in models]
    if len(states) < 1:
        raise ConfigError("partial_zip needs at least one model")
    lam = normalise_weights(weights, len(states))
    ref = int(torch.tensor(lam).argmax()) if init is None else int(init)
    try:
        template(x[:2])
    except Exception as exc:  # any layer may fail on a wrong shape
        raise ConfigError(f"partial_zip: the model cannot run on data of shape {tuple(x.shape)} ({exc})") from exc
    spec = resolve_spec(None, template, x[:2])
    from fedfuse.align.fusion import _check_states

    _check_states(states, same_shapes=True, method="zip")
    names = spec.names
    if not 0 <= int(keep_last) <= len(names):
        raise ConfigError(f"keep_last={keep_last} is out of range; allowed: 0..{len(names)} (the hidden groups)")
    zipped = names[: len(names) - int(keep_last)]
    folded, pairs, frozen = folded_parents("zip", states, spec, template, x[:2])
    acts = group_activations("zip", states, spec, template, x)
    acts = [{g: a[g] for g in zipped} for a in acts]
    fuse_maps, own_maps, _ = zip_maps(acts, lam, ref) if zipped else ([{} for _ in states], [{} for _ in states], {})
    trunk_keys = {m.key for g in spec.groups if g.name in zipped for m in g.members if m.role == "out"}
    trunk = weighted_average([apply_maps(s, spec, fm, frozen) for s, fm in zip(folded, fuse_maps, strict=True)], lam)
    copies = []
    for s, om in zip(folded, own_maps, strict=True):
        own = apply_maps(s, spec, om, frozen)  # head keys: only their columns of zipped groups move (unmerge S_i)
        state = {k: (trunk[k] if k in trunk_keys else own[k]) for k in s}
        copies.append(load_state(copy.deepcopy(template), unfold_measured(state, pairs, template, x)).eval())
    if not zipped:  # nothing zipped: the copies are the parents themselves (unfolded onto their own statistics)
        trunk_keys = set()
    return MultiHead(copies, lam, sorted(trunk_keys)).eval()
