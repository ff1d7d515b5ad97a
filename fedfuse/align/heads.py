"""Attention heads as blocks: a head permutation on top of the within-head ones.

Permuting whole heads of a multi-head attention — q, k and v rows of head ``σ(h)`` moved to head ``h``'s place and
the output projection's columns with them — leaves the function unchanged, as do the permutations of units within
each head. A spec lists such head sets as :class:`~fedfuse.align.spec.Blocks`: slot ``k`` (q/k units, v units) has
one group per head. Solvers and :func:`~fedfuse.align.transport.apply_transport` then use the *merged view*
(:func:`merged_spec`): each slot's head groups become one group of ``Σ_h n_h`` units whose transport is
block-structured, ``T[h, σ(h)] = T_h`` (the within-head transport of the pair) and zero elsewhere; ``σ`` is shared
by the slots of a set. The view keeps every parameter axis: a run ``(g_0, …, g_{H-1})`` of the heads in a
concatenation (``Axis.segments``) becomes the one merged segment, so transports apply unchanged.

Two-level solvers (``H`` heads, slots ``k``):

* assignment (weight / activation matching, maximise): ``G[h, s] = Σ_k max_P ⟨P, S_k[h, s]⟩`` (one
  ``linear_sum_assignment`` per head pair and slot on the score's block), then ``σ = argmax_σ Σ_h G[h, σ(h)]``
  (one more over the ``H × H`` matrix): the best block-structured permutation for the scores;
* OT (minimise, uniform marginals): ``D[h, s] = Σ_k OT(C_k[h, s])``, the exact OT cost of the pair's cost block
  (one ``linear_sum_assignment`` for square blocks, ``ot.emd2`` else), the head plan ``P`` solves OT on ``D``
  (exact or entropic, as asked), and ``Π_k = Σ_{h,s} P[h, s] Π_k^{hs}`` with ``Π_k^{hs}`` the pair's plan (exact
  or entropic) placed in block ``(h, s)``: a coupling of the uniform measures again (each block has mass 1, ``P``
  has uniform marginals). Pairs whose head mass is below ``1e-9`` of the largest are left out (their share of a row
  is below float32 rounding); the exact pair costs keep the ``H²`` pairs cheap (an entropic solve of a mismatched
  pair's block converges slowly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fedfuse.align.spec import BLOCK_CHECKS, Blocks, Group, Site, TransportSpec
from fedfuse.errors import ConfigError

__all__ = [
    "block_sigma",
    "expressible_blocks",
    "head_assignment",
    "head_couplings",
    "head_sets",
    "merge_acts",
    "merged_names",
    "merged_spec",
    "random_transports",
    "to_merged",
]


class _Inexpressible(Exception):
    """Head set ``args[0]`` cannot be merged: a head group is not part of an ordered run of its slot's heads."""


def _rewrite(
    segments: tuple[str | int, ...], head_of: Mapping[str, tuple[int, int, int]], blocks: tuple[Blocks, ...]
) -> tuple[tuple[str | int, ...], dict[int, int]]:
    """``segments`` with every run of a slot's heads replaced by the slot's merged name; old → new index of each
    entry that stays (a run keeps its first index)."""
    new: list[str | int] = []
    where: dict[int, int] = {}
    i = 0
    while i < len(segments):
        hit = head_of.get(segments[i]) if isinstance(segments[i], str) else None  # type: ignore[arg-type]
        if hit is None:
            where[i] = len(new)
            new.append(segments[i])
            i += 1
            continue
        bi, k, h = hit
        slot = blocks[bi].heads[k]
        if h != 0 or tuple(segments[i : i + len(slot)]) != slot:
            raise _Inexpressible(bi)
        where[i] = len(new)
        new.append(blocks[bi].names[k])
        i += len(slot)
    return tuple(new), where


def _moved(x: Any, head_of: Mapping[str, tuple[int, int, int]], blocks: tuple[Blocks, ...]) -> Any:
    """An Axis/Site of the merged view (its segments rewritten; None if it is a head group's own whole axis)."""
    if x.segments is None:
        return x
    segs, where = _rewrite(x.segments, head_of, blocks)
    if x.index not in where:
        return None
    return replace(x, segments=segs if len(segs) > 1 else None, index=where[x.index] if len(segs) > 1 else 0)


def _signature(x: Any, offset: int) -> tuple[Any, ...]:
    return (*(getattr(x, f) for f in ("key", "node", "axis", "dim", "role", "repeat", "expand") if hasattr(x, f)),
            x.segments, x.index - offset)  # fmt: skip


def _build(spec: TransportSpec) -> TransportSpec:
    blocks = spec.blocks
    head_of = {
        g: (bi, k, h) for bi, b in enumerate(blocks) for k, slot in enumerate(b.heads) for h, g in enumerate(slot)
    }
    by_name = {g.name: g for g in spec.groups}
    groups: list[Group] = []
    heads: dict[str, tuple[int, ...]] = {}
    for g in spec.groups:
        hit = head_of.get(g.name)
        if hit is None:
            members = tuple(_moved(m, head_of, blocks) for m in g.members)  # its own index is never in a run
            groups.append(replace(g, members=members, sites=tuple(_moved(s, head_of, blocks) for s in g.sites)))
            continue
        bi, k, h = hit
        if h:
            continue
        slot = [by_name[n] for n in blocks[bi].heads[k]]
        for j, gh in enumerate(slot):  # every head indexes the same axes, at its place in the runs
            if any(m.segments is None for m in gh.members) or {_signature(m, j) for m in gh.members} != {
                _signature(m, 0) for m in slot[0].members
            }:
                raise _Inexpressible(bi)
            for m in gh.members:
                _rewrite(m.segments, head_of, blocks)  # type: ignore[arg-type]
        members = tuple(_moved(m, head_of, blocks) for m in g.members)
        sites: tuple[Site, ...] = ()  # activations where every head is read at its place in one run, else none
        if all(
            {_signature(s, j) for s in gh.sites} == {_signature(s, 0) for s in g.sites} for j, gh in enumerate(slot)
        ):
            try:
                sites = tuple(x for x in (_moved(s, head_of, blocks) for s in g.sites) if x is not None)
            except _Inexpressible:
                sites = ()
        name = blocks[bi].names[k]
        heads[name] = tuple(gh.size for gh in slot)
        groups.append(Group(name, sum(heads[name]), members, sites))
    return TransportSpec(tuple(groups), touched=spec.touched, blocks=blocks, merged_heads=heads)


def merged_spec(spec: TransportSpec) -> TransportSpec:
    """The merged view of ``spec`` (module docstring; ``spec`` itself when it has no head sets or is a view).
    ``spec`` must carry its state's widths (``for_state``). Cached on ``spec``."""
    if not spec.blocks or spec.merged_heads is not None:
        return spec
    if spec._merged is None:
        try:
            view = _build(spec)
        except _Inexpressible as exc:
            raise ConfigError(f"head blocks {spec.blocks[exc.args[0]].names} cannot be merged") from None
        object.__setattr__(spec, "_merged", view)
    return spec._merged


def expressible_blocks(spec: TransportSpec) -> TransportSpec:
    """``spec`` without the head sets the merged view cannot express (they stay within-head only)."""
    while spec.blocks:
        try:
            _build(spec)
            return spec
        except _Inexpressible as exc:
            keep = tuple(b for i, b in enumerate(spec.blocks) if i != exc.args[0])
            spec = TransportSpec(spec.groups, touched=spec.touched, blocks=keep)
    return spec


BLOCK_CHECKS.append(expressible_blocks)


def head_sets(view: TransportSpec) -> list[tuple[tuple[str, ...], list[tuple[int, ...]]]]:
    """``(merged names, per-slot head widths)`` of each head set of a merged view."""
    return [(b.names, [view.merged_heads[n] for n in b.names]) for b in view.blocks]


def to_merged(spec: TransportSpec, transports: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``transports`` keyed by the merged view: per-head entries of a slot become one block-diagonal transport
    (identity for heads not given). ``spec``: the per-head spec with its state's widths."""
    out = dict(transports)
    if not spec.blocks or spec.merged_heads is not None:
        return out
    sizes = spec.sizes
    for b in spec.blocks:
        for name, slot in zip(b.names, b.heads, strict=True):
            if not any(g in out for g in slot):
                continue
            if name in out:
                raise ConfigError(f"transports give both the merged head group {name!r} and some of its heads")
            mats = [out.pop(g).float() if g in out else torch.eye(sizes[g]) for g in slot]
            out[name] = torch.block_diag(*mats)
    return out


def _offsets(widths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)


def head_assignment(scores: Sequence[np.ndarray], heads: Sequence[Sequence[int]]) -> tuple[float, list[np.ndarray]]:
    """Block-structured permutations maximising ``Σ_k ⟨P_k, scores[k]⟩`` with one head permutation shared by the
    slots (module docstring); returns the value and, per slot, ``cols`` (target unit ``r`` takes source ``cols[r]``).
    Heads of unequal widths are never paired."""
    n_heads = len(heads[0])
    cost = np.zeros((n_heads, n_heads))
    inner: dict[tuple[int, int, int], np.ndarray] = {}
    for k, (sc, widths) in enumerate(zip(scores, heads, strict=True)):
        off = _offsets(widths)
        for h in range(n_heads):
            for s in range(n_heads):
                if widths[h] != widths[s]:
                    cost[h, s] = np.inf
                    continue
                blk = sc[off[h] : off[h + 1], off[s] : off[s + 1]]
                r, c = linear_sum_assignment(blk, maximize=True)
                cost[h, s] -= blk[r, c].sum()
                inner[k, h, s] = c + off[s]
    _, sigma = linear_sum_assignment(cost)
    cols = [np.concatenate([inner[k, h, s] for h, s in enumerate(sigma)]) for k in range(len(scores))]
    return -float(cost[np.arange(n_heads), sigma].sum()), cols


def head_couplings(
    costs: Sequence[np.ndarray],
    heads_a: Sequence[Sequence[int]],
    heads_b: Sequence[Sequence[int]],
    plan: Callable[[np.ndarray], np.ndarray],
) -> list[Tensor]:
    """Block-structured row-stochastic transports ``T_k = Π_k / Π_k·1`` per slot (module docstring); ``plan(C)``
    is the OT plan (total mass 1, uniform marginals) of a cost matrix."""
    n_heads = len(heads_a[0])
    d = np.zeros((n_heads, n_heads))
    offs = [(_offsets(wa), _offsets(wb)) for wa, wb in zip(heads_a, heads_b, strict=True)]
    for c, (oa, ob) in zip(costs, offs, strict=True):
        for h in range(n_heads):
            for s in range(n_heads):
                d[h, s] += _ot_cost(c[oa[h] : oa[h + 1], ob[s] : ob[s + 1]])
    p = plan(d)
    pairs = list(zip(*np.nonzero(p > 1e-9 * p.max()), strict=True))
    out = []
    for c, (oa, ob) in zip(costs, offs, strict=True):
        full = np.zeros(c.shape)
        for h, s in pairs:
            full[oa[h] : oa[h + 1], ob[s] : ob[s + 1]] = p[h, s] * plan(c[oa[h] : oa[h + 1], ob[s] : ob[s + 1]])
        out.append(torch.from_numpy(full / np.maximum(full.sum(1, keepdims=True), 1e-300)).float())
    return out


def _ot_cost(c: np.ndarray) -> float:
    """Exact OT cost between uniform measures: for a square ``c`` the best assignment's mean cost (an optimal plan
    is a permutation / n, Birkhoff), one ``linear_sum_assignment``; else ``ot.emd2``."""
    if c.shape[0] == c.shape[1]:
        rows, cols = linear_sum_assignment(c)
        return float(c[rows, cols].mean())
    a, b = np.full(c.shape[0], 1.0 / c.shape[0]), np.full(c.shape[1], 1.0 / c.shape[1])
    return float(ot.emd2(a, b, c, numItermax=1_000_000))


def block_sigma(cols: Tensor | np.ndarray, widths: Sequence[int]) -> np.ndarray | None:
    """``σ`` when the permutation ``cols`` (target ``r`` ← source ``cols[r]``) maps each head block onto one whole
    source head block, else None."""
    off = _offsets(widths)
    cols = np.asarray(cols)
    head = np.searchsorted(off, cols, side="right") - 1  # source head of each target unit
    sigma = head[off[:-1]]
    for h, (lo, hi) in enumerate(zip(off[:-1], off[1:], strict=True)):
        if (head[lo:hi] != sigma[h]).any() or widths[sigma[h]] != hi - lo:
            return None
    return sigma if len(set(sigma.tolist())) == len(sigma) else None


def random_transports(spec: TransportSpec, gen: torch.Generator) -> dict[str, Tensor]:
    """A seeded random permutation of every group, and (after those draws, so a spec without head sets draws what
    it always drew) of the heads of every head set as blocks: what the gate and ``permute_model`` apply.
    ``spec``: a per-head spec with its state's widths."""
    perms = {g.name: torch.eye(g.size)[torch.randperm(g.size, generator=gen)] for g in spec.groups}
    if not spec.blocks:
        return perms
    perms = to_merged(spec, perms)
    sizes = spec.sizes
    for b in spec.blocks:
        sigma = torch.randperm(len(b.heads[0]), generator=gen)
        for name, slot in zip(b.names, b.heads, strict=True):
            widths = [sizes[g] for g in slot]
            if len(set(widths)) == 1:
                perms[name] = shuffle_heads(perms[name], sigma.numpy(), widths)
    return perms


def shuffle_heads(t: Tensor, sigma: np.ndarray, widths: Sequence[int]) -> Tensor:
    """A block-diagonal transport (target head ``h`` ← source head ``h``) re-pointed so that target head ``h``
    takes source head ``σ(h)`` (equal widths)."""
    off = _offsets(widths)
    cols = torch.empty(t.shape[1], dtype=torch.int64)
    for h, s in enumerate(sigma):
        cols[off[s] : off[s + 1]] = torch.arange(off[h], off[h + 1])
    return t[:, cols]


def merged_names(spec: TransportSpec, names: Iterable[str]) -> set[str]:
    """``names`` in the merged view: a head group, or a merged group, stands for every merged group of its set (the
    set shares one head permutation: frozen together)."""
    out = set(names)
    for b in spec.blocks:
        if out & {*b.names, *(g for slot in b.heads for g in slot)}:
            out -= {g for slot in b.heads for g in slot}
            out |= set(b.names)
    return out


def merge_acts(spec: TransportSpec, acts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-group activations ``(n, samples)`` keyed by the merged view: a slot's heads stacked in head order (a slot
    with a head unobserved is left out)."""
    out = dict(acts)
    for b in spec.blocks:
        for name, slot in zip(b.names, b.heads, strict=True):
            parts = [out.pop(g, None) for g in slot]
            if all(p is not None for p in parts):
                out[name] = torch.cat(parts, 0)  # type: ignore[arg-type]
    return out
