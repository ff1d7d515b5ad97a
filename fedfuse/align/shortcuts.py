"""Weight matching's permuted-copy shortcuts: B is A with its units reordered (selfcheck's case, a client that did
not move), recognised in O(parameters) instead of the O(n²·d) cost products.

* :func:`_exact_rows` — one group: B̃'s rows are A's distinct rows reordered; then that reordering is the unique
  optimum of the group's assignment.
* :func:`_is_permuted_copy` — the whole model: B re-indexed by the permutations equals A; then no coordinate
  step can gain.

Both compare bit for bit, one block of rows at a time (never a full copy of a parameter).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from fedfuse.align.spec import Axis, TransportSpec, segment_range
from fedfuse.align.terms import _Term
from fedfuse.align.transport import transport_axis

# Rows are read this many elements at a time; each term's rows are keyed on at most _KEY_COLUMNS of their columns.
_BLOCK = 1 << 18
_KEY_COLUMNS = 256
# The integer views of the floating dtypes whose bits are hashed (other dtypes: no shortcut).
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _rows(w: Tensor, member: Axis, sizes: Mapping[str, int], index: slice | Tensor) -> Tensor:
    """Rows ``index`` (a range or an index tensor) of ``member_rows(w, member, sizes)``, read from ``w`` alone."""
    shape = tuple(w.shape)
    block, off, _ = segment_range(member, sizes, shape[member.axis])
    x = w.reshape(*shape[: member.axis], member.repeat, block, member.expand, *shape[member.axis + 1 :])
    if isinstance(index, slice):
        x = x.narrow(member.axis + 1, off + index.start, index.stop - index.start)
    else:
        x = x.index_select(member.axis + 1, index + off)
    return x.movedim(member.axis + 1, 0).reshape(x.shape[member.axis + 1], -1)


def _b_rows(t: _Term, src: Tensor | None, i: int, j: int) -> Tensor:
    """Rows ``i:j`` of B̃ (B's rows with the other axes permuted: columns gathered by ``src``)."""
    rows = _rows(t.wb, t.member, t.sizes, slice(i, j))
    return rows if src is None else rows.index_select(1, src)


def _hash(x: Tensor, weights: Tensor) -> Tensor:
    """``Σ_j r_j · bits(x_ij)`` per row in int64: exact integer arithmetic (|bits| < 2³¹, r < 2⁸, ≤ 256 columns),
    so equal rows get equal keys wherever they stand; ``x + 0.0`` maps −0.0 to +0.0 (equal values, equal bits)."""
    return ((x + 0.0).view(_BITS[x.dtype]).to(torch.int64) * weights).sum(1)


def _exact_rows(ready: list[_Term], perms: Mapping[str, Tensor]) -> Tensor | None:
    """``σ`` with ``b_σ(i) = a_i`` bit for bit for every row, when B̃'s rows (the ``ready`` terms' concatenated rows,
    other axes permuted by ``perms``) are A's distinct rows reordered; else None.

    Then ``σ`` is the unique maximiser of ``Σ_i ⟨a_i, b_σ(i)⟩`` (Cauchy–Schwarz and the rearrangement inequality:
    ``Σ ⟨a_i, a_π(i)⟩ ≤ Σ ‖a_i‖ ‖a_π(i)‖ ≤ Σ ‖a_i‖²``, with equality only where ``a_π(i) = a_i``), which is what
    ``linear_sum_assignment`` returns on the score ``Σ_m A_m B̃_mᵀ``: O(n·d) instead of the O(n²·d) product.
    Rows are paired by sorting an integer hash of the bits of a few seeded columns (equal rows, equal keys: keys
    that tie mean rows possibly equal, and then None), and then compared in full, a block of rows at a time.
    """
    gen = torch.Generator().manual_seed(0)
    n = ready[0].n
    ka, kb = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    plan = []
    for t in ready:
        if t.wa.dtype not in _BITS or t.wb.dtype != t.wa.dtype or t.wa.shape != t.wb.shape:
            return None
        src = t._src(perms)
        cols = torch.randperm(t.d, generator=gen)[:_KEY_COLUMNS].sort().values if t.d > _KEY_COLUMNS else None
        r = torch.randint(1, 256, (min(t.d, _KEY_COLUMNS),), generator=gen, dtype=torch.int64)
        src_cols = cols if src is None else (src if cols is None else src[cols])
        step = max(1, _BLOCK // max(1, t.d))
        for i in range(0, n, step):
            j = min(n, i + step)
            a = _rows(t.wa, t.member_a, t.sizes_a, slice(i, j))
            b = _rows(t.wb, t.member, t.sizes, slice(i, j))
            ka[i:j] += _hash(a if cols is None else a.index_select(1, cols), r)
            kb[i:j] += _hash(b if src_cols is None else b.index_select(1, src_cols), r)
        plan.append((t, src, step))
    ka_sorted, ia = torch.sort(ka)
    kb_sorted, ib = torch.sort(kb)
    if bool((ka_sorted[1:] == ka_sorted[:-1]).any()):  # tied keys: rows possibly equal, the optimum maybe not unique
        return None
    if not torch.equal(ka_sorted, kb_sorted):  # B̃'s rows are not A's
        return None
    sigma, inv = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    sigma[ia], inv[ib] = ib, ia
    for t, src, step in plan:  # row q of B̃ must be row inv[q] of A, bit for bit
        for i in range(0, n, step):
            j = min(n, i + step)
            if not torch.equal(_rows(t.wa, t.member_a, t.sizes_a, inv[i:j]), _b_rows(t, src, i, j)):
                return None
    return sigma


def _is_permuted_copy(
    sa: Mapping[str, Tensor],
    sb: Mapping[str, Tensor],
    spec_b: TransportSpec,
    perms: Mapping[str, Tensor],
    verified: Collection[str] = (),
) -> bool:
    """B re-indexed by ``perms`` equals A bit for bit on every parameter the groups touch (one at a time; the keys
    in ``verified`` were compared whole by :func:`_exact_rows` under these ``perms`` already).

    Then ``Σ_k ⟨A_k, (P·B)_k⟩ = ‖A‖²`` is the global maximum of weight matching's objective (Cauchy–Schwarz:
    ``‖P'·B‖ = ‖B‖ = ‖A‖`` for every permutation ``P'``), so no coordinate step can gain: the descent would stop
    after one sweep that moves nothing.
    """
    sizes = spec_b.sizes
    for key, wb in sb.items():
        if key in verified:
            continue
        per_axis: dict[int, list[tuple[Axis, Tensor | None]]] = {}
        for g, ax in spec_b.members_of(key):
            per_axis.setdefault(ax.axis, []).append((ax, perms[g.name]))
        if not per_axis:
            continue
        w = wb
        for axis, members in per_axis.items():
            w = transport_axis(w, axis, members, sizes)
        if not torch.equal(w, sa[key]):
            return False
    return True
