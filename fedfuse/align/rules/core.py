"""Derivation rules — layouts and rule tables: how each module type / function / tensor method maps hidden-unit
groups from inputs to outputs.

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
``F.pad``) need no entry of their own; timm's ``Attention`` (units permuted inside heads, heads reordered as
blocks)/Swin ``WindowAttention`` (per-head position bias: heads kept in place) and
its same-padding / weight-standardised convs are leaf rules.

Exactness notes (a rule never claims a symmetry the op does not have):

* depthwise conv (``groups == in_channels``): output channel ``c·m + k`` depends on input channel ``c``
  only, so the output joins the input's groups (``expand = m`` for a channel multiplier ``m``);
* grouped conv with ``1 < groups < in_channels``: the weight's input axis is shared by all blocks, so an
  input permutation is exact only if it is the *same* within-block permutation for every block; we do
  the simple exact thing: the input channels stay fixed and the output channels permute within each
  block (``groups`` groups of ``out/groups`` units);
* multi-head attention: per head, the query/key dims permute jointly (the score ``q·k`` is a sum over
  them) and the value dims permute jointly with the output projection's columns; units of different heads are
  never mixed, but whole heads are reordered (q, k, v rows and output columns of head ``σ(h)`` to head ``h``) where
  nothing tells heads apart (no per-head parameter, position bias or mask): ``d.add_blocks`` declares the head set
  (:class:`~fedfuse.align.spec.Blocks`, solved two-level by :mod:`fedfuse.align.heads`); the residual stream
  (input/output width) is one group;
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "has_module_rule",
    "FIXED",
    "FIXED_ID",
    "Layout",
    "ParamRef",
    "Rule",
    "Stacked",
    "is_leaf",
    "lookup_rule",
    "register_leaf_rule",
    "register_rule",
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


def has_module_rule(module: nn.Module) -> bool:
    """Whether ``module``'s class (or a base class) has a module rule (:func:`register_rule`)."""
    return any(cls in MODULE_RULES for cls in type(module).__mro__)


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


def _matched(d: Any, la: Any, lb: Any) -> bool:
    """Join two layouts that must move together; fix both if their segment structures differ."""
    if not (isinstance(la, Layout) and isinstance(lb, Layout)):
        return False
    if la.expand != 1 or lb.expand != 1 or [n for _, n in la.segs] != [n for _, n in lb.segs]:
        return False
    for (g1, _), (g2, _) in zip(la.segs, lb.segs, strict=True):
        d.union(g1, g2)
    return True
