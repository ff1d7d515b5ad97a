"""Transport specs: a model described as groups of hidden units, derived automatically with ``torch.fx``.

A :class:`Group` is a set of ``n`` hidden units that one transport ``T`` (``n_target × n``) re-indexes.
Each :class:`Axis` member names one ``(parameter/buffer, axis)`` the group indexes:

* ``role="out"``: the unit's own parameters (weight rows, bias, norm affine/running stats) → ``T @ W``;
* ``role="in"``: a consumer's input axis (next layer's columns) → ``W @ Sᵀ`` (see :mod:`.transport`).

An axis of length ``L`` is read as ``(repeat, block, expand)``: ``repeat`` gate blocks (LSTM 4, GRU 3),
``block`` channels and ``expand`` positions per channel (a conv channel flattened over H·W).
When a consumer reads a ``torch.cat`` the block is split in ``segments`` (group names, or ints for
fixed, never-transported chunks such as the model input) and ``index`` says which segment is ours.

Derivation runs the model once through a tracer that records concrete values (so shape-dependent
Python control flow such as ``if x.dim() == 3`` resolves), then propagates a *layout* — which groups
index the channel dimension of every tensor — node by node. Residual ``add`` unions groups
(union-find); the model input and the model output are fixed (never transported).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from fedfuse.errors import ConfigError

__all__ = [
    "Axis",
    "Group",
    "Site",
    "TransportSpec",
    "UnsupportedModelError",
    "derive_spec",
    "trace_values",
    "SUPPORTED",
]


class UnsupportedModelError(ConfigError):
    """The model (or one op/module in its forward) cannot be described by a transport spec."""


SUPPORTED = (
    "Linear, Conv1d/2d (groups=1), BatchNorm1d/2d, LayerNorm, GroupNorm (1 or C groups), RNN/LSTM/GRU, "
    "element-wise activations (ReLU, GELU, Tanh, Sigmoid, ... and functional forms), softmax, Dropout, Identity, "
    "Max/Avg/AdaptiveAvg pooling, flatten/view/reshape, transpose/permute/squeeze/unsqueeze, indexing, "
    "residual add/sub/mul, torch.cat, mean/sum over non-channel dims"
)


@dataclass(frozen=True)
class Axis:
    """One ``(key, axis)`` a group indexes; see the module docstring for ``repeat``/``expand``/``segments``."""

    key: str
    axis: int
    role: Literal["out", "in"] = "out"
    repeat: int = 1
    expand: int = 1
    segments: tuple[str | int, ...] | None = None
    index: int = 0


@dataclass(frozen=True)
class Site:
    """Where a group's activations can be read: fx node ``node``, channel dim ``dim`` (same reading as Axis)."""

    node: str
    dim: int
    expand: int = 1
    segments: tuple[str | int, ...] | None = None
    index: int = 0


@dataclass(frozen=True)
class Group:
    """``size`` hidden units and every parameter axis they index; ``sites`` are activation read-outs."""

    name: str
    size: int
    members: tuple[Axis, ...]
    sites: tuple[Site, ...] = ()


@dataclass(frozen=True)
class TransportSpec:
    """Groups in topological order (shallow → deep). Parameters not listed are never transported."""

    groups: tuple[Group, ...]
    _by_key: dict[str, list[tuple[Group, Axis]]] = field(default=None, repr=False, compare=False)  # type: ignore

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"transport spec has duplicate group names: {names}")
        by_key: dict[str, list[tuple[Group, Axis]]] = {}
        for g in self.groups:
            for m in g.members:
                by_key.setdefault(m.key, []).append((g, m))
        object.__setattr__(self, "_by_key", by_key)

    def __getitem__(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    def members_of(self, key: str) -> list[tuple[Group, Axis]]:
        """Every (group, axis) that indexes parameter ``key`` (empty if the key is never transported)."""
        return self._by_key.get(key, [])

    @property
    def keys(self) -> list[str]:
        return list(self._by_key)

    def resized(self, sizes: dict[str, int]) -> TransportSpec:
        """The same structure with other group widths (e.g. a client of another width)."""
        unknown = set(sizes) - set(self.names)
        if unknown:
            raise ConfigError(f"unknown transport groups {sorted(unknown)}; groups are {self.names}")
        return TransportSpec(tuple(replace(g, size=int(sizes.get(g.name, g.size))) for g in self.groups))

    def sizes_from(self, state: dict[str, torch.Tensor]) -> dict[str, int]:
        """Group widths read off a state dict (from members that own their whole axis); checks consistency."""
        sizes: dict[str, int] = {}
        for g in self.groups:
            for m in g.members:
                if m.key not in state:
                    raise ConfigError(f"state dict has no parameter {m.key!r} required by transport group {g.name!r}")
                shape = state[m.key].shape
                if m.axis >= len(shape):
                    raise ConfigError(
                        f"parameter {m.key!r} has shape {tuple(shape)}; group {g.name!r} indexes axis {m.axis}"
                    )
                if m.segments is None:
                    length = shape[m.axis]
                    if length % (m.repeat * m.expand):
                        raise ConfigError(
                            f"parameter {m.key!r} axis {m.axis} has length {length}, not a multiple of "
                            f"{m.repeat}×{m.expand} as group {g.name!r} requires"
                        )
                    n = length // (m.repeat * m.expand)
                    if sizes.setdefault(g.name, n) != n:
                        raise ConfigError(
                            f"group {g.name!r}: parameter {m.key!r} axis {m.axis} implies width {n}, "
                            f"other members imply {sizes[g.name]}"
                        )
            if g.name not in sizes:
                sizes[g.name] = g.size
        return sizes

    def for_state(self, state: dict[str, torch.Tensor]) -> TransportSpec:
        """This spec resized to the widths of ``state``."""
        return self.resized(self.sizes_from(state))


def segment_range(member: Axis | Site, sizes: dict[str, int], length: int) -> tuple[int, int, int]:
    """``(block, offset, n)``: an axis of ``length`` reads ``(repeat, block, expand)``, ours is ``[offset, +n)``."""
    repeat = member.repeat if isinstance(member, Axis) else 1
    block = length // (repeat * member.expand)
    if member.segments is None:
        return block, 0, block
    widths = [sizes[s] if isinstance(s, str) else int(s) for s in member.segments]
    if sum(widths) != block:
        raise ConfigError(
            f"{getattr(member, 'key', getattr(member, 'node', '?'))}: concatenated segments {member.segments} "
            f"(widths {widths}) do not add up to the axis block {block}"
        )
    return block, sum(widths[: member.index]), widths[member.index]


# --------------------------------------------------------------------------------------------------------------
# Tracing with concrete values
# --------------------------------------------------------------------------------------------------------------


class _ConcreteTracer(fx.Tracer):
    """``fx.Tracer`` that evaluates every node on the example input while tracing.

    The recorded values give shapes for layout propagation and let Python control flow on tensor
    properties (``x.dim()``, ``x.shape``) resolve to the example's branch.
    """

    def __init__(self, inputs: Sequence[Any], module_outputs: dict[str, list[Any]]) -> None:
        super().__init__()
        self.values: dict[str, Any] = {}
        self._inputs = list(inputs)
        self._module_outputs = module_outputs  # leaf-module outputs of an eager run, in call order
        self._calls: dict[str, int] = {}

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[no-untyped-def]
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            return node

        def value(a: Any) -> Any:
            return self.values[a.name]

        args_v = fx.node.map_arg(args, value)
        kwargs_v = fx.node.map_arg(kwargs, value)
        if kind == "placeholder":
            if not self._inputs:
                raise UnsupportedModelError(f"forward argument {target!r} has no example input; pass a tuple")
            self.values[node.name] = self._inputs.pop(0)
        elif kind == "get_attr":
            self.values[node.name] = _lookup(self.root, str(target))
        elif kind == "call_module":
            # Module.__call__/__getattr__ are patched while tracing, so leaf outputs come from an eager run
            k = self._calls.get(str(target), 0)
            self._calls[str(target)] = k + 1
            self.values[node.name] = self._module_outputs[str(target)][k]
        elif kind == "call_function":
            self.values[node.name] = target(*args_v, **kwargs_v)  # type: ignore[operator]
        elif kind == "call_method":
            self.values[node.name] = getattr(args_v[0], str(target))(*args_v[1:], **kwargs_v)
        return node

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.values[obj.node.name])

    def iter(self, obj: fx.Proxy) -> Iterator:  # type: ignore[override]
        return (obj[i] for i in range(len(self.values[obj.node.name])))


def trace_values(model: nn.Module, example_input: Any) -> tuple[fx.Graph, dict[str, Any]]:
    """Trace ``model`` on ``example_input`` (eval mode, no grad): the fx graph and every node's value."""
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    outputs: dict[str, list[Any]] = {}
    hooks = []
    probe = fx.Tracer()
    for name, mod in model.named_modules():
        if name and probe.is_leaf_module(mod, name):
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, []).append(o)))
    tracer = _ConcreteTracer(inputs, outputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
            for h in hooks:
                h.remove()
            graph = tracer.trace(model)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # fx raises many types (TraceError, RuntimeError, TypeError)
        raise UnsupportedModelError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return graph, tracer.values


def _lookup(root: nn.Module, path: str) -> Any:
    """Attribute ``a.b.c`` of ``root`` via ``__dict__`` (the tracer patches ``Module.__getattr__``)."""
    obj: Any = root
    for part in path.split("."):
        if isinstance(obj, nn.Module):
            for store in ("_parameters", "_buffers", "_modules"):
                if part in obj.__dict__.get(store, {}):
                    obj = obj.__dict__[store][part]
                    break
            else:
                obj = object.__getattribute__(obj, part)
        else:
            obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------------------
# Layout propagation
# --------------------------------------------------------------------------------------------------------------

_FIXED_ID = 0


@dataclass(frozen=True)
class _Layout:
    """Channel dim ``dim`` of a tensor is the concatenation of ``segs`` = ((group id, width), ...)."""

    dim: int
    segs: tuple[tuple[int, int], ...]
    expand: int = 1

    @property
    def block(self) -> int:
        return sum(n for _, n in self.segs)


class _Fixed:
    """A tensor whose channels are all fixed (no group); any op on it is allowed."""


_FIXED = _Fixed()


@dataclass(frozen=True)
class _Stacked:
    """``h_n`` of a multi-layer RNN: dim 0 indexes (layer, direction); item i has layout ``items[i]``."""

    items: tuple[_Layout, ...]


_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.ReLU6, nn.Hardtanh,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.SELU, nn.CELU, nn.Softsign, nn.Tanhshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_ACT_FUNCS: set[Any] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.gelu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.leaky_relu,
    F.elu, F.silu, F.softplus, F.relu6, F.hardtanh, F.mish, F.selu, F.celu, F.hardswish, F.hardsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
    operator.neg, torch.neg, torch.abs, torch.clone, torch.exp, torch.square,
}  # fmt: skip
_ACT_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "double",
    "half", "to", "type_as", "neg", "abs", "softmax", "log_softmax", "exp", "square", "cpu", "cuda",
}  # fmt: skip
_BINARY_FUNCS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_POOL_FUNCS: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}  # fmt: skip
_REDUCE = {"mean", "sum", "amax", "amin"}
_CAT_FUNCS: set[Any] = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_RESHAPE_FUNCS: set[Any] = {torch.reshape, torch.flatten}


def _op_name(node: fx.Node, model: nn.Module) -> str:
    """Human-readable name of a node's op, e.g. ``torch.matmul``, ``Tensor.sort``, ``Conv3d module 'c1'``."""
    t = node.target
    if node.op == "call_module":
        return f"{type(model.get_submodule(str(t))).__name__} module '{t}'"
    if node.op == "call_method":
        return f"Tensor.{t}"
    name = getattr(t, "__name__", repr(t))
    for prefix, mod in (("torch", torch), ("torch.nn.functional", F), ("operator", operator)):
        if getattr(mod, name, None) is t:
            return f"{prefix}.{name}"
    return f"{getattr(t, '__module__', '') or ''}.{name}".lstrip(".")


class _Deriver:
    """Walks the traced graph once, creating groups, members, sites and union-find merges."""

    def __init__(self, model: nn.Module, graph: fx.Graph, values: dict[str, Any]) -> None:
        self.model = model
        self.graph = graph
        self.values = values
        self.state_keys = set(model.state_dict().keys())
        self.parent: list[int] = [0]
        self.names: list[str] = ["<fixed>"]
        self.sizes: list[int] = [0]
        self.members: list[tuple[int, Axis, tuple[tuple[int, int], ...] | None]] = []
        self.sites: list[tuple[int, str, _Layout, int]] = []
        self.claims: dict[tuple[str, int, int], int] = {}
        self.env: dict[str, Any] = {}

    # union-find --------------------------------------------------------------------------------------------
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra and rb and self.sizes[ra] != self.sizes[rb]:
            raise UnsupportedModelError(
                f"groups {self.names[ra]!r} ({self.sizes[ra]}) and {self.names[rb]!r} ({self.sizes[rb]}) are joined "
                "element-wise but have different widths"
            )
        lo, hi = min(ra, rb), max(ra, rb)  # the earlier group (or FIXED = 0) becomes the root
        self.parent[hi] = lo

    def new_group(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.names.append(name)
        self.sizes.append(int(size))
        return len(self.parent) - 1

    def is_fixed(self, lay: Any) -> bool:
        if lay is None or lay is _FIXED:
            return True
        if isinstance(lay, _Layout):
            return all(self.find(g) == _FIXED_ID for g, _ in lay.segs)
        if isinstance(lay, _Stacked):
            return all(self.is_fixed(x) for x in lay.items)
        if isinstance(lay, (tuple, list)):
            return all(self.is_fixed(x) for x in lay)
        return True

    def fix(self, lay: Any) -> None:
        if isinstance(lay, _Layout):
            for g, _ in lay.segs:
                self.union(g, _FIXED_ID)
        elif isinstance(lay, _Stacked):
            for x in lay.items:
                self.fix(x)
        elif isinstance(lay, (tuple, list)):
            for x in lay:
                self.fix(x)

    # members -----------------------------------------------------------------------------------------------
    def add(
        self,
        gid: int,
        key: str,
        axis: int,
        role: str,
        repeat: int = 1,
        expand: int = 1,
        segs: tuple[tuple[int, int], ...] | None = None,
        index: int = 0,
    ) -> None:
        if key not in self.state_keys:
            return
        claim = (key, axis, index)
        if claim in self.claims:  # a module called twice: both calls must share one transport
            self.union(self.claims[claim], gid)
            return
        self.claims[claim] = gid
        self.members.append((gid, Axis(key, axis, role, repeat, expand, None, index), segs))  # type: ignore[arg-type]

    def add_inputs(self, key: str, axis: int, lay: Any, node: fx.Node, repeat: int = 1) -> None:
        """Consumer input axis ``axis`` of ``key`` reads tensor ``node`` with layout ``lay``."""
        if not isinstance(lay, _Layout):
            return
        segs = lay.segs if len(lay.segs) > 1 else None
        for i, (g, _) in enumerate(lay.segs):
            self.add(g, key, axis, "in", repeat, lay.expand, segs, i)
            self.sites.append((g, node.name, lay, i))

    # helpers -----------------------------------------------------------------------------------------------
    def unsupported(self, node: fx.Node, why: str = "") -> UnsupportedModelError:
        what = _op_name(node, self.model)
        extra = f" ({why})" if why else ""
        return UnsupportedModelError(
            f"unsupported op '{what}' at node '{node.name}'{extra}; it touches hidden units that would be permuted. "
            f"Supported: {SUPPORTED}. Pass a manual TransportSpec instead."
        )

    def lay(self, a: Any) -> Any:
        return self.env.get(a.name) if isinstance(a, fx.Node) else None

    def value(self, a: Any) -> Any:
        return self.values.get(a.name) if isinstance(a, fx.Node) else a

    def check_channel(self, node: fx.Node, lay: Any, dim: int, flat_ok: bool = False) -> _Layout | None:
        """``lay`` must have its channels at ``dim`` (None: fixed tensor, anything goes)."""
        if self.is_fixed(lay):
            return None
        if isinstance(lay, _Stacked) or not isinstance(lay, _Layout):
            raise self.unsupported(node, "reads a stacked multi-layer RNN state")
        if lay.dim != dim or (lay.expand != 1 and not flat_ok):
            raise self.unsupported(node, f"expects channels at dim {dim}, hidden units are at dim {lay.dim}")
        return lay

    # main loop ---------------------------------------------------------------------------------------------
    def run(self) -> TransportSpec:
        for node in self.graph.nodes:
            if node.op == "output":
                self.fix(self._collect(node.args))  # the model output (classes) is never transported
                continue
            self.env[node.name] = self.visit(node)
        return self.finalise()

    def _collect(self, args: Any) -> list[Any]:
        out: list[Any] = []
        fx.node.map_arg(args, lambda n: out.append(self.env.get(n.name)) or n)
        return out

    def visit(self, node: fx.Node) -> Any:
        val = self.values.get(node.name)
        if node.op == "placeholder":
            return _FIXED
        if node.op == "get_attr":
            return _FIXED if isinstance(val, torch.Tensor) else None
        if not _has_tensor(val):
            return None  # shapes, ints, bools: no constraint
        if node.op == "call_module":
            return self.visit_module(node, self.model.get_submodule(str(node.target)))
        return self.visit_function(node)

    def visit_module(self, node: fx.Node, mod: nn.Module) -> Any:
        name = str(node.target)
        x = node.args[0] if node.args else None
        lay = self.lay(x)
        out = self.values[node.name]
        if isinstance(mod, nn.Linear):
            rank = out.dim()
            lay_in = self.check_channel(node, lay, self.value(x).dim() - 1, flat_ok=True)
            if lay_in is not None:
                self.add_inputs(f"{name}.weight", 1, lay_in, x)
            g = self.new_group(name, mod.out_features)
            self.add(g, f"{name}.weight", 0, "out")
            self.add(g, f"{name}.bias", 0, "out")
            return _Layout(rank - 1, ((g, mod.out_features),))
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            if mod.groups != 1:
                raise self.unsupported(node, f"grouped convolution groups={mod.groups}")
            lay_in = self.check_channel(node, lay, 1)
            if lay_in is not None:
                self.add_inputs(f"{name}.weight", 1, lay_in, x)
            g = self.new_group(name, mod.out_channels)
            self.add(g, f"{name}.weight", 0, "out")
            self.add(g, f"{name}.bias", 0, "out")
            return _Layout(1, ((g, mod.out_channels),))
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            lay_in = self.check_channel(node, lay, 1)
            if lay_in is not None:
                self.add_norm(name, lay_in, 0, ("weight", "bias", "running_mean", "running_var"))
            return lay
        if isinstance(mod, nn.LayerNorm):
            if self.is_fixed(lay):
                return lay
            rank = self.value(x).dim()
            start = rank - len(mod.normalized_shape)
            if not isinstance(lay, _Layout):
                raise self.unsupported(node)
            if lay.dim >= start:
                self.add_norm(name, lay, lay.dim - start, ("weight", "bias"))
            return lay
        if isinstance(mod, nn.GroupNorm):
            lay_in = self.check_channel(node, lay, 1)
            if lay_in is not None:
                if mod.num_groups not in (1, mod.num_channels):
                    raise self.unsupported(
                        node,
                        f"GroupNorm with {mod.num_groups} groups mixes statistics of channel blocks; "
                        "only num_groups=1 or num_groups=num_channels is permutation-equivariant",
                    )
                self.add_norm(name, lay_in, 0, ("weight", "bias"))
            return lay
        if isinstance(mod, _ACT_MODULES):
            return lay
        if isinstance(mod, _POOL_MODULES):
            self.check_channel(node, lay, 1)
            return lay
        if isinstance(mod, nn.Flatten):
            return self.reshape(node, lay, self.value(x).shape, out.shape)
        if isinstance(mod, nn.RNNBase):
            return self.visit_rnn(node, mod, name)
        if all(self.is_fixed(self.lay(a)) for a in node.all_input_nodes):
            return _FIXED
        raise self.unsupported(node)

    def add_norm(self, name: str, lay: _Layout, axis: int, params: tuple[str, ...]) -> None:
        segs = lay.segs if len(lay.segs) > 1 else None
        for p in params:
            for i, (g, _) in enumerate(lay.segs):
                self.add(g, f"{name}.{p}", axis, "out", 1, lay.expand, segs, i)

    def visit_rnn(self, node: fx.Node, mod: nn.RNNBase, name: str) -> Any:
        if getattr(mod, "proj_size", 0):
            raise self.unsupported(node, "LSTM with proj_size > 0")
        if any(not self.is_fixed(self.lay(a)) for a in node.all_input_nodes[1:]):
            raise self.unsupported(node, "initial hidden state computed from hidden units")
        x = node.args[0]
        lay = self.check_channel(node, self.lay(x), self.value(x).dim() - 1, flat_ok=True)
        gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
        dirs = 2 if mod.bidirectional else 1
        h = mod.hidden_size
        prev: _Layout | None = lay
        prev_node: fx.Node | None = x
        stacked: list[_Layout] = []
        for k in range(mod.num_layers):
            layer: list[tuple[int, int]] = []
            for d in range(dirs):
                sfx = f"l{k}" + ("_reverse" if d else "")
                g = self.new_group(f"{name}.{sfx}", h)
                if prev is not None:
                    if prev_node is not None:
                        self.add_inputs(f"{name}.weight_ih_{sfx}", 1, prev, prev_node)
                    else:  # inner layer: the input is not observable as an fx node
                        segs = prev.segs if len(prev.segs) > 1 else None
                        for i, (gp, _) in enumerate(prev.segs):
                            self.add(gp, f"{name}.weight_ih_{sfx}", 1, "in", 1, 1, segs, i)
                for key in (f"weight_ih_{sfx}", f"weight_hh_{sfx}", f"bias_ih_{sfx}", f"bias_hh_{sfx}"):
                    self.add(g, f"{name}.{key}", 0, "out", gates)
                self.add(g, f"{name}.weight_hh_{sfx}", 1, "in", 1)
                layer.append((g, h))
                stacked.append(_Layout(1, ((g, h),)))
            prev, prev_node = _Layout(2, tuple(layer)), None
        out_val = self.values[node.name][0]
        assert prev is not None
        out_lay = _Layout(out_val.dim() - 1, prev.segs)
        h_lay: Any = _Stacked(tuple(stacked))
        if len(stacked) == 1:
            hval = self.values[node.name][1]
            hval = hval[0] if isinstance(hval, tuple) else hval
            h_lay = _Layout(hval.dim() - 1, stacked[0].segs)
        return (out_lay, (h_lay, h_lay)) if mod.mode == "LSTM" else (out_lay, h_lay)

    def visit_function(self, node: fx.Node) -> Any:
        t = node.target
        args = node.args
        first = args[0] if args else None
        lay = self.lay(first)
        out = self.values[node.name]
        is_method = node.op == "call_method"
        # getitem on tuples (RNN outputs) or tensors
        if t is operator.getitem:
            return self.getitem(node, lay, self.value(first), args[1])
        inputs = [self.lay(a) for a in node.all_input_nodes]
        if all(self.is_fixed(x) for x in inputs) and not any(isinstance(x, _Stacked) for x in inputs):
            return _FIXED
        if (is_method and t in _ACT_METHODS) or (not is_method and t in _ACT_FUNCS):
            return lay
        if (is_method and t in _BINARY_METHODS) or (not is_method and t in _BINARY_FUNCS):
            return self.binary(node, args[0], args[1] if len(args) > 1 else node.kwargs.get("other"))
        if not is_method and t in _CAT_FUNCS:
            return self.cat(node)
        if (is_method and t in _RESHAPE_METHODS) or (not is_method and t in _RESHAPE_FUNCS):
            return self.reshape(node, lay, self.value(first).shape, out.shape)
        if not is_method and t in _POOL_FUNCS:
            self.check_channel(node, lay, 1)
            return lay
        if t in ("transpose", "permute", "squeeze", "unsqueeze") or t in (
            torch.transpose,
            torch.permute,
            torch.squeeze,
            torch.unsqueeze,
        ):
            return self.move_dims(node, lay, self.value(first), out, str(getattr(t, "__name__", t)))
        if t in _REDUCE or t in (torch.mean, torch.sum, torch.amax, torch.amin):
            return self.reduce(node, lay, self.value(first))
        raise self.unsupported(node)

    # op rules ----------------------------------------------------------------------------------------------
    def binary(self, node: fx.Node, a: Any, b: Any) -> Any:
        out = self.values[node.name]
        la, lb = self.lay(a), self.lay(b)
        va, vb = self.value(a), self.value(b)
        if not isinstance(vb, torch.Tensor) or lb is None:
            return la
        if not isinstance(va, torch.Tensor) or la is None:
            return lb
        result: Any = None
        for lx, vx, ly, vy in ((la, va, lb, vb), (lb, vb, la, va)):
            if self.is_fixed(lx) or not isinstance(lx, _Layout):
                continue
            dim_out = lx.dim + out.dim() - vx.dim()
            if isinstance(ly, _Layout) and not self.is_fixed(ly) and ly.dim + out.dim() - vy.dim() == dim_out:
                if ly.expand != lx.expand or [n for _, n in ly.segs] != [n for _, n in lx.segs]:
                    raise self.unsupported(node, "operands split hidden units differently")
                for (g1, _), (g2, _) in zip(lx.segs, ly.segs, strict=True):
                    self.union(g1, g2)
            else:
                ydim = dim_out - (out.dim() - vy.dim())
                if ydim >= 0 and vy.shape[ydim] != 1:
                    if isinstance(ly, _Layout) and not self.is_fixed(ly):
                        raise self.unsupported(node, "operands have hidden units on different dims")
                    self.fix(lx)  # combined element-wise with a fixed per-channel tensor: cannot move
            result = replace(lx, dim=dim_out) if result is None else result
        return result if result is not None else _FIXED

    def cat(self, node: fx.Node) -> Any:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = self.values[node.name]
        dim = int(dim) % out.dim()
        lays = [self.lay(t) for t in tensors]  # type: ignore[union-attr]
        vals = [self.value(t) for t in tensors]  # type: ignore[union-attr]
        real = [lay for lay in lays if isinstance(lay, _Layout) and not self.is_fixed(lay)]
        expand = {lay.expand for lay in real}
        if any(lay.dim != dim for lay in real):
            # concatenation along another dim: channels must agree and be joined
            first = real[0]
            for other in real[1:]:
                if other.dim != first.dim or [n for _, n in other.segs] != [n for _, n in first.segs]:
                    raise self.unsupported(node, "concatenates tensors with different hidden layouts")
                for (g1, _), (g2, _) in zip(first.segs, other.segs, strict=True):
                    self.union(g1, g2)
            for lay in lays:
                if not isinstance(lay, _Layout) or self.is_fixed(lay):
                    self.fix(first)
            return first
        if len(expand) > 1:
            raise self.unsupported(node, "concatenates flattened tensors of different spatial sizes")
        exp = expand.pop()
        segs: list[tuple[int, int]] = []
        for lay, v in zip(lays, vals, strict=True):
            if isinstance(lay, _Layout) and not self.is_fixed(lay):
                segs.extend(lay.segs)
            else:
                width = v.shape[dim]
                if width % exp:
                    raise self.unsupported(node, "fixed part is not a whole number of channels")
                segs.append((_FIXED_ID, width // exp))
        return _Layout(dim, tuple(segs), exp)

    def reshape(self, node: fx.Node, lay: Any, in_shape: Sequence[int], out_shape: Sequence[int]) -> Any:
        if self.is_fixed(lay):
            return lay if lay is None else _FIXED
        if not isinstance(lay, _Layout):
            raise self.unsupported(node, "reshapes a stacked RNN state")
        d = lay.dim
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if out_shape[: d + 1] == in_shape[: d + 1] and (lay.expand == 1 or len(in_shape) == d + 1):
            return lay  # only trailing dims change
        if len(out_shape) == d + 1 and out_shape[:d] == in_shape[:d] and out_shape[d] == math.prod(in_shape[d:]):
            return _Layout(d, lay.segs, lay.expand * math.prod(in_shape[d + 1 :]))  # flatten channels × positions
        if (
            len(in_shape) == d + 1
            and out_shape[:d] == in_shape[:d]
            and len(out_shape) > d + 1
            and out_shape[d] == lay.block
            and math.prod(out_shape[d + 1 :]) == lay.expand
        ):
            return _Layout(d, lay.segs, 1)  # unflatten back to channels
        if d == len(in_shape) - 1 and out_shape[-1] == in_shape[-1]:
            return _Layout(len(out_shape) - 1, lay.segs, lay.expand)  # leading dims merged/split
        raise self.unsupported(node, f"reshape {in_shape} -> {out_shape} splits hidden units at dim {d}")

    def move_dims(self, node: fx.Node, lay: Any, x: torch.Tensor, out: torch.Tensor, op: str) -> Any:
        if not isinstance(lay, _Layout):
            raise self.unsupported(node)
        d = lay.dim
        args = [self.value(a) for a in node.args[1:]]
        if op == "transpose":
            a0, a1 = (int(v) % x.dim() for v in args[:2])
            new = a1 if d == a0 else a0 if d == a1 else d
        elif op == "permute":
            perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            new = [int(p) % x.dim() for p in perm].index(d)
        elif op == "unsqueeze":
            k = int(args[0] if args else node.kwargs["dim"]) % out.dim()
            new = d + (1 if k <= d else 0)
        else:  # squeeze
            if x.shape[d] == 1 and out.dim() < x.dim() and (not args or int(args[0]) % x.dim() == d):
                raise self.unsupported(node, "squeezes the hidden-unit dim")
            removed = [i for i in range(x.dim()) if x.shape[i] == 1] if not args else [int(args[0]) % x.dim()]
            removed = [i for i in removed if x.shape[i] == 1] if out.dim() < x.dim() else []
            new = d - sum(1 for i in removed if i < d)
        return replace(lay, dim=new)

    def reduce(self, node: fx.Node, lay: Any, x: torch.Tensor) -> Any:
        if not isinstance(lay, _Layout):
            raise self.unsupported(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        if dims is None:
            return _FIXED
        dims_l = [int(v) % x.dim() for v in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if lay.dim in dims_l:
            return _FIXED  # a sum/mean/max over the units is permutation invariant
        if lay.expand != 1:
            raise self.unsupported(node, "reduces a flattened conv tensor")
        return lay if keep else replace(lay, dim=lay.dim - sum(1 for i in dims_l if i < lay.dim))

    def getitem(self, node: fx.Node, lay: Any, val: Any, idx: Any) -> Any:
        idx = self.value(idx) if isinstance(idx, fx.Node) else idx
        if isinstance(val, (tuple, list)):
            if isinstance(lay, (tuple, list)):
                return lay[idx]
            return _FIXED if lay is _FIXED else None
        if isinstance(lay, _Stacked):
            if isinstance(idx, int):
                return lay.items[idx]
            raise self.unsupported(node, "slices a stacked multi-layer RNN state")
        if self.is_fixed(lay) or not isinstance(val, torch.Tensor):
            return _FIXED if isinstance(self.values[node.name], torch.Tensor) else None
        assert isinstance(lay, _Layout)
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
                if i == lay.dim:
                    raise self.unsupported(node, "selects single hidden units")
                i += 1
            elif isinstance(it, slice):
                if i == lay.dim:
                    if it != slice(None):
                        raise self.unsupported(node, "slices hidden units")
                    new = o
                i, o = i + 1, o + 1
            else:
                raise self.unsupported(node, "advanced indexing of a hidden tensor")
        if new is None:
            new = o + lay.dim - i
        return replace(lay, dim=new)

    # result ------------------------------------------------------------------------------------------------
    def finalise(self) -> TransportSpec:
        roots: dict[int, list[Axis]] = {}
        seen: set[tuple[str, int, int]] = set()

        def seg_names(segs: tuple[tuple[int, int], ...] | None) -> tuple[str | int, ...] | None:
            if segs is None:
                return None
            return tuple(self.names[self.find(g)] if self.find(g) else n for g, n in segs)

        for gid, ax, segs in self.members:
            r = self.find(gid)
            if r == _FIXED_ID or (ax.key, ax.axis, ax.index) in seen:
                continue
            seen.add((ax.key, ax.axis, ax.index))
            roots.setdefault(r, []).append(replace(ax, segments=seg_names(segs)))
        sites: dict[int, list[Site]] = {}
        for gid, node_name, lay, i in self.sites:
            r = self.find(gid)
            if r:
                segs = seg_names(lay.segs) if len(lay.segs) > 1 else None
                site = Site(node_name, lay.dim, lay.expand, segs, i)
                if site not in sites.setdefault(r, []):
                    sites[r].append(site)
        groups = [Group(self.names[r], self.sizes[r], tuple(roots[r]), tuple(sites.get(r, ()))) for r in sorted(roots)]
        return TransportSpec(tuple(groups))


def _has_tensor(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (tuple, list)):
        return any(_has_tensor(v) for v in val)
    return False


def derive_spec(model: nn.Module, example_input: Any) -> TransportSpec:
    """Derive the transport spec of ``model`` by tracing it on ``example_input`` (a batch, ≥ 1 sample).

    Raises :class:`UnsupportedModelError` naming the first op/module that touches hidden units in a
    way a permutation of those units would not commute with.
    """
    if example_input is None:
        raise ConfigError("derive_spec needs example_input (a small input batch) or pass spec= explicitly")
    graph, values = trace_values(model, example_input)
    return _Deriver(model, graph, values).run()
