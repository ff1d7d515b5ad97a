"""Rules for tensor functions and methods: binary ops, cat/stack, reshape/permute, reductions, indexing, pad."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from fedfuse.align.rules.core import FIXED, FIXED_ID, Layout, ParamRef, Rule, Stacked, _arg, _matched
from fedfuse.align.rules.segments import cut_at, refine

# --------------------------------------------------------------------------------------------------------------
# functions and methods
# --------------------------------------------------------------------------------------------------------------


def _bcast_axis(ref: ParamRef, pval: torch.Tensor, dim_out: int, out_rank: int) -> int | None:
    """The parameter axis that broadcasts onto output dim ``dim_out`` (None: a size-1 or missing dim)."""
    k = dim_out - (out_rank - pval.dim())
    if k < 0 or pval.shape[k] == 1:
        return None
    return ref.dims[k] if k < len(ref.dims) else None


def binary(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """Element-wise ``a ∘ b``: residual add (groups joined), layer scale / affine params (params join the group)."""
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return _join(d, node, d.lay(a), d.value(a), d.lay(b), d.value(b), d.values[node.name])


def cat(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``torch.cat``: along the hidden dim the segments concatenate; along another dim layouts must agree."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = d.values[node.name]
    dim = int(dim) % out.dim()
    lays = [d.lay(t) for t in tensors]  # type: ignore[union-attr]
    vals = [d.value(t) for t in tensors]  # type: ignore[union-attr]
    real = [lay for lay in lays if isinstance(lay, Layout) and not d.is_fixed(lay)]
    if not real:
        return FIXED
    expand = {lay.expand for lay in real}
    if any(lay.dim != dim for lay in real):
        first = real[0]
        if any(o.dim != first.dim or o.expand != first.expand or [n for _, n in o.segs] != [n for _, n in first.segs]
               for o in real[1:]):  # fmt: skip
            for lay in real:  # e.g. PiT: a class token from a Linear beside conv-pooled tokens: they stay put
                d.fix(lay)
            return FIXED
        for other in real[1:]:
            for (g1, _), (g2, _) in zip(first.segs, other.segs, strict=True):
                d.union(g1, g2)
        for lay, v in zip(lays, vals, strict=True):
            if isinstance(lay, ParamRef) and first.expand == 1:
                axis = _bcast_axis(lay, v, first.dim, out.dim())
                if axis is not None and v.shape[first.dim] == first.block:
                    d.add_norm_key(lay.key, first, axis)  # e.g. a class token joins the residual stream
                    continue
            if not isinstance(lay, Layout) or d.is_fixed(lay):
                d.fix(first)
        return first
    if len(expand) > 1:
        raise d.unsupported(node, "concatenates flattened tensors of different spatial sizes")
    exp = expand.pop()
    segs: list[tuple[int, int]] = []
    for lay, v in zip(lays, vals, strict=True):
        if isinstance(lay, Layout) and not d.is_fixed(lay):
            segs.extend(lay.segs)
        else:
            width = v.shape[dim]
            if width % exp:
                raise d.unsupported(node, "fixed part is not a whole number of channels")
            segs.append((FIXED_ID, width // exp))
    return Layout(dim, tuple(segs), exp)


def _param_view(ref: ParamRef, in_shape: Sequence[int], out_shape: Sequence[int]) -> ParamRef | None:
    """A view of a parameter that only inserts/removes size-1 dims (``w.view(1, -1, 1, 1)``) keeps its axes."""
    src = [(i, n) for i, n in enumerate(in_shape) if n != 1]
    dst = [(j, n) for j, n in enumerate(out_shape) if n != 1]
    if [n for _, n in src] != [n for _, n in dst]:
        return None
    dims: list[int | None] = [None] * len(out_shape)
    for (i, _), (j, _) in zip(src, dst, strict=True):
        dims[j] = ref.dims[i] if i < len(ref.dims) else None
    return ParamRef(ref.key, tuple(dims))


def reshape(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """view/reshape/flatten (and ``*_as``): see ``_Deriver.reshape``; a parameter's singleton view stays a ref."""
    x = node.args[0]
    lay, in_shape, out_shape = d.lay(x), d.value(x).shape, d.values[node.name].shape
    if isinstance(lay, ParamRef):
        return _param_view(lay, in_shape, out_shape) or FIXED
    return d.reshape(node, lay, in_shape, out_shape)


def _dim_order(d: Any, node: fx.Node, op: str, rank: int) -> list[int]:
    """``t`` / ``transpose`` / ``permute``: output dim ``i`` is input dim ``order[i]``."""
    args = [d.value(a) for a in node.args[1:]]
    if op == "t":  # a 0-, 1- or 2-d tensor: dims reversed
        return list(range(rank))[::-1]
    if op == "transpose":
        a0, a1 = (int(v) % rank for v in (args[:2] or [node.kwargs["dim0"], node.kwargs["dim1"]]))
        order = list(range(rank))
        order[a0], order[a1] = order[a1], order[a0]
        return order
    perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    return [int(p) % rank for p in (perm or d.value(node.kwargs.get("dims")))]


def move_dims(op: str) -> Rule:
    """transpose / permute / squeeze / unsqueeze / movedim: the hidden dim moves with its axis."""

    def rule(d: Any, node: fx.Node, mod: Any = None) -> Any:
        lay = d.lay(node.args[0])
        x, out = d.value(node.args[0]), d.values[node.name]
        moves = op in ("t", "transpose", "permute")
        if isinstance(lay, ParamRef) and moves:  # W.t(): a parameter read with its axes swapped
            return ParamRef(lay.key, tuple(lay.dims[i] for i in _dim_order(d, node, op, len(lay.dims))))
        if d.is_fixed(lay):
            return FIXED
        if not isinstance(lay, Layout):
            raise d.unsupported(node)
        dd = lay.dim
        args = [d.value(a) for a in node.args[1:]]
        if moves:
            new = _dim_order(d, node, op, x.dim()).index(dd)
        elif op == "unsqueeze":
            k = int(args[0] if args else node.kwargs["dim"]) % out.dim()
            new = dd + (1 if k <= dd else 0)
        else:  # squeeze
            if x.shape[dd] == 1 and out.dim() < x.dim() and (not args or int(args[0]) % x.dim() == dd):
                raise d.unsupported(node, "squeezes the hidden-unit dim")
            removed = [i for i in range(x.dim()) if x.shape[i] == 1] if not args else [int(args[0]) % x.dim()]
            removed = [i for i in removed if x.shape[i] == 1] if out.dim() < x.dim() else []
            new = dd - sum(1 for i in removed if i < dd)
        return replace(lay, dim=new)

    return rule


def reduce(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """sum/mean/amax/amin: over the hidden dim the result is fixed (permutation invariant)."""
    lay = d.lay(node.args[0])
    x = d.value(node.args[0])
    if d.is_fixed(lay):
        return FIXED
    if not isinstance(lay, Layout):
        raise d.unsupported(node)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    if dims is None:
        return FIXED
    dims_l = [int(v) % x.dim() for v in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if lay.dim in dims_l:
        return FIXED
    if lay.expand != 1:
        raise d.unsupported(node, "reduces a flattened conv tensor")
    return lay if keep else replace(lay, dim=lay.dim - sum(1 for i in dims_l if i < lay.dim))


def getitem(d: Any, node: fx.Node, mod: Any = None) -> Any:
    first, idx = node.args[0], node.args[1]
    lay, val = d.lay(first), d.value(first)
    idx = d.value(idx) if isinstance(idx, fx.Node) else idx
    if isinstance(val, (tuple, list)):
        if isinstance(lay, (tuple, list)):
            return lay[idx]
        return FIXED if lay is FIXED else None
    if isinstance(lay, Stacked):
        if isinstance(idx, int):
            return lay.items[idx]
        raise d.unsupported(node, "slices a stacked multi-layer RNN state")
    if d.is_fixed(lay) or not isinstance(val, torch.Tensor):
        return FIXED if isinstance(d.values[node.name], torch.Tensor) else None
    assert isinstance(lay, Layout)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    i = o = 0
    new: int | None = None
    for it in items:
        if it is None:
            o += 1
        elif it is Ellipsis:
            skip = val.dim() - n_real
            if i <= lay.dim < i + skip:
                new = o + lay.dim - i
            i, o = i + skip, o + skip
        elif isinstance(it, int):
            if i == lay.dim:  # one hidden unit picked out: those units must stay put
                d.fix(lay)
                return FIXED
            i += 1
        elif isinstance(it, slice):
            if i == lay.dim:
                if it != slice(None):  # a slice of the hidden units: they must stay put
                    d.fix(lay)
                    return FIXED
                new = o
            i, o = i + 1, o + 1
        else:
            return _advanced_before_channels(d, node, lay, val, items)
    if new is None:
        new = o + lay.dim - i
    return replace(lay, dim=new)


def _advanced_before_channels(d: Any, node: fx.Node, lay: Layout, val: torch.Tensor, items: list[Any]) -> Any:
    """Advanced indexing (index tensors) of dims before a last-dim hidden axis, e.g. ``logits[arange(B), last]``
    (a sequence classifier picking each sample's last token): trailing un-indexed dims stay last, in order."""
    real = [it for it in items if it is not None]
    if lay.dim != val.dim() - 1 or Ellipsis in real or len(real) > lay.dim:
        raise d.unsupported(node, "advanced indexing of a hidden tensor")
    for a in node.all_input_nodes[1:]:
        d.fix(d.lay(a))  # the indices select tokens/samples: fixed
    return replace(lay, dim=d.values[node.name].dim() - 1)


def _cut(d: Any, lay: Layout, widths: list[int]) -> Layout:
    """``lay`` with its groups split (:func:`segments.cut_at`) where consecutive pieces of ``widths`` cut through
    them; unchanged where a group cannot be split (already split otherwise) or units span several positions."""
    if lay.expand != 1:
        return lay
    return cut_at(d, lay, itertools.accumulate(widths)) or lay


def split(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """chunk/split: along another dim every piece keeps the layout; along the hidden dim the groups a cut goes
    through are split into parts (:func:`_cut`: a GLU's ``a, b = h.chunk(2, -1)`` then ``a * σ(b)`` joins the
    halves' units), so each piece is whole segments; where a group cannot be split the units are fixed."""
    x = node.args[0]
    lay, pieces = d.lay(x), d.values[node.name]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = int(d.value(dim)) % d.value(x).dim()
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return tuple(FIXED for _ in pieces)
    if dim != lay.dim:
        return tuple(lay for _ in pieces)
    out, segs = [], list(_cut(d, lay, [p.shape[dim] for p in pieces]).segs)
    for p in pieces:
        take, width = [], 0
        while segs and width < p.shape[dim]:
            take.append(segs.pop(0))
            width += take[-1][1] * lay.expand
        if width != p.shape[dim]:
            d.fix(lay)
            return tuple(FIXED for _ in pieces)
        out.append(Layout(dim, tuple(take), lay.expand))
    return tuple(out)


def glu(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``GLU(x) = a ⊙ σ(b)`` with ``(a, b)`` the halves of ``x`` along ``dim`` (``nn.GLU``, ``F.glu``): along the
    hidden dim the halves are cut (:func:`_cut`) and their units joined, as ``a * sigmoid(b)`` written out is."""
    x = node.args[0]
    lay, val = d.lay(x), d.value(x)
    if mod is not None:
        dim = mod.dim
    else:
        dim = d.value(node.args[1]) if len(node.args) > 1 else node.kwargs.get("dim", -1)
    dim = int(dim) % val.dim()
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return FIXED
    if dim != lay.dim:
        return lay
    a, b = val.chunk(2, dim)
    cut = _cut(d, lay, [a.shape[dim], b.shape[dim]])
    widths = list(itertools.accumulate(n * cut.expand for _, n in cut.segs))
    if a.shape[dim] not in widths:
        d.fix(lay)
        return FIXED
    k = widths.index(a.shape[dim]) + 1
    la, lb = Layout(dim, cut.segs[:k], cut.expand), Layout(dim, cut.segs[k:], cut.expand)
    return _join(d, node, la, a, lb, b, d.values[node.name])


def expand_method(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``Tensor.expand``: a broadcast parameter stays a ParamRef; a hidden tensor keeps its (shifted) dim."""
    lay = d.lay(node.args[0])
    x, out = d.value(node.args[0]), d.values[node.name]
    shift = out.dim() - x.dim()
    if isinstance(lay, ParamRef):
        return ParamRef(lay.key, (None,) * shift + lay.dims)
    if isinstance(lay, Layout) and not d.is_fixed(lay):
        if out.shape[lay.dim + shift] != x.shape[lay.dim]:
            raise d.unsupported(node, "expands the hidden-unit dim")
        return replace(lay, dim=lay.dim + shift)
    return FIXED


def interpolate(d: Any, node: fx.Node, mod: Any = None) -> Any:
    lay = d.lay(node.args[0])
    d.check_channel(node, lay, 1)
    return lay


def _join(d: Any, node: fx.Node, la: Any, va: Any, lb: Any, vb: Any, out: torch.Tensor) -> Any:
    """The layout of an element-wise combination of ``(la, va)`` and ``(lb, vb)`` broadcast to ``out``."""
    if not isinstance(vb, torch.Tensor) or lb is None:
        return FIXED if isinstance(la, ParamRef) else la
    if not isinstance(va, torch.Tensor) or la is None:
        return FIXED if isinstance(lb, ParamRef) else lb
    result: Any = None
    for lx, vx, ly, vy in ((la, va, lb, vb), (lb, vb, la, va)):
        if d.is_fixed(lx) or not isinstance(lx, Layout):
            continue
        dim_out = lx.dim + out.dim() - vx.dim()
        if isinstance(ly, Layout) and not d.is_fixed(ly) and ly.dim + out.dim() - vy.dim() == dim_out:
            if ly.expand != lx.expand or [n for _, n in ly.segs] != [n for _, n in lx.segs]:
                if ly.expand * ly.block != lx.expand * lx.block:
                    raise d.unsupported(node, "operands split hidden units differently")
                cut = refine(d, lx, ly) if ly.expand == lx.expand else None
                if cut is not None:  # one group meets several (a padded shortcut): split it into parts
                    for (g1, _), (g2, _) in zip(cut[0].segs, cut[1].segs, strict=True):
                        d.union(g1, g2)
                    result = replace(cut[0], dim=dim_out) if result is None else result
                    continue
                d.fix(lx)  # same units, split into different groups (e.g. SE scale × grouped-conv output):
                d.fix(ly)  # keeping both fixed is the exact choice
                result = replace(lx, dim=dim_out) if result is None else result
                continue
            for (g1, _), (g2, _) in zip(lx.segs, ly.segs, strict=True):
                d.union(g1, g2)
        else:
            ydim = dim_out - (out.dim() - vy.dim())
            if ydim >= 0 and vy.shape[ydim] != 1:
                if isinstance(ly, Layout) and not d.is_fixed(ly):
                    raise d.unsupported(node, "operands have hidden units on different dims")
                axis = _bcast_axis(ly, vy, dim_out, out.dim()) if isinstance(ly, ParamRef) else None
                if axis is not None and lx.expand == 1 and vy.shape[ydim] == lx.block:
                    d.add_norm_key(ly.key, lx, axis)  # layer scale / affine / position embedding
                else:
                    d.fix(lx)  # combined element-wise with a fixed per-channel tensor: cannot move
        result = replace(lx, dim=dim_out) if result is None else result
    return result if result is not None else FIXED


def addcmul(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``addcmul(x, t1, t2) = x + v·t1·t2`` (and ``addcdiv``): two element-wise joins (ResMLP's affine, GRN)."""
    x, t1, t2 = node.args[:3]
    out = d.values[node.name]
    v1, v2 = d.value(t1), d.value(t2)
    prod = torch.empty(torch.broadcast_shapes(v1.shape, v2.shape))
    lay = _join(d, node, d.lay(t1), v1, d.lay(t2), v2, prod)
    return _join(d, node, d.lay(x), d.value(x), lay, prod, out)


def vector_norm(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``x.norm(p, dim)`` / ``torch.linalg.vector_norm(x, ord, dim)``: a reduction (see :func:`reduce`)."""
    x = node.args[0]
    lay = d.lay(x)
    if d.is_fixed(lay):
        return FIXED
    if not isinstance(lay, Layout):
        raise d.unsupported(node)
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    keep = bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False))
    rank = d.value(x).dim()
    dims_l = (
        list(range(rank))
        if dims is None
        else [int(v) % rank for v in (dims if isinstance(dims, (tuple, list)) else [dims])]
    )
    if lay.dim in dims_l:
        return FIXED
    if lay.expand != 1:
        raise d.unsupported(node, "reduces a flattened conv tensor")
    return lay if keep else replace(lay, dim=lay.dim - sum(1 for i in dims_l if i < lay.dim))


def pad(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``F.pad(x, pad, mode, value)``: pads the last ``len(pad)/2`` dims. Constant padding of the hidden dim adds
    structurally constant units (CIFAR ResNet option-A shortcuts): each padded block is a new group (its units
    are all equal, so any permutation among them is exact) beside the input's; cropping or reflecting the hidden
    dim fixes its units."""
    x = node.args[0]
    lay = d.lay(x)
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return FIXED
    amounts = fx.node.map_arg(_arg(node, F.pad, "pad"), d.value)  # the amounts may be traced values (timm's same pad)
    mode = d.value(_arg(node, F.pad, "mode")) or "constant"
    rank = d.value(x).dim()
    for i in range(len(amounts) // 2):
        lo, hi = int(amounts[2 * i]), int(amounts[2 * i + 1])
        if rank - 1 - i == lay.dim and (lo or hi):
            if mode != "constant" or lo < 0 or hi < 0 or lay.expand != 1:
                d.fix(lay)
                return FIXED
            segs = tuple((d.new_group(f"{node.name}.pad{j}", n), n) for j, n in ((0, lo), (1, hi)) if n)
            lay = Layout(lay.dim, segs[:1] + lay.segs + segs[1:] if lo else lay.segs + segs, 1)
    if lay.expand != 1:
        raise d.unsupported(node, "pads a flattened conv tensor")
    return lay


def roll(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``torch.roll(x, shifts, dims)``: shifts positions (Swin's shifted windows); rolling the hidden dim fixes it."""
    x = node.args[0]
    lay = d.lay(x)
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return FIXED
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    rank = d.value(x).dim()
    dims_l = [int(v) % rank for v in (dims if isinstance(dims, (tuple, list)) else [dims])] if dims is not None else []
    if dims is None or lay.dim in dims_l or lay.expand != 1:
        d.fix(lay)
        return FIXED
    return lay


def repeat(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``x.repeat(*sizes)``: copies along other dims keep the layout; ``r`` copies of the hidden dim concatenate
    its segments ``r`` times (the same units, so the same transport)."""
    x = node.args[0]
    lay = d.lay(x)
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return FIXED
    sizes = [d.value(a) for a in node.args[1:]] or d.value(node.kwargs.get("repeats"))
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = list(sizes[0])
    shift = len(sizes) - d.value(x).dim()
    r = int(sizes[lay.dim + shift])
    if r != 1 and lay.expand != 1:
        d.fix(lay)
        return FIXED
    return Layout(lay.dim + shift, lay.segs * r, lay.expand)


def repeat_interleave(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``x.repeat_interleave(r, dim)`` along another dim keeps the layout; along the hidden dim it fixes it."""
    x = node.args[0]
    lay = d.lay(x)
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return FIXED
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None or int(dim) % d.value(x).dim() == lay.dim:
        d.fix(lay)
        return FIXED
    return lay


def stack(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``torch.stack(tensors, dim)``: a new dim; the stacked tensors' hidden units move together (joined), or, if
    their layouts differ or some are fixed, stay put."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = int(dim) % d.values[node.name].dim()
    lays = [d.lay(t) for t in tensors]  # type: ignore[union-attr]
    real = [lay for lay in lays if isinstance(lay, Layout) and not d.is_fixed(lay)]
    if not real:
        return FIXED
    first = real[0]
    if len(real) != len(lays) or not all(o.dim == first.dim and _matched(d, first, o) for o in real[1:]):
        for lay in real:
            d.fix(lay)
        return FIXED
    return replace(first, dim=first.dim + (1 if dim <= first.dim else 0))


def unfold(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``nn.Unfold`` / ``F.unfold``: ``(B, C, H, W) -> (B, C·k, L)``, channel ``c`` at rows ``c·k … c·k+k-1``: the
    same units, each spread over the ``k`` kernel positions (``expand``)."""
    x = node.args[0]
    lay = d.check_channel(node, d.lay(x), 1)
    if lay is None:
        return FIXED
    k = d.values[node.name].shape[1] // d.value(x).shape[1]
    return Layout(1, lay.segs, k)


def max_min(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``x.max(dim)`` / ``x.min(dim)`` (values, indices): over another dim both are per unit (layout kept); over
    the hidden dim the indices would follow the order, so those units stay fixed. ``max(a, b)`` is element-wise;
    a global max is a scalar."""
    x = node.args[0]
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("other"))
    if isinstance(d.value(other), torch.Tensor):
        return binary(d, node, mod)
    lay = d.lay(x)
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return FIXED if not isinstance(d.values[node.name], tuple) else (FIXED, FIXED)
    if other is None:
        return FIXED
    dim = int(d.value(other)) % d.value(x).dim()
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    if dim == lay.dim:
        d.fix(lay)
        return (FIXED, FIXED)
    out = lay if keep else replace(lay, dim=lay.dim - (1 if dim < lay.dim else 0))
    return (out, out)


def getattr_rule(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``result.values`` / ``result.indices`` of max/min/sort-like results: the layout of that item."""
    lay, attr = d.lay(node.args[0]), node.args[1]
    if isinstance(lay, tuple) and attr in ("values", "indices"):
        return lay[0 if attr == "values" else 1]
    if d.is_fixed(lay):
        return FIXED
    raise d.unsupported(node, f"attribute {attr!r} of a hidden tensor")
