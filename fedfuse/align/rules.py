"""Derivation rules: how each module type / function / tensor method maps hidden-unit groups from inputs to outputs.

A traced tensor carries a *layout*: :class:`Layout` (dim ``dim`` is the concatenation of ``segs`` =
``((group id, width), ...)``, each channel spread over ``expand`` positions), :data:`FIXED` (no hidden
units), :class:`Stacked` (a multi-layer RNN state) or :class:`ParamRef` (a parameter/buffer of the model,
possibly broadcast: it becomes a member of whatever group it is combined with).

A rule is ``rule(d, node, module) -> layout of the node's output``; ``d`` is the deriver (see
``fedfuse.align.spec._Deriver``: ``d.lay(arg)``, ``d.value(arg)``, ``d.new_group``, ``d.add``,
``d.add_inputs``, ``d.union``, ``d.fix``, ``d.unsupported``). Rules live in three tables, looked up by
module type (through the MRO), function object (or its qualified name) and ``Tensor`` method name.
Adding an op is one entry::

    register_rule(torch.erf, elementwise)          # channel-wise ops keep the layout
    register_rule(MyNorm, norm_rule(("weight", "bias")))
    register_leaf_rule("mylib.layers.MyAttention", qkv_attention_module)  # a library block as one op

A module class outside ``torch.nn`` is traced through (its ops meet these tables) unless it has a leaf rule;
model libraries' helpers met so far (timm: ``Linear`` → ``F.linear``, ``BatchNormAct2d`` → ``F.batch_norm``,
``LayerNorm2d`` → permute + ``F.layer_norm``, ``DropPath``/``LayerScale`` → ``mul``/``addcmul``, ``pad_same`` →
``F.pad``) need no entry of their own; timm's ``Attention``/Swin ``WindowAttention`` (heads permuted inside) and
its same-padding / weight-standardised convs are leaf rules.

Exactness notes (a rule never claims a symmetry the op does not have):

* depthwise conv (``groups == in_channels``): output channel ``c·m + k`` depends on input channel ``c``
  only, so the output joins the input's groups (``expand = m`` for a channel multiplier ``m``);
* grouped conv with ``1 < groups < in_channels``: the weight's input axis is shared by all blocks, so an
  input permutation is exact only if it is the *same* within-block permutation for every block; we do
  the simple exact thing: the input channels stay fixed and the output channels permute within each
  block (``groups`` groups of ``out/groups`` units);
* multi-head attention: per head, the query/key dims permute jointly (the score ``q·k`` is a sum over
  them) and the value dims permute jointly with the output projection's columns; heads are never mixed
  (head *reordering* is not used); the residual stream (input/output width) is one group;
* a Linear applied to a dim other than the hidden one (MLP-Mixer token mixing) keeps the layout; its
  own units stay fixed.
* a module registered under two names (a shared/tied parameter has several state-dict keys): every key moves;
* ``a @ b``: the contracted dim is a sum over units, exact when both sides move jointly (joined), else fixed;
  a batch dim moves only with the other operand's same dim; ``scaled_dot_product_attention`` likewise (q, k
  joined on the head dim, v's head dim indexes the output);
* a reshape, chunk/split or slice that cuts through a group (a channel shuffle, a q/k/v split of one
  projection, a slice of some channels) fixes the groups it cuts: exact, but those units are not aligned.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "FIXED",
    "FIXED_ID",
    "Layout",
    "ParamRef",
    "Rule",
    "Stacked",
    "elementwise",
    "is_leaf",
    "lookup_rule",
    "norm_rule",
    "register_leaf_rule",
    "register_rule",
    "supported_summary",
]

FIXED_ID = 0


@dataclass(frozen=True)
class Layout:
    """Channel dim ``dim`` of a tensor is the concatenation of ``segs`` = ((group id, width), ...)."""

    dim: int
    segs: tuple[tuple[int, int], ...]
    expand: int = 1

    @property
    def block(self) -> int:
        return sum(n for _, n in self.segs)


class _Fixed:
    """A tensor whose channels are all fixed (no group); any op on it is allowed."""

    def __repr__(self) -> str:
        return "FIXED"


FIXED = _Fixed()


@dataclass(frozen=True)
class Stacked:
    """``h_n`` of a multi-layer RNN: dim 0 indexes (layer, direction); item i has layout ``items[i]``."""

    items: tuple[Layout, ...]


@dataclass(frozen=True)
class ParamRef:
    """A model parameter/buffer ``key``; ``dims[i]`` is the parameter axis that value dim ``i`` comes from."""

    key: str
    dims: tuple[int | None, ...]


Rule = Callable[[Any, fx.Node, "nn.Module | None"], Any]

MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}
LEAF_RULES: dict[str, Rule] = {}  # "module.QualName" of a class -> rule; such modules are traced as one node


def register_rule(target: type | Callable[..., Any] | str, rule: Rule) -> None:
    """Register ``rule`` for a module class, a function (object or ``"module.qualname"``), or a method name."""
    if isinstance(target, type) and issubclass(target, nn.Module):
        MODULE_RULES[target] = rule
    elif isinstance(target, str) and "." not in target:
        METHOD_RULES[target] = rule
    else:
        FUNCTION_RULES[target] = rule


def register_leaf_rule(cls: type | str, rule: Rule) -> None:
    """Treat modules of exactly class ``cls`` (a class or ``"package.module.Class"``, so the package need not be
    importable) as one op described by ``rule``: their forward is not traced (e.g. a library's attention block).
    Subclasses are not matched: they may change the forward."""
    LEAF_RULES[cls if isinstance(cls, str) else _qualname(cls)] = rule


def is_leaf(module: nn.Module) -> bool:
    """Whether ``module`` has a leaf rule (see :func:`register_leaf_rule`)."""
    return _qualname(type(module)) in LEAF_RULES


def _qualname(t: Any) -> str:
    return f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', getattr(t, '__name__', ''))}"


def lookup_rule(node: fx.Node, module: nn.Module | None) -> Rule | None:
    """The rule for ``node`` (None if no table has one)."""
    if node.op == "call_module" and module is not None:
        leaf = LEAF_RULES.get(_qualname(type(module)))
        if leaf is not None:
            return leaf
        for cls in type(module).__mro__:
            if cls in MODULE_RULES:
                return MODULE_RULES[cls]
        return None
    if node.op == "call_method":
        return METHOD_RULES.get(str(node.target))
    t = node.target
    try:
        hit = FUNCTION_RULES.get(t)
    except TypeError:  # unhashable target
        hit = None
    return hit if hit is not None else FUNCTION_RULES.get(_qualname(t))


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
    """Per-channel normalisation module at dim 1 (BatchNorm, InstanceNorm, GroupNorm with 1 or C groups)."""

    def rule(d: Any, node: fx.Node, mod: Any) -> Any:
        lay = d.lay(node.args[0])
        lay_in = d.check_channel(node, lay, 1, flat_ok=not check_groups)  # BN/IN: per (channel, copy) stats
        if lay_in is not None:
            if check_groups and mod.num_groups not in (1, mod.num_channels):
                raise d.unsupported(
                    node,
                    f"GroupNorm with {mod.num_groups} groups mixes statistics of channel blocks; "
                    "only num_groups=1 or num_groups=num_channels is permutation-equivariant",
                )
            d.add_norm(str(node.target), lay_in, 0, params)
        return lay

    return rule


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


# positional parameters of builtins that ``inspect.signature`` cannot read
_BUILTIN_PARAMS: dict[Any, tuple[str, ...]] = {F.linear: ("input", "weight", "bias")}


def _arg(node: fx.Node, fn: Callable[..., Any], name: str) -> Any:
    """Argument ``name`` of a call to ``fn`` (positional or keyword)."""
    if fn in _BUILTIN_PARAMS:
        names = _BUILTIN_PARAMS[fn]
        i = names.index(name)
        return node.args[i] if i < len(node.args) else node.kwargs.get(name)
    try:
        bound = inspect.signature(fn).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return node.kwargs.get(name)
    return bound.arguments.get(name)


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
    x = node.args[0]
    lay = d.check_channel(node, d.lay(x), 1)
    if lay is None:
        return FIXED
    groups = int(_arg(node, F.group_norm, "num_groups"))
    if groups not in (1, lay.block * lay.expand):
        raise d.unsupported(node, f"group_norm with {groups} groups mixes statistics of channel blocks")
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


def _attention_groups(d: Any, name: str, heads: int, width: int) -> tuple[tuple, tuple]:
    """Per head: a q/k group and a v group of ``width / heads`` dims; the qkv rows' segments."""
    hd = width // heads
    qk = tuple((d.new_group(f"{name}.qk{h}", hd), hd) for h in range(heads))
    v = tuple((d.new_group(f"{name}.v{h}", hd), hd) for h in range(heads))
    return qk + qk + v, v


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
) -> Layout:
    """Members of one attention op; ``keys``: qkv_weight, qkv_bias, proj_weight, proj_bias state keys;
    ``width`` = heads × head dim, ``out_width`` the output projection's (default ``width``)."""
    out_width = width if out_width is None else out_width
    rows, v = _attention_groups(d, name, heads, width)
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
    relative position bias and shift mask are added to the scores). Heads as in :func:`multihead_attention`.
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
        return _attention_members(d, node, x, lay, keys, heads, width, name, mod.proj.out_features)
    for lin in ("qkv", "gate"):
        if isinstance(getattr(mod, lin, None), nn.Linear) and lay_in is not None:
            d.add_inputs(f"{name}.{lin}.weight", 1, lay_in, x)
    out = d.new_group(f"{name}.proj", mod.proj.out_features)
    d.add(out, keys["proj_weight"], 0, "out")
    if keys["proj_bias"] is not None:
        d.add(out, keys["proj_bias"], 0, "out")
    return Layout(rank - 1, ((out, mod.proj.out_features),))


def multihead_attention(d: Any, node: fx.Node, mod: nn.MultiheadAttention) -> Any:
    """``nn.MultiheadAttention`` used as self-attention (query = key = value)."""
    name = str(node.target)
    args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value")][len(node.args) :]
    q, k, v = args[:3]
    lay = d.lay(q)
    if not (q is k is v):
        raise d.unsupported(node, "attention with different query/key/value tensors (only self-attention)")
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        raise d.unsupported(node, "MultiheadAttention with kdim/vdim, bias_k/bias_v or add_zero_attn")
    rank = d.value(q).dim()
    lay_in = d.check_channel(node, lay, rank - 1)
    if lay_in is None:
        lay_in = Layout(rank - 1, ((FIXED_ID, mod.embed_dim),))
    keys = {
        "qkv_weight": f"{name}.in_proj_weight",
        "qkv_bias": f"{name}.in_proj_bias" if mod.in_proj_bias is not None else None,
        "proj_weight": f"{name}.out_proj.weight",
        "proj_bias": f"{name}.out_proj.bias" if mod.out_proj.bias is not None else None,
    }
    out = _attention_members(d, node, q, lay_in, keys, mod.num_heads, mod.embed_dim, name)
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


def flatten_module(d: Any, node: fx.Node, mod: Any) -> Any:
    x = node.args[0]
    return d.reshape(node, d.lay(x), d.value(x).shape, d.values[node.name].shape)


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


def move_dims(op: str) -> Rule:
    """transpose / permute / squeeze / unsqueeze / movedim: the hidden dim moves with its axis."""

    def rule(d: Any, node: fx.Node, mod: Any = None) -> Any:
        lay = d.lay(node.args[0])
        x, out = d.value(node.args[0]), d.values[node.name]
        if d.is_fixed(lay):
            return FIXED
        if not isinstance(lay, Layout):
            raise d.unsupported(node)
        dd = lay.dim
        args = [d.value(a) for a in node.args[1:]]
        if op == "transpose":
            a0, a1 = (int(v) % x.dim() for v in (args[:2] or [node.kwargs["dim0"], node.kwargs["dim1"]]))
            new = a1 if dd == a0 else a0 if dd == a1 else dd
        elif op == "permute":
            perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            if not perm:
                perm = d.value(node.kwargs.get("dims"))
            new = [int(p) % x.dim() for p in perm].index(dd)
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
            raise d.unsupported(node, "advanced indexing of a hidden tensor")
    if new is None:
        new = o + lay.dim - i
    return replace(lay, dim=new)


def split(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """chunk/split: along another dim every piece keeps the layout; along the hidden dim a piece that is whole
    segments keeps them, otherwise the units are fixed (a cut through one group cannot follow a permutation)."""
    x = node.args[0]
    lay, pieces = d.lay(x), d.values[node.name]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = int(d.value(dim)) % d.value(x).dim()
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return tuple(FIXED for _ in pieces)
    if dim != lay.dim:
        return tuple(lay for _ in pieces)
    out, segs = [], list(lay.segs)
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
    """``F.pad(x, pad)``: pads the last ``len(pad)/2`` dims; padding the hidden dim itself fixes its units."""
    x = node.args[0]
    lay = d.lay(x)
    if d.is_fixed(lay) or not isinstance(lay, Layout):
        return FIXED
    amounts = d.value(_arg(node, F.pad, "pad"))
    rank = d.value(x).dim()
    for i in range(len(amounts) // 2):
        if rank - 1 - i == lay.dim and (amounts[2 * i] or amounts[2 * i + 1]):
            d.fix(lay)
            return FIXED
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


def _matched(d: Any, la: Any, lb: Any) -> bool:
    """Join two layouts that must move together; fix both if their segment structures differ."""
    if not (isinstance(la, Layout) and isinstance(lb, Layout)):
        return False
    if la.expand != 1 or lb.expand != 1 or [n for _, n in la.segs] != [n for _, n in lb.segs]:
        return False
    for (g1, _), (g2, _) in zip(la.segs, lb.segs, strict=True):
        d.union(g1, g2)
    return True


def matmul(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``a @ b`` (batched): a's rows and b's columns index the output; the contracted dim (a's last, b's
    second-last) is a sum over units, invariant when both sides move jointly (joined), else fixed; a batch dim
    carries units only if the other operand moves with it (joined) or broadcasts (size 1)."""
    a, b = node.args[:2]
    la, lb = d.lay(a), d.lay(b)
    va, vb, out = d.value(a), d.value(b), d.values[node.name]
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


# --------------------------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------------------------

_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.ReLU6, nn.Hardtanh,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.SELU, nn.CELU, nn.Softsign, nn.Tanhshrink, nn.PReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_ACT_FUNCS: tuple[Any, ...] = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.gelu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.leaky_relu,
    F.elu, F.silu, F.softplus, F.relu6, F.hardtanh, F.mish, F.selu, F.celu, F.hardswish, F.hardsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
    operator.neg, torch.neg, torch.abs, torch.clone, torch.exp, torch.square, torch.erf, torch.sqrt, torch.rsqrt,
    "torchvision.ops.stochastic_depth.stochastic_depth",
)  # fmt: skip
_ACT_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "double",
    "half", "to", "type_as", "neg", "abs", "softmax", "log_softmax", "exp", "square", "cpu", "cuda", "sqrt",
)  # fmt: skip
_BINARY: tuple[Any, ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
)  # fmt: skip
_POOL_FUNCS: tuple[Any, ...] = (
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d,
)  # fmt: skip

for _t in _ACT_MODULES:
    register_rule(_t, elementwise)
for _t in _POOL_MODULES:
    register_rule(_t, pool)
for _t in (*_ACT_FUNCS, *_ACT_METHODS):
    register_rule(_t, elementwise)
for _t in _BINARY:
    register_rule(_t, binary)
for _t in _POOL_FUNCS:
    register_rule(_t, pool)
for _t in (torch.cat, torch.concat, torch.concatenate):
    register_rule(_t, cat)
for _t in ("view", "reshape", "flatten", "view_as", "reshape_as", torch.reshape, torch.flatten):
    register_rule(_t, reshape)
for _op in ("transpose", "permute", "squeeze", "unsqueeze"):
    register_rule(_op, move_dims(_op))
    register_rule(getattr(torch, _op), move_dims(_op))
for _t in ("swapaxes", "swapdims", torch.swapaxes, torch.swapdims):
    register_rule(_t, move_dims("transpose"))
for _t in ("mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin):
    register_rule(_t, reduce)
register_rule(operator.getitem, getitem)
for _t in ("chunk", "split", torch.chunk, torch.split):
    register_rule(_t, split)
register_rule("expand", expand_method)
register_rule(F.interpolate, interpolate)
register_rule(nn.Upsample, interpolate)
register_rule(F.linear, functional_linear)
register_rule(F.pad, pad)
register_rule(torch.roll, roll)
register_rule("repeat", repeat)
for _t in ("repeat_interleave", torch.repeat_interleave):
    register_rule(_t, repeat_interleave)
register_rule(torch.stack, stack)
register_rule(nn.Unfold, unfold)
register_rule(getattr, getattr_rule)
for _t in ("max", "min", torch.max, torch.min):
    register_rule(_t, max_min)
register_rule(F.unfold, unfold)
for _t in (F.conv1d, F.conv2d):
    register_rule(_t, functional_conv)
for _t in ("Conv2dSame", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
    _mod = "conv2d_same" if _t == "Conv2dSame" else "std_conv"
    register_leaf_rule(f"timm.layers.{_mod}.{_t}", conv)  # a Conv2d whose forward pads or standardises its weight
register_rule("roll", roll)
for _t in (torch.addcmul, torch.addcdiv, "addcmul", "addcdiv"):
    register_rule(_t, addcmul)
for _t in ("norm", torch.norm, torch.linalg.vector_norm):
    register_rule(_t, vector_norm)
for _t in (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"):
    register_rule(_t, matmul)
register_rule(F.scaled_dot_product_attention, scaled_dot_product_attention)
register_leaf_rule("timm.layers.attention.Attention", qkv_attention_module)
register_leaf_rule("timm.models.swin_transformer.WindowAttention", qkv_attention_module)
register_rule(nn.Linear, linear)
register_rule(nn.Conv1d, conv)
register_rule(nn.Conv2d, conv)
register_rule(nn.modules.batchnorm._BatchNorm, norm_rule(("weight", "bias", "running_mean", "running_var")))
register_rule(nn.modules.instancenorm._InstanceNorm, norm_rule(("weight", "bias", "running_mean", "running_var")))
register_rule(nn.GroupNorm, norm_rule(("weight", "bias"), check_groups=True))
register_rule(nn.LayerNorm, layer_norm_module)
register_rule(nn.Flatten, flatten_module)
register_rule(nn.RNNBase, rnn)
register_rule(nn.MultiheadAttention, multihead_attention)
register_rule(F.layer_norm, functional_layer_norm)
register_rule(F.batch_norm, functional_batch_norm)
register_rule(F.group_norm, functional_group_norm)
register_rule("torchvision.models.swin_transformer.shifted_window_attention", shifted_window_attention)
register_rule("torchvision.models.swin_transformer._get_relative_position_bias", fixed_output)
register_rule("torchvision.models.swin_transformer._patch_merging_pad", patch_merging)


def supported_summary() -> str:
    """One line naming what the tables cover (for error messages)."""
    return (
        "Linear, Conv1d/2d (incl. depthwise/grouped), BatchNorm/InstanceNorm, LayerNorm, GroupNorm (1 or C groups), "
        "functional layer_norm/batch_norm/group_norm, RNN/LSTM/GRU, MultiheadAttention (self-attention), "
        "Swin window attention, element-wise activations, pooling (incl. adaptive), flatten/view/reshape anywhere, "
        "transpose/permute/squeeze/unsqueeze/expand, indexing, residual add/sub/mul, addcmul, layer scale, torch.cat, "
        "F.pad, matmul, scaled_dot_product_attention, mean/sum/norm over non-channel dims; "
        "add one with fedfuse.align.rules.register_rule"
    )
