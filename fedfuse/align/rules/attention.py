"""Rules for attention: multi-head attention blocks (units permuted within heads, and heads reordered as whole blocks
where every head is alike: :class:`~fedfuse.align.spec.Blocks`), Swin window attention (per-head position bias:
heads kept in place), matmul and scaled_dot_product_attention."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import fx, nn

from fedfuse.align.rules.core import FIXED, FIXED_ID, Layout, ParamRef, _arg, _matched


def _attention_groups(d: Any, name: str, heads: int, width: int, blocks: bool = True) -> tuple[tuple, tuple]:
    """Per head: a q/k group and a v group of ``width / heads`` dims; the qkv rows' segments. ``blocks``: the heads
    are alike (no per-head parameter, bias or mask), so they may also be reordered as whole blocks: head ``h``'s
    q, k, v rows and output columns together (``name.qk``, ``name.v``: :class:`~fedfuse.align.spec.Blocks`)."""
    hd = width // heads
    qk = tuple((d.new_group(f"{name}.qk{h}", hd), hd) for h in range(heads))
    v = tuple((d.new_group(f"{name}.v{h}", hd), hd) for h in range(heads))
    if blocks:
        d.add_blocks((f"{name}.qk", f"{name}.v"), tuple(g for g, _ in qk), tuple(g for g, _ in v))
    return qk + qk + v, v


def heads_alike(
    d: Any, node: fx.Node, mod: nn.Module, inputs: tuple[Any, ...], heads: int, own: tuple[str, ...]
) -> bool:
    """Whether ``mod``'s heads are interchangeable: no state besides its projections ``own`` has a dim of ``heads``
    entries (a per-head bias table or temperature), and no other tensor input (a mask) is per head: 3-d (batch ×
    heads rows, ``nn.MultiheadAttention``'s form) or ``heads`` entries at dim -3 (``(batch, heads, L, S)``)."""
    for key, t in mod.state_dict().items():
        if key.split(".")[0] not in own and heads in tuple(t.shape):
            return False
    for a in node.all_input_nodes:
        v = d.value(a)
        if a not in inputs and hasattr(v, "shape") and (v.dim() == 3 or (v.dim() >= 4 and v.shape[-3] == heads)):
            return False
    return True


def _attention_members(
    d: Any,
    node: fx.Node,
    x: fx.Node,
    lay: Layout,
    keys: dict[str, str | None],
    heads: int,
    width: int,
    name: str,
    out_width: int | None = None,
    blocks: bool = False,
) -> Layout:
    """Members of one attention op; ``keys``: qkv_weight, qkv_bias, proj_weight, proj_bias state keys;
    ``width`` = heads × head dim, ``out_width`` the output projection's (default ``width``); ``blocks``: heads may
    be reordered as blocks (see :func:`_attention_groups`)."""
    out_width = width if out_width is None else out_width
    rows, v = _attention_groups(d, name, heads, width, blocks)
    d.add_inputs(keys["qkv_weight"], 1, lay, x)
    for key in (keys["qkv_weight"], keys.get("qkv_bias")):
        if key is not None:
            for i, (gid, _) in enumerate(rows):
                d.add(gid, key, 0, "out", 1, 1, rows, i)
    for i, (gid, _) in enumerate(v):
        d.add(gid, keys["proj_weight"], 1, "in", 1, 1, v if len(v) > 1 else None, i)
    out = d.new_group(f"{name}.out", out_width)
    d.add(out, keys["proj_weight"], 0, "out")
    if keys.get("proj_bias") is not None:
        d.add(out, keys["proj_bias"], 0, "out")
    return Layout(lay.dim, ((out, out_width),))


def qkv_attention_module(d: Any, node: fx.Node, mod: Any) -> Any:
    """A self-attention block ``proj(attn(split_heads(qkv(x)), mask))`` with attributes ``qkv``, ``proj``
    (Linear), ``num_heads`` (timm's ``Attention``: ViT, DeiT, PiT, MobileViT...; Swin's window attention, whose
    relative position bias and shift mask are added to the scores). Heads as in :func:`multihead_attention`; whole
    heads are reordered only where :func:`heads_alike` (Swin's per-head position bias table keeps them in place).
    With q/k normalisation, output normalisation or a gate (per-head-dim parameters shared by all heads) the
    inner units stay fixed: the input feeds ``qkv`` (and ``gate``), the output is ``proj``'s new group."""
    name = str(node.target)
    x = node.args[0] if node.args else node.kwargs["x"]
    rank = d.value(x).dim()
    lay_in = d.check_channel(node, d.lay(x), rank - 1)
    for a in node.all_input_nodes:  # an attention mask indexes tokens (added to the scores): it stays fixed
        if a is not x:
            d.fix(d.lay(a))
    plain = all(isinstance(getattr(mod, k, None), (nn.Identity, type(None))) for k in ("q_norm", "k_norm", "norm"))
    plain = plain and getattr(mod, "gate", None) is None
    keys = {
        "qkv_weight": f"{name}.qkv.weight",
        "qkv_bias": f"{name}.qkv.bias" if mod.qkv.bias is not None else None,
        "proj_weight": f"{name}.proj.weight",
        "proj_bias": f"{name}.proj.bias" if mod.proj.bias is not None else None,
    }
    if plain:
        lay = lay_in if lay_in is not None else Layout(rank - 1, ((FIXED_ID, mod.qkv.in_features),))
        heads, width = int(mod.num_heads), mod.qkv.out_features // 3
        alike = heads_alike(d, node, mod, (x,), heads, ("qkv", "proj"))
        return _attention_members(d, node, x, lay, keys, heads, width, name, mod.proj.out_features, alike)
    for lin in ("qkv", "gate"):
        if isinstance(getattr(mod, lin, None), nn.Linear) and lay_in is not None:
            d.add_inputs(f"{name}.{lin}.weight", 1, lay_in, x)
    out = d.new_group(f"{name}.proj", mod.proj.out_features)
    d.add(out, keys["proj_weight"], 0, "out")
    if keys["proj_bias"] is not None:
        d.add(out, keys["proj_bias"], 0, "out")
    return Layout(rank - 1, ((out, mod.proj.out_features),))


def multihead_attention(d: Any, node: fx.Node, mod: nn.MultiheadAttention) -> Any:
    """``nn.MultiheadAttention``: self-attention, or cross-attention whose query, key and value read the same
    ``in_proj`` columns: their streams join (one transport for all three: exact), or stay fixed when their segment
    structures differ. Masks index tokens (fixed); a 3-d (per-head) mask keeps heads in place, else heads are also
    reordered as blocks."""
    name = str(node.target)
    args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value")][len(node.args) :]
    q, k, v = args[:3]
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        raise d.unsupported(node, "MultiheadAttention with kdim/vdim, bias_k/bias_v or add_zero_attn")
    rank = d.value(q).dim()
    for a in node.all_input_nodes:
        if a not in (q, k, v):
            d.fix(d.lay(a))
    lays = [d.check_channel(node, d.lay(t), d.value(t).dim() - 1) for t in (q, k, v)]
    live = [lay for lay in lays if lay is not None]
    if len(live) < 3 or any(not _matched(d, live[0], other) for other in live[1:]):
        for lay in live:  # one of them fixed, or structures differ: all stay put (in_proj columns are shared)
            d.fix(lay)
    lay = d.lay(q)
    lay_in = d.check_channel(node, lay, rank - 1)
    if lay_in is None:
        lay_in = Layout(rank - 1, ((FIXED_ID, mod.embed_dim),))
    keys = {
        "qkv_weight": f"{name}.in_proj_weight",
        "qkv_bias": f"{name}.in_proj_bias" if mod.in_proj_bias is not None else None,
        "proj_weight": f"{name}.out_proj.weight",
        "proj_bias": f"{name}.out_proj.bias" if mod.out_proj.bias is not None else None,
    }
    alike = heads_alike(d, node, mod, (q, k, v), mod.num_heads, ("in_proj_weight", "in_proj_bias", "out_proj"))
    weights = d.values[node.name][1]  # per-head attention weights returned (average_attn_weights=False): heads stay
    alike = alike and not (hasattr(weights, "dim") and weights.dim() == rank + 1)
    out = _attention_members(d, node, q, lay_in, keys, mod.num_heads, mod.embed_dim, name, blocks=alike)
    return (out, None)


def _ref_key(d: Any, node: fx.Node, p: Any) -> str | None:
    if p is None or d.value(p) is None:
        return None
    ref = d.lay(p)
    if not isinstance(ref, ParamRef):
        raise d.unsupported(node, "attention weights are computed, not model parameters")
    return ref.key


def shifted_window_attention(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """torchvision's Swin ``shifted_window_attention(x, qkv_weight, proj_weight, ...)`` (v1 and v2)."""
    from torchvision.models.swin_transformer import shifted_window_attention as fn

    x = node.args[0]
    lay = d.lay(x)
    rank = d.value(x).dim()
    lay_in = d.check_channel(node, lay, rank - 1)
    if lay_in is None:
        lay_in = Layout(rank - 1, ((FIXED_ID, d.value(x).shape[-1]),))
    rel = _arg(node, fn, "relative_position_bias")
    d.fix(d.lay(rel))
    keys = {k: _ref_key(d, node, _arg(node, fn, k)) for k in ("qkv_weight", "qkv_bias", "proj_weight", "proj_bias")}
    heads = int(d.value(_arg(node, fn, "num_heads")))
    width = d.value(x).shape[-1]
    name = keys["qkv_weight"].rsplit(".", 2)[0]  # type: ignore[union-attr]
    return _attention_members(d, node, x, lay_in, keys, heads, width, name)


def _dense_param(d: Any, node: fx.Node, x: Any, w: ParamRef, width: int) -> Layout | None:
    """``x @ W`` with ``W`` a 2-d model parameter (or its transpose, ``w.dims``): a dense layer ``y = x W`` — the
    units of x's last dim index W's input axis, a new group of ``width`` indexes its output axis. None where x's
    units sit at another dim (the general rule below then decides)."""
    lay, rank = d.lay(x), d.value(x).dim()
    live = isinstance(lay, Layout) and not d.is_fixed(lay)
    if live and (lay.dim != rank - 1 or lay.expand != 1):
        return None
    if live:
        d.add_inputs(w.key, w.dims[0], lay, x)
    g = d.new_group(w.key, width)
    d.add(g, w.key, w.dims[1], "out")
    return Layout(rank - 1, ((g, width),))


def matmul(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``a @ b`` (batched): a's rows and b's columns index the output; the contracted dim (a's last, b's
    second-last) is a sum over units, invariant when both sides move jointly (joined), else fixed; a batch dim
    carries units only if the other operand moves with it (joined) or broadcasts (size 1)."""
    a, b = node.args[:2]
    la, lb = d.lay(a), d.lay(b)
    va, vb, out = d.value(a), d.value(b), d.values[node.name]
    if isinstance(lb, ParamRef) and not isinstance(la, ParamRef) and vb.dim() == 2 and None not in lb.dims:
        dense = _dense_param(d, node, a, lb, vb.shape[1])
        if dense is not None:
            return dense
    ra, rb, ro = va.dim(), vb.dim(), out.dim()
    live = [lay for lay in (la, lb) if isinstance(lay, Layout) and not d.is_fixed(lay)]
    if any(not isinstance(lay, (Layout, ParamRef, type(None))) and lay is not FIXED for lay in (la, lb)):
        raise d.unsupported(node)
    if ra < 2 or rb < 2 or any(lay.expand != 1 for lay in live):
        for lay in live:
            d.fix(lay)
        return FIXED
    la = la if isinstance(la, Layout) and not d.is_fixed(la) else None
    lb = lb if isinstance(lb, Layout) and not d.is_fixed(lb) else None
    result: Any = FIXED
    if la is not None and la.dim == ra - 1:  # contracted
        if not (lb is not None and lb.dim == rb - 2 and _matched(d, la, lb)):
            d.fix(la)
            d.fix(lb if lb is not None and lb.dim == rb - 2 else None)
        la = None
        lb = None if lb is not None and lb.dim == rb - 2 else lb
    if lb is not None and lb.dim == rb - 2:
        d.fix(lb)
        lb = None
    for lx, rx, vy, ly, ry in ((la, ra, vb, lb, rb), (lb, rb, va, la, ra)):
        if lx is None or lx.dim >= rx - 2:
            continue
        k = lx.dim + ro - rx  # batch dim of the output
        ky = k - (ro - ry)
        if ky >= 0 and vy.shape[ky] != 1 and not (ly is not None and ly.dim == ky and _matched(d, lx, ly)):
            d.fix(lx)
    la = la if la is not None and not d.is_fixed(la) else None
    lb = lb if lb is not None and not d.is_fixed(lb) else None
    if la is not None:
        result = replace(la, dim=ro - 2 if la.dim == ra - 2 else la.dim + ro - ra)
    if lb is not None:
        mine = replace(lb, dim=ro - 1 if lb.dim == rb - 1 else lb.dim + ro - rb)
        if result is FIXED:
            result = mine
        elif result.dim != mine.dim:
            d.fix(lb)  # the output carries one hidden dim: b's columns stay put
    return result


def scaled_dot_product_attention(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``softmax(q kᵀ / s + mask) v``: q and k's last dim (a sum in the scores) move jointly or stay fixed;
    v's last dim indexes the output; heads/batch/token dims never carry moving units here (fixed)."""
    q, k, v = node.args[:3]
    lq, lk, lv = d.lay(q), d.lay(k), d.lay(v)
    rank = d.value(q).dim()
    for other in node.all_input_nodes:
        if other not in (q, k, v):
            d.fix(d.lay(other))
    live = lambda lay: isinstance(lay, Layout) and not d.is_fixed(lay)  # noqa: E731
    if live(lq) or live(lk):
        if not (live(lq) and live(lk) and lq.dim == rank - 1 and lk.dim == rank - 1 and _matched(d, lq, lk)):
            d.fix(lq)
            d.fix(lk)
    if live(lv):
        if lv.dim == rank - 1 and lv.expand == 1:
            return lv
        d.fix(lv)
    return FIXED
