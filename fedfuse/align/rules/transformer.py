"""Rules for ``nn.TransformerEncoder/Decoder(+Layer)`` as modules (torch's fast path is never traced).

One layer, post-norm or pre-norm (``norm_first``), is ``x + SA(x)``, ``x + CA(x, memory)`` (decoder), ``x + FF(x)``
with a LayerNorm around each: the residual stream ``s`` (the layer's input units: an embedding's width, a
projection's rows) indexes the norms' affine, ``in_proj`` and ``linear1`` columns, and ``out_proj`` and ``linear2``
rows (joined by the residual adds). Attention as :func:`fedfuse.align.rules.attention.multihead_attention`: per head
a q/k group (the score ``q·k`` is a sum over the head's dims) and a v group (``out_proj`` columns), and the heads
as blocks (reordered whole, unless a 3-d mask differs per head); the feed-forward
width is a group of its own. Cross-attention reads ``memory`` through the same ``in_proj`` columns, so the memory's
stream joins the decoder's (one transport for both: exact). Masks index tokens: they stay fixed.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from fedfuse.align.rules.attention import _attention_groups
from fedfuse.align.rules.core import FIXED_ID, Layout


def _stream(d: Any, node: fx.Node, arg: Any, width: int) -> int:
    """The group id of the residual stream carried by ``arg`` (a single group, or FIXED_ID)."""
    lay = d.lay(arg)
    if d.is_fixed(lay):
        return FIXED_ID
    rank = d.value(arg).dim()
    lay = d.check_channel(node, lay, rank - 1)
    if len(lay.segs) == 1:
        return lay.segs[0][0]
    g = d.new_group(f"{node.target}.stream", width)  # a concatenated input: its pieces stay where they are
    d.fix(lay)
    d.union(g, FIXED_ID)
    return g


def _mha(d: Any, node: fx.Node, prefix: str, mod: nn.MultiheadAttention, s: int, alike: bool) -> int:
    """Members of one ``nn.MultiheadAttention`` whose query, key and value all read stream ``s``; its output group.
    ``alike``: no per-head mask, so heads may be reordered as blocks."""
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        raise d.unsupported(node, f"'{prefix}': MultiheadAttention with kdim/vdim, bias_k/bias_v or add_zero_attn")
    rows, v = _attention_groups(d, prefix, mod.num_heads, mod.embed_dim, alike)
    d.add(s, f"{prefix}.in_proj_weight", 1, "in")
    for key in (f"{prefix}.in_proj_weight", f"{prefix}.in_proj_bias"):
        for i, (gid, _) in enumerate(rows):
            d.add(gid, key, 0, "out", 1, 1, rows, i)
    for i, (gid, _) in enumerate(v):
        d.add(gid, f"{prefix}.out_proj.weight", 1, "in", 1, 1, v if len(v) > 1 else None, i)
    out = d.new_group(f"{prefix}.out", mod.embed_dim)
    d.add(out, f"{prefix}.out_proj.weight", 0, "out")
    d.add(out, f"{prefix}.out_proj.bias", 0, "out")
    return out


def _norm(d: Any, prefix: str, s: int, width: int) -> None:
    d.add_norm(prefix, Layout(0, ((s, width),)), 0, ("weight", "bias"))


def _layer(d: Any, node: fx.Node, prefix: str, mod: nn.Module, s: int, memory: int | None, alike: bool) -> None:
    """Members of one encoder (``memory`` None) or decoder layer on stream ``s``; every output joins ``s``."""
    width = mod.linear1.in_features
    d.union(_mha(d, node, f"{prefix}.self_attn", mod.self_attn, s, alike), s)
    if memory is not None:
        d.union(memory, s)
        d.union(_mha(d, node, f"{prefix}.multihead_attn", mod.multihead_attn, s, alike), s)
    ff = d.new_group(f"{prefix}.linear1", mod.linear1.out_features)
    d.add(s, f"{prefix}.linear1.weight", 1, "in")
    d.add(ff, f"{prefix}.linear1.weight", 0, "out")
    d.add(ff, f"{prefix}.linear1.bias", 0, "out")
    d.add(ff, f"{prefix}.linear2.weight", 1, "in")
    d.add(s, f"{prefix}.linear2.weight", 0, "out")
    d.add(s, f"{prefix}.linear2.bias", 0, "out")
    for k in ("norm1", "norm2", "norm3"):
        if isinstance(getattr(mod, k, None), nn.LayerNorm):
            _norm(d, f"{prefix}.{k}", s, width)


def _width(mod: nn.Module) -> int:
    layer = mod.layers[0] if hasattr(mod, "layers") else mod
    return int(layer.linear1.in_features)


def transformer_module(d: Any, node: fx.Node, mod: nn.Module) -> Any:
    """``nn.TransformerEncoderLayer``/``DecoderLayer`` or a stack ``nn.TransformerEncoder``/``Decoder`` (+ final
    norm): the output is the residual stream of the input."""
    name = str(node.target)
    width = _width(mod)
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    decoder = isinstance(mod, (nn.TransformerDecoder, nn.TransformerDecoderLayer))
    mem_arg = (node.args[1] if len(node.args) > 1 else node.kwargs.get("memory")) if decoder else None
    alike = True  # a 3-d mask (batch × heads rows) differs per head: heads then stay in place
    for a in node.all_input_nodes:
        if a is not x and a is not mem_arg:
            d.fix(d.lay(a))  # masks
            alike = alike and getattr(d.value(a), "dim", lambda: 0)() != 3
    s = _stream(d, node, x, width)  # a fixed input: the residual adds keep the stream fixed (the inner units move)
    memory = _stream(d, node, mem_arg, width) if decoder else None
    layers = list(mod.layers) if hasattr(mod, "layers") else [mod]
    prefixes = [f"{name}.layers.{i}" for i in range(len(layers))] if hasattr(mod, "layers") else [name]
    for prefix, layer in zip(prefixes, layers, strict=True):
        _layer(d, node, prefix, layer, s, memory, alike)
    if isinstance(getattr(mod, "norm", None), nn.LayerNorm):
        _norm(d, f"{name}.norm", s, width)
    rank = d.values[node.name].dim()
    return Layout(rank - 1, ((s, width),))
