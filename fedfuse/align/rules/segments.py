"""Splitting a group into consecutive parts, for element-wise joins of differently segmented tensors.

CIFAR ResNet-20 with option-A shortcuts adds ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, c/2, c/2))`` to a block's
output: its ``2c`` channels read ``(c/2 structurally zero units, the c input units, c/2 zero units)``. The block's
output group (one group of ``2c``) must then move as three parts: the middle joins the shortcut's units, each
zero segment may permute among itself (zeros permuted are zeros). :func:`refine` splits whole groups so both
operands of a join have the same segment widths; the parts replace the group everywhere (members, sites, later
layouts), so every member of a split group becomes one member per part with ``segments``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedfuse.align.rules.core import FIXED_ID, Layout, Stacked

__all__ = ["cut_at", "expand_layout", "expand_segs", "refine", "split"]


def split(d: Any, gid: int, widths: list[int]) -> tuple[tuple[int, int], ...] | None:
    """Group ``gid`` as consecutive parts of ``widths`` (new groups; the parts of its root if already split
    the same way); None if it cannot (already split otherwise, or fixed)."""
    r = d.find(gid)
    if r == FIXED_ID:
        return tuple((FIXED_ID, w) for w in widths)
    if r in d.parts:
        have = d.parts[r]
        return have if [n for _, n in have] == list(widths) else None
    if sum(widths) != d.sizes[r]:
        return None
    d.parts[r] = tuple((d.new_group(f"{d.names[r]}.part{i}", w), w) for i, w in enumerate(widths))
    return d.parts[r]


def expand_segs(d: Any, segs: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """``segs`` with every split group replaced by its parts (recursively)."""
    out: list[tuple[int, int]] = []
    for g, n in segs:
        r = d.find(g)
        if r != FIXED_ID and r in d.parts:
            out.extend(expand_segs(d, d.parts[r]))
        else:
            out.append((g, n))
    return tuple(out)


def expand_layout(d: Any, lay: Any) -> Any:
    """A layout with split groups replaced by their parts."""
    if not d.parts:
        return lay
    if isinstance(lay, Layout):
        segs = expand_segs(d, lay.segs)
        return lay if segs == lay.segs else Layout(lay.dim, segs, lay.expand)
    if isinstance(lay, Stacked):
        return Stacked(tuple(expand_layout(d, x) for x in lay.items))
    if isinstance(lay, tuple):
        return tuple(expand_layout(d, x) for x in lay)
    if isinstance(lay, list):
        return [expand_layout(d, x) for x in lay]
    return lay


def refine(d: Any, la: Layout, lb: Layout) -> tuple[Layout, Layout] | None:
    """``la``, ``lb`` (same block width) re-cut at the union of their segment boundaries; None if a group to cut
    cannot be split."""
    bounds = set()
    for lay in (la, lb):
        pos = 0
        for _, n in lay.segs:
            pos += n
            bounds.add(pos)
    ca, cb = cut_at(d, la, bounds), cut_at(d, lb, bounds)
    return None if ca is None or cb is None else (ca, cb)


def cut_at(d: Any, lay: Layout, cuts: Iterable[int]) -> Layout | None:
    """``lay`` with every group that a position in ``cuts`` (offsets along the block) falls inside split into
    consecutive parts there (:func:`split`); None if such a group cannot be split."""
    cuts = sorted(set(cuts))
    segs: list[tuple[int, int]] = []
    pos = 0
    for g, n in lay.segs:
        ends = [c for c in cuts if pos < c < pos + n] + [pos + n]
        if len(ends) == 1:
            segs.append((g, n))
        else:
            parts = split(d, g, [b - a for a, b in zip([pos, *ends[:-1]], ends, strict=True)])
            if parts is None:
                return None
            segs.extend(parts)
        pos += n
    return Layout(lay.dim, tuple(segs), lay.expand)


def union_parts(d: Any, ra: int, rb: int, lo: int) -> None:
    """Union of roots ``ra``, ``rb`` (new root ``lo``): their parts join pairwise; a fixed root fixes the parts."""
    pa, pb = d.parts.pop(ra, None), d.parts.pop(rb, None)
    if pa is None and pb is None:
        return
    if lo == FIXED_ID:
        for g, _ in (pa or ()) + (pb or ()):
            d.union(g, FIXED_ID)
        return
    if pa is not None and pb is not None:
        if [n for _, n in pa] != [n for _, n in pb]:
            for g, _ in pa + pb:
                d.union(g, FIXED_ID)
            d.parts[lo] = pa
            return
        for (g1, _), (g2, _) in zip(pa, pb, strict=True):
            d.union(g1, g2)
    d.parts[lo] = pa if pa is not None else pb  # type: ignore[assignment]


def expand_member(d: Any, gid: int, segs: tuple[tuple[int, int], ...] | None, index: int) -> list[tuple[int, Any, int]]:
    """A member recorded as segment ``index`` of ``segs`` (or the whole ``gid``), as ``(part, segs, index)`` for
    every part its segment became."""
    base = segs if segs is not None else ((gid, d.sizes[gid]),)
    full: list[tuple[int, int]] = []
    span = (0, 0)
    for i, seg in enumerate(base):
        start = len(full)
        full.extend(expand_segs(d, (seg,)))
        if i == index:
            span = (start, len(full))
    if len(full) == len(base):
        return [(gid, segs, index)]
    return [(full[k][0], tuple(full), k) for k in range(*span)]
