"""Weight matching's cost terms: each member's ``C_m = A_m B̃_mᵀ`` (:class:`_Term`), cached between coordinate
steps and rebuilt or corrected only when the permutations it depends on change; a group's score ``Σ_m C_m``
(:class:`_Score`); and the budgets that bound their memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cached_property

import torch
from torch import Tensor

from fedfuse.align.spec import Axis, Group, TransportSpec, segment_range
from fedfuse.align.transport import member_rows, transport_axis
from fedfuse.state import threaded_matmul

# A term whose full rebuild costs fewer multiply-adds than this is always rebuilt in full (exactly the plain
# product); above it, a change of its other-axis permutations that moves at most _LOW_RANK_FRACTION of its
# columns is applied as the correction ``A_m[:, J] (B̃_new − B̃_old)[:, J]ᵀ`` over the moved columns J.
_LOW_RANK_MIN_MACS = 50_000_000
_LOW_RANK_FRACTION = 0.5
# At most this many bytes of term rows (A's and B's, over all terms) are kept as float64 copies, smallest terms
# first; the rest stay in the model's dtype (A's rows a view where possible) and are converted when used. Every
# parameter is a member of one or two groups, so float64 rows of everything are 4-8 float32 copies of the model
# (ViT-B/32: 2.8 GB of rows for 0.35 GB of weights; a 300M-parameter ViT-L would need ~10 GB).
_ROWS_DOUBLE_BYTES_MAX = 2**30
# A term whose rows are short (d < n / _LIGHT_RATIO: BatchNorm vectors, depthwise kernels) costs n²d to rebuild, no
# more than reading a stored n × n matrix; it is rebuilt when used instead of cached (an EfficientNet-B7 pair held
# ~20 GB of such n × n terms).
_LIGHT_RATIO = 4
# At most this many bytes of n × n float64 terms are cached (ViT-L's 24 MLP groups of 4096 units alone are 6.4 GB,
# ConvNeXt-L's 5.9 GB); beyond it, the terms with the shortest rows (cheapest to rebuild, n²d) are rebuilt when used.
_CACHE_BYTES_MAX = 2 * 2**30


class _Once:
    """Call ``fn`` the first time this is called, never again."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        if self.fn is not None:
            fn, self.fn = self.fn, None
            fn()


def _budget_rows(terms: Mapping[str, list[_Term]]) -> None:
    """Keep ``_ROWS_DOUBLE_BYTES_MAX`` of the terms' rows as float64 copies, smallest terms first."""
    left = _ROWS_DOUBLE_BYTES_MAX
    for t in sorted((t for ts in terms.values() for t in ts), key=lambda t: t.d * t.n):
        left -= 16 * t.d * t.n
        if left < 0:
            break
        t.a, t.bt = t.a.double(), t.bt.double()


def _budget_cache(terms: Mapping[str, list[_Term]]) -> None:
    """Keep ``_CACHE_BYTES_MAX`` of cached n × n terms, longest rows first; mark the rest light (rebuilt in
    ``value``). A group that caches a term also keeps the sum of its fixed terms (:class:`_Score`): counted too."""
    left, kept = _CACHE_BYTES_MAX, set()
    owner = {id(t): name for name, ts in terms.items() for t in ts}
    for t in sorted((t for ts in terms.values() for t in ts if t.deps and not t.light), key=lambda t: -t.d):
        name, n2 = owner[id(t)], 8 * t.n**2
        const = n2 if name not in kept and any(not u.deps for u in terms[name]) else 0
        t.light = left < n2 + const
        if not t.light:
            left -= n2 + const
            kept.add(name)


class _Score:
    """A group's score ``Σ_m C_m`` (n × n, float64) from its :class:`_Term` s, summed in three parts.

    * fixed terms (no other axis permuted: BatchNorm vectors, biases, a first layer's weights) never change:
      their sum is one product of the concatenated rows, built once and kept when the group caches a term anyway
      (else rebuilt when used, as the short-row terms are);
    * short-row (``light``) terms with permuted other axes: one product of their concatenated gathered rows;
    * cached terms: their ``c`` added.

    A residual stream's group has dozens of BatchNorm vectors: one ``n × n`` product in place of one ``n × n``
    matrix each (resnet50: most of the time of the plain cached sum). Sums in another order than the per-term
    loop, so equal up to float64 rounding.
    """

    def __init__(self, terms: list[_Term]) -> None:
        self.terms = terms
        self.fixed = [t for t in terms if not t.deps]
        self.keep = any(not t.light for t in terms)  # the group holds n × n terms: one more for the fixed sum
        self.const: Tensor | None = None

    def _fixed(self) -> Tensor | None:
        if self.const is not None:
            return self.const
        c = _product(self.fixed)
        if self.keep:
            self.const = c
        return c

    def value(self, ready: list[_Term] | None = None) -> Tensor:
        """A new float64 tensor: the sum over the ``ready`` terms (default all; fixed terms always count)."""
        moving = [t for t in (self.terms if ready is None else ready) if t.deps]
        fixed, light = self._fixed(), _product([t for t in moving if t.light])
        parts = [(p, p is not self.const) for p in (fixed, light) if p is not None]  # (matrix, built here)
        parts += [(t.c, False) for t in moving if not t.light]
        if len(parts) == 1:
            return parts[0][0] if parts[0][1] else parts[0][0].clone()
        (p0, fresh), (p1, _) = parts[0], parts[1]
        score = p0.add_(p1) if fresh else p0 + p1
        for p, _ in parts[2:]:
            score += p
        return score


def _product(terms: list[_Term]) -> Tensor | None:
    """``Σ_m A_m B̃_mᵀ`` over ``terms`` as one product of their concatenated (d × n) rows (None if empty)."""
    if not terms:
        return None
    a = torch.cat([t.a.double() for t in terms], 1) if len(terms) > 1 else terms[0].a.double()
    bts = [t.bt if t.src is None else t.bt.index_select(0, t.src) for t in terms]
    bt = torch.cat([b.double() for b in bts]) if len(bts) > 1 else bts[0].double()
    return threaded_matmul(a, bt)


class _Term:
    """One member's cost term ``C_m = A_m B̃_mᵀ`` (n × n, float64) for weight matching, cached.

    ``B̃_m`` is B's parameter with every *other* axis permuted by the current permutations (its ``deps``):
    the ``(n, d)`` rows of the unpermuted B with their columns gathered by ``src`` (the same permutations
    applied to the column indices). B's rows are kept transposed (``bt``: ``d × n``, contiguous, one permuted
    copy of the parameter) so that gathering columns copies contiguous lines; A's rows ``a`` (``n × d``) are
    a view where the parameter allows; both are made when first used. ``version`` counts the changes of ``c``.
    """

    def __init__(
        self,
        sa: Mapping[str, Tensor],
        sb: Mapping[str, Tensor],
        spec_a: TransportSpec,
        spec_b: TransportSpec,
        ga: Group,
        gb: Group,
        i: int,
    ) -> None:
        member, self.sizes = gb.members[i], spec_b.sizes
        self.key, self.member, self.member_a, self.sizes_a = member.key, member, ga.members[i], spec_a.sizes
        self.wa, self.wb = sa[member.key], sb[member.key]
        shape = list(self.wb.shape)
        self.col_shape = [*shape[: member.axis], member.repeat, member.expand, *shape[member.axis + 1 :]]
        self.n, self.d = segment_range(member, self.sizes, shape[member.axis])[2], math.prod(self.col_shape)
        self.whole = member.segments is None  # the rows hold the whole parameter
        axes: dict[int, list[tuple[Axis, str]]] = {}
        for g, ax in spec_b.members_of(member.key):
            if ax.axis != member.axis:
                axes.setdefault(ax.axis, []).append((ax, g.name))
        # (column dim, axis length, members) per other axis: original axis j is column dim j, or j + 1 after ours
        self.axes = [(j if j < member.axis else j + 1, shape[j], m) for j, m in axes.items()]
        self.deps = sorted({name for _, _, members in self.axes for _, name in members})
        self.seen: dict[str, Tensor] = {}
        self.src: Tensor | None = None
        self.c: Tensor = torch.empty(0)
        self.version = -1
        self.light = self.d * _LIGHT_RATIO < self.n  # d < n / _LIGHT_RATIO: not cached

    @cached_property
    def a(self) -> Tensor:
        """A's ``(n, d)`` rows, made on first use (a view where the parameter allows; float64 copies only within
        the budget, :func:`_budget_rows`, which assigns them; else converted when used)."""
        return member_rows(self.wa, self.member_a, self.sizes_a)

    @cached_property
    def bt(self) -> Tensor:
        """B's rows transposed (``d × n``, one contiguous copy), made on first use: a permuted copy recovered by
        the shortcuts (:mod:`fedfuse.align.shortcuts`) never needs them."""
        return _rows_transposed(self.wb, self.member, self.sizes)

    def _src(self, perms: Mapping[str, Tensor]) -> Tensor | None:
        """Column ``k`` of B̃'s rows is column ``src[k]`` of B's (None: no other axis is permuted)."""
        if not self.axes:
            return None
        cols = torch.arange(math.prod(self.col_shape)).view(self.col_shape)
        for dim, length, members in self.axes:
            idx = transport_axis(torch.arange(length), 0, [(ax, perms[name]) for ax, name in members], self.sizes)
            cols = cols.index_select(dim, idx)
        return cols.reshape(-1)

    def refresh(self, perms: Mapping[str, Tensor]) -> None:
        """Bring ``c`` up to the current ``perms``: a rebuild, a low-rank correction, or nothing."""
        if self.version >= 0 and all(perms[d] is self.seen[d] for d in self.deps):
            return
        self.seen = {name: perms[name] for name in self.deps}
        src, old = self._src(perms), self.src
        self.src, self.version = src, self.version + 1
        d, n = self.d, self.n
        if self.light or not self.deps:  # built when used / summed once by _Score
            return
        if old is not None and src is not None and n * n * d >= _LOW_RANK_MIN_MACS:
            moved = (src != old).nonzero().squeeze(1)
            if moved.numel() <= _LOW_RANK_FRACTION * d:
                if moved.numel():
                    diff = self.bt.index_select(0, src[moved]).double() - self.bt.index_select(0, old[moved]).double()
                    self.c += threaded_matmul(self.a.index_select(1, moved).double(), diff)
                return
        bt = self.bt if src is None else self.bt.index_select(0, src)
        self.c = threaded_matmul(self.a.double(), bt.double())


def _rows_transposed(w: Tensor, member: Axis, sizes: Mapping[str, int]) -> Tensor:
    """``member_rows(w, member, sizes).T`` made contiguous in one copy (the member's axis moved last)."""
    shape = tuple(w.shape)
    block, off, n = segment_range(member, sizes, shape[member.axis])
    x = w.reshape(*shape[: member.axis], member.repeat, block, member.expand, *shape[member.axis + 1 :])
    return x.narrow(member.axis + 1, off, n).movedim(member.axis + 1, -1).reshape(-1, n).contiguous()
