"""Rules for layers: activations, pooling, Linear/Conv, norms, RNNs, flatten."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fedfuse.align.rules.core import FIXED, Layout, ParamRef, Rule, Stacked, _arg
from fedfuse.align.rules.segments import cut_at

# --------------------------------------------------------------------------------------------------------------
# generic rules
# --------------------------------------------------------------------------------------------------------------


def elementwise(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """Channel-wise op (activation, dropout, cast, identity): the layout passes through unchanged."""
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    lay = d.lay(first)
    if isinstance(lay, ParamRef):  # ``w.to(dtype)``, ``w.exp()``: same shape, still indexed by the same units
        out, val = d.values.get(node.name), d.value(first)
        same = isinstance(out, torch.Tensor) and isinstance(val, torch.Tensor) and out.shape == val.shape
        return lay if same else FIXED
    return lay


def channels_last(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """An op acting on every dim but the last (padding/shifting H, W of a channels-last tensor)."""
    x = node.args[0]
    return d.check_channel(node, d.lay(x), d.value(x).dim() - 1) or FIXED


def patch_merging(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """Swin's ``_patch_merging_pad``: pads H, W and concatenates the 4 strided sub-grids on the (last) channel dim."""
    x = node.args[0]
    lay = d.check_channel(node, d.lay(x), d.value(x).dim() - 1)
    if lay is None:
        return FIXED
    k = d.values[node.name].shape[-1] // d.value(x).shape[-1]
    return Layout(lay.dim, lay.segs * k, lay.expand)


def fixed_output(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """An op whose inputs must be fixed and whose output is fixed (e.g. a relative-position-bias builder)."""
    for a in node.all_input_nodes:
        d.fix(d.lay(a))
    return FIXED


def _channel_first(d: Any, node: fx.Node, lay: Any) -> Layout | None:
    return d.check_channel(node, lay, 1)


def pool(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """Spatial pooling (max/avg/adaptive, any output size): acts per channel, channels at dim 1."""
    lay = d.lay(node.args[0])
    if d.is_fixed(lay):
        return FIXED
    _channel_first(d, node, lay)
    return lay


def _linear(d: Any, node: fx.Node, x: Any, weight: str, bias: str | None, out_features: int, name: str) -> Any:
    lay = d.lay(x)
    rank = d.value(x).dim()
    if isinstance(lay, Layout) and not d.is_fixed(lay) and lay.dim != rank - 1:
        return lay  # token mixing (a Linear over a non-hidden dim): channel layout kept, its own units fixed
    lay_in = d.check_channel(node, lay, rank - 1, flat_ok=True)
    if lay_in is not None:
        d.add_inputs(weight, 1, lay_in, x)
    g = d.new_group(name, out_features)
    d.add(g, weight, 0, "out")
    if bias is not None:
        d.add(g, bias, 0, "out")
    return Layout(rank - 1, ((g, out_features),))


def linear(d: Any, node: fx.Node, mod: nn.Linear) -> Any:
    """``y = x Wᵀ + b``: input units index W's columns, a new group of ``out_features`` indexes rows and bias."""
    name = str(node.target)
    return _linear(d, node, node.args[0], f"{name}.weight", f"{name}.bias", mod.out_features, name)


def functional_linear(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``F.linear(x, W, b)`` with W, b the model's parameters (a Linear subclass with its own forward)."""
    w, b = _arg(node, F.linear, "weight"), _arg(node, F.linear, "bias")
    wref, bref = d.lay(w), d.lay(b)
    if not isinstance(wref, ParamRef) or wref.dims != (0, 1):
        raise d.unsupported(node, "its weight is computed, not a model parameter")
    name = wref.key.rsplit(".", 1)[0] if "." in wref.key else wref.key
    bias = bref.key if isinstance(bref, ParamRef) and bref.dims == (0,) else None
    out = _linear(d, node, node.args[0], wref.key, bias, d.value(w).shape[0], name)
    if b is not None and bias is None:
        d.fix(out)  # a computed bias (BEiT/EVA: cat(q_bias, zeros, v_bias)) cannot follow a row permutation
        return FIXED
    return out


def _conv(
    d: Any, node: fx.Node, x: Any, outs: Sequence[str], weight: str, cin: int, cout: int, g: int, name: str
) -> Any:
    """Convolution with weight ``weight``; ``outs``: keys indexed by the output channel at axis 0 (weight, bias,
    a std-conv's gain). ``groups`` handled exactly as described in the module docstring."""
    lay_in = d.check_channel(node, d.lay(x), 1, flat_ok=True)  # dense: each (channel, copy) is one input column
    if g != 1 and lay_in is not None and lay_in.expand != 1:
        d.fix(lay_in)  # a grouped conv over channel copies (after a channel multiplier): those units stay put
        lay_in = None
    if g == 1:
        if lay_in is not None:
            d.add_inputs(weight, 1, lay_in, x)
        gid = d.new_group(name, cout)
        for key in outs:
            d.add(gid, key, 0, "out")
        return Layout(1, ((gid, cout),))
    if g == cin and lay_in is not None:  # depthwise: output channel c·m + k reads input channel c only
        mult = cout // cin
        segs = lay_in.segs if len(lay_in.segs) > 1 else None
        for i, (gid, _) in enumerate(lay_in.segs):
            for key in outs:
                d.add(gid, key, 0, "out", 1, mult, segs, i)
        return Layout(1, lay_in.segs, mult)
    # grouped (or depthwise on a fixed input): inputs fixed, outputs permute within each of the g blocks
    d.fix(lay_in)
    width = cout // g
    segs_t = tuple((d.new_group(f"{name}.g{b}" if g > 1 else name, width), width) for b in range(g))
    for i, (gid, _) in enumerate(segs_t):
        for key in outs:
            d.add(gid, key, 0, "out", 1, 1, segs_t if g > 1 else None, i)
    return Layout(1, segs_t)


def conv(d: Any, node: fx.Node, mod: nn.Conv1d) -> Any:
    """Convolution module (also a library's Conv subclass traced as a leaf: TF-"same" padding, weight
    standardisation, whose per-output-row ``gain`` moves with the row; standardisation over a row commutes with
    permuting the row's inputs)."""
    name = str(node.target)
    outs = [f"{name}.{p}" for p in ("weight", "bias", "gain")]
    return _conv(d, node, node.args[0], outs, f"{name}.weight", mod.in_channels, mod.out_channels, mod.groups, name)


def conv_transpose(d: Any, node: fx.Node, mod: nn.ConvTranspose2d) -> Any:
    """Transposed convolution, weight ``(in, out/groups, k...)``: the input channels index axis 0 (role ``in``), a
    new group of ``out_channels`` indexes axis 1 and the bias. Grouped (``groups > 1``): every block shares the
    weight's axis 1, so inputs and outputs stay fixed (exact, not aligned)."""
    name, x = str(node.target), node.args[0]
    lay_in = d.check_channel(node, d.lay(x), 1, flat_ok=True)  # output_size= only picks the output padding
    if mod.groups != 1:
        d.fix(lay_in)
        return FIXED
    if lay_in is not None:
        d.add_inputs(f"{name}.weight", 0, lay_in, x)
    gid = d.new_group(name, mod.out_channels)
    d.add(gid, f"{name}.weight", 1, "out")
    d.add(gid, f"{name}.bias", 0, "out")
    return Layout(1, ((gid, mod.out_channels),))


def functional_conv(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``F.conv1d/2d(x, W, b, stride, padding, dilation, groups)`` with W, b the model's parameters."""
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    g = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    wref, bref = d.lay(w), d.lay(b)
    if not isinstance(wref, ParamRef) or wref.dims[:2] != (0, 1):
        raise d.unsupported(node, "its weight is computed, not a model parameter (wrap the module with a leaf rule)")
    if b is not None and not (isinstance(bref, ParamRef) and bref.dims == (0,)):
        raise d.unsupported(node, "its bias is computed, not a model parameter")
    wv = d.value(w)
    g = int(d.value(g))
    name = wref.key.rsplit(".", 1)[0] if "." in wref.key else wref.key
    outs = [wref.key] + ([bref.key] if b is not None else [])
    return _conv(d, node, node.args[0], outs, wref.key, wv.shape[1] * g, wv.shape[0], g, name)


def norm_rule(params: tuple[str, ...], check_groups: bool = False) -> Rule:
    """Per-channel normalisation module at dim 1 (BatchNorm, InstanceNorm; GroupNorm: see :func:`group_parts`)."""

    def rule(d: Any, node: fx.Node, mod: Any) -> Any:
        lay = d.lay(node.args[0])
        lay_in = d.check_channel(node, lay, 1, flat_ok=not check_groups)  # BN/IN: per (channel, copy) stats
        if lay_in is not None:
            if check_groups:
                lay_in = lay = group_parts(d, node, lay_in, int(mod.num_groups))
            d.add_norm(str(node.target), lay_in, 0, params)
        return lay

    return rule


def group_parts(d: Any, node: fx.Node, lay: Layout, groups: int) -> Layout:
    """GroupNorm with ``G`` groups over ``C`` channels: statistics are per consecutive block of ``C/G`` channels,
    so a permutation is equivariant iff it maps blocks onto blocks: units move within their block, and blocks
    may be reordered as wholes. The channel layout is cut at multiples of ``C/G`` (:func:`segments.cut_at`); where
    each block is then one group of its own, the blocks form a :class:`~fedfuse.align.spec.Blocks` set (as heads
    do); where a block holds several groups (concatenated channels, or a finer GroupNorm on the same units) the
    units only move within their groups, and block sets over those groups are dropped. ``G`` = 1 or ``C``: any
    permutation (the layout is returned unchanged)."""
    width = lay.block
    if groups in (1, width):
        return lay
    out = cut_at(d, lay, range(width // groups, width, width // groups))
    if out is None:
        raise d.unsupported(node, f"its {groups} groups cut channels that are already split otherwise")
    cut = len(out.segs) != len(lay.segs)
    if len(out.segs) == groups and (len(lay.segs) == 1 or not cut):
        d.add_blocks((f"{node.name}.groups",), tuple(g for g, _ in out.segs))
    else:
        d.drop_blocks([g for g, _ in out.segs])
    return out


def layer_norm_module(d: Any, node: fx.Node, mod: nn.LayerNorm) -> Any:
    """LayerNorm over trailing dims: permutation-equivariant; its affine follows the hidden dim if normalised."""
    x = node.args[0]
    lay = d.lay(x)
    if d.is_fixed(lay):
        return lay
    if not isinstance(lay, Layout):
        raise d.unsupported(node)
    start = d.value(x).dim() - len(mod.normalized_shape)
    if lay.dim >= start:
        d.add_norm(str(node.target), lay, lay.dim - start, ("weight", "bias"))
    return lay


def _param_members(d: Any, node: fx.Node, lay: Layout, param_nodes: Sequence[Any], k: int) -> None:
    """Parameters passed as arguments (``ParamRef``): their value axis ``k`` follows the hidden units ``lay``."""
    for p in param_nodes:
        if p is None or d.value(p) is None:
            continue
        ref = d.lay(p)
        if not isinstance(ref, ParamRef) or k >= len(ref.dims) or ref.dims[k] is None:
            raise d.unsupported(node, "its affine parameters/statistics are not model parameters indexed by channel")
        d.add_norm_key(ref.key, lay, ref.dims[k])


def functional_layer_norm(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``F.layer_norm(x, shape, weight, bias)``: as the module; weight/bias are the traced parameters."""
    x = node.args[0]
    lay = d.lay(x)
    if d.is_fixed(lay):
        return FIXED
    if not isinstance(lay, Layout):
        raise d.unsupported(node)
    rank = d.value(x).dim()
    shape = _arg(node, F.layer_norm, "normalized_shape")
    start = rank - len(shape)
    if lay.dim >= start:
        params = [_arg(node, F.layer_norm, "weight"), _arg(node, F.layer_norm, "bias")]
        _param_members(d, node, lay, params, lay.dim - start)
    return lay


def functional_batch_norm(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)``: per-channel at dim 1."""
    x = node.args[0]
    lay = d.check_channel(node, d.lay(x), 1, flat_ok=True)
    if lay is None:
        return FIXED
    names = ("running_mean", "running_var", "weight", "bias")
    _param_members(d, node, lay, [_arg(node, F.batch_norm, n) for n in names], 0)
    return lay


def functional_group_norm(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``F.group_norm(x, num_groups, weight, bias)``: as the module (:func:`group_parts`)."""
    x = node.args[0]
    lay = d.check_channel(node, d.lay(x), 1)
    if lay is None:
        return FIXED
    lay = group_parts(d, node, lay, int(_arg(node, F.group_norm, "num_groups")))
    _param_members(d, node, lay, [_arg(node, F.group_norm, n) for n in ("weight", "bias")], 0)
    return lay


def rnn(d: Any, node: fx.Node, mod: nn.RNNBase) -> Any:
    """RNN/LSTM/GRU: one group per (layer, direction); gate blocks repeat; recurrent columns follow.

    LSTM with ``proj_size = p > 0``: ``h_t = W_hr (o ⊙ tanh c_t)``, so the ``hidden_size`` cell units (gate rows,
    ``W_hr`` columns, ``c_n``) and the ``p`` projected units (``W_hr`` rows, ``W_hh`` columns, the output, ``h_n``,
    the next layer's ``W_ih`` columns) are two groups per (layer, direction)."""
    name = str(node.target)
    if any(not d.is_fixed(d.lay(a)) for a in node.all_input_nodes[1:]):
        raise d.unsupported(node, "initial hidden state computed from hidden units")
    x = node.args[0]
    lay = d.check_channel(node, d.lay(x), d.value(x).dim() - 1, flat_ok=True)
    gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
    dirs = 2 if mod.bidirectional else 1
    h = mod.hidden_size
    p = int(getattr(mod, "proj_size", 0) or 0)
    prev: Layout | None = lay
    prev_node: fx.Node | None = x
    stacked: list[Layout] = []
    cells: list[Layout] = []
    for k in range(mod.num_layers):
        layer: list[tuple[int, int]] = []
        for direction in range(dirs):
            sfx = f"l{k}" + ("_reverse" if direction else "")
            g = d.new_group(f"{name}.{sfx}", h)
            r = d.new_group(f"{name}.{sfx}.proj", p) if p else g  # the units h_t (output, recurrent input)
            if prev is not None:
                if prev_node is not None:
                    d.add_inputs(f"{name}.weight_ih_{sfx}", 1, prev, prev_node)
                else:  # inner layer: the input is not observable as an fx node
                    segs = prev.segs if len(prev.segs) > 1 else None
                    for i, (gp, _) in enumerate(prev.segs):
                        d.add(gp, f"{name}.weight_ih_{sfx}", 1, "in", 1, 1, segs, i)
            for key in (f"weight_ih_{sfx}", f"weight_hh_{sfx}", f"bias_ih_{sfx}", f"bias_hh_{sfx}"):
                d.add(g, f"{name}.{key}", 0, "out", gates)
            d.add(r, f"{name}.weight_hh_{sfx}", 1, "in", 1)
            if p:
                d.add(r, f"{name}.weight_hr_{sfx}", 0, "out")
                d.add(g, f"{name}.weight_hr_{sfx}", 1, "in")
            layer.append((r, p or h))
            stacked.append(Layout(1, ((r, p or h),)))
            cells.append(Layout(1, ((g, h),)))
        prev, prev_node = Layout(2, tuple(layer)), None
    out_val = d.values[node.name][0]
    assert prev is not None
    out_lay = Layout(out_val.dim() - 1, prev.segs)

    def state_layout(items: list[Layout], i: int) -> Any:  # h_n (i = 0) or c_n (i = 1)
        if len(items) > 1:
            return Stacked(tuple(items))
        val = d.values[node.name][1]
        val = val[i] if isinstance(val, tuple) else val
        return Layout(val.dim() - 1, items[0].segs)

    h_lay = state_layout(stacked, 0)
    return (out_lay, (h_lay, state_layout(cells, 1))) if mod.mode == "LSTM" else (out_lay, h_lay)


def flatten_module(d: Any, node: fx.Node, mod: Any) -> Any:
    x = node.args[0]
    return d.reshape(node, d.lay(x), d.value(x).shape, d.values[node.name].shape)
