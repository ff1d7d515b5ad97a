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
(union-find); the model input and the model output are fixed (never transported). What each op does to
the layout is data: the rule tables of :mod:`fedfuse.align.rules` (one entry per module type, function or
tensor method). A hand-written spec can be given as rows ``(param, axis) -> group``
(:meth:`TransportSpec.from_rows`).
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fedfuse.align.rules import FIXED, FIXED_ID, Layout, ParamRef, Stacked, lookup_rule, supported_summary
from fedfuse.align.rules.params import parametrized_weights, tie_constraints
from fedfuse.align.rules.segments import expand_layout, expand_member, union_parts
from fedfuse.align.spec_types import Axis, Blocks, Group, Site, TransportSpec, segment_range
from fedfuse.align.tracing import UnsupportedModelError, trace_values
from fedfuse.errors import ConfigError

__all__ = [
    "Axis",
    "Blocks",
    "Group",
    "Site",
    "TransportSpec",
    "UnsupportedModelError",
    "segment_range",
    "derive_spec",
    "trace_values",
    "SUPPORTED",
]


SUPPORTED = supported_summary()

# Whole-model derivations tried before tracing (a model kind whose spec is not a walk of its ops): each returns a
# spec or None. fedfuse.align.peft_lora registers the PEFT LoRA one (imported with fedfuse.align).
_DERIVED_ON: OrderedDict[TransportSpec, Any] = OrderedDict()  # spec -> the input derive_spec traced (LRU)
MODEL_SPECS: list[Callable[[nn.Module], TransportSpec | None]] = []
# Run on every derived spec with head sets; fedfuse.align.heads registers the one that keeps the expressible ones.
BLOCK_CHECKS: list[Callable[[TransportSpec], TransportSpec]] = []


# Layout propagation: a walk over the graph; what each op does comes from the tables in fedfuse.align.rules
# --------------------------------------------------------------------------------------------------------------


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
        state = model.state_dict(keep_vars=True)
        self.state_keys = set(state)
        by_tensor: dict[int, list[str]] = {}
        for key, t in state.items():
            by_tensor.setdefault(id(t), []).append(key)
        # a module registered under two names (CoaT's shared conv position encoding, tied embeddings) appears under
        # each name in the state dict: every alias must move with the name fx traces, or loading re-binds it
        self.aliases = {k: [a for a in keys if a != k] for keys in by_tensor.values() for k in keys if len(keys) > 1}
        self.state = state
        self.reparam = parametrized_weights(model)  # "fc.weight" of a parametrized layer -> its originals
        self.direct: set[tuple[str, int]] = set()  # (key, axis) a rule claimed under this very name
        self.used: set[str] = set()  # keys whose module ran (or that were read) in the graph
        self.parts: dict[int, tuple[tuple[int, int], ...]] = {}  # root -> consecutive parts (rules.segments)
        self.touched: set[str] = set()  # keys a rule mentioned
        self.parent: list[int] = [0]
        self.names: list[str] = ["<fixed>"]
        self.sizes: list[int] = [0]
        self.members: list[tuple[int, Axis, tuple[tuple[int, int], ...] | None]] = []
        self.sites: list[tuple[int, str, Layout, int]] = []
        self.claims: dict[tuple[str, int, int], int] = {}
        self.env: dict[str, Any] = {}
        self.blocks: list[tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]] = []  # head sets (add_blocks)

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
        if self.parts:
            union_parts(self, ra, rb, lo)

    def new_group(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.names.append(name)
        self.sizes.append(int(size))
        return len(self.parent) - 1

    def is_fixed(self, lay: Any) -> bool:
        if lay is None or lay is FIXED or isinstance(lay, ParamRef):
            return True
        if isinstance(lay, Layout):
            return all(self.find(g) == FIXED_ID for g, _ in lay.segs)
        if isinstance(lay, Stacked):
            return all(self.is_fixed(x) for x in lay.items)
        if isinstance(lay, (tuple, list)):
            return all(self.is_fixed(x) for x in lay)
        return True

    def fix(self, lay: Any) -> None:
        if isinstance(lay, Layout):
            for g, _ in lay.segs:
                self.union(g, FIXED_ID)
        elif isinstance(lay, Stacked):
            for x in lay.items:
                self.fix(x)
        elif isinstance(lay, (tuple, list)):
            for x in lay:
                self.fix(x)

    def add_blocks(self, names: tuple[str, ...], *slots: tuple[int, ...]) -> None:
        """Groups ``slots[k][h]`` are head ``h``'s units of slot ``k``; heads may also be reordered as whole blocks
        (:class:`Blocks`; a set that unions, fixing or the segments' layout make inexpressible is dropped)."""
        if len(slots[0]) > 1:
            self.blocks.append((names, tuple(slots)))

    def drop_blocks(self, gids: Sequence[int]) -> None:
        """Forget the block sets that hold any of ``gids`` (their units may no longer move as whole blocks)."""
        roots = {self.find(g) for g in gids} - {FIXED_ID}
        self.blocks = [(n, s) for n, s in self.blocks if not roots & {self.find(g) for slot in s for g in slot}]

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
        direct: bool = True,
    ) -> None:
        """Group ``gid`` indexes axis ``axis`` of state entry ``key`` (ignored if ``key`` is not in the state; a
        parametrized weight's axis becomes its originals', see :mod:`fedfuse.align.rules.params`)."""
        if key not in self.state_keys:
            redirect = self.reparam.get(key)
            if isinstance(redirect, str):
                raise UnsupportedModelError(redirect)
            if redirect is not None:
                try:
                    targets = redirect(axis)
                except ValueError as exc:
                    raise UnsupportedModelError(str(exc)) from exc
                for k, a, e in targets:
                    self.add(gid, k, a, role, repeat, expand * e, segs, index)
                    base = k.rsplit(".", 2 if k.endswith(("._u", "._v")) else 1)[0] + "."
                    self.touched.update(t for t in self.state_keys if t.startswith(base))
            return
        self.touched.add(key)
        if direct:
            self.direct.add((key, axis))
        claim = (key, axis, index)
        if claim in self.claims:  # a module called twice: both calls must share one transport
            self.union(self.claims[claim], gid)
            return
        self.claims[claim] = gid
        self.members.append((gid, Axis(key, axis, role, repeat, expand, None, index), segs))  # type: ignore[arg-type]
        for alias in self.aliases.get(key, ()):
            self.add(gid, alias, axis, role, repeat, expand, segs, index, direct=False)

    def add_inputs(self, key: str, axis: int, lay: Any, node: fx.Node, repeat: int = 1) -> None:
        """Consumer input axis ``axis`` of ``key`` reads tensor ``node`` with layout ``lay``."""
        if not isinstance(lay, Layout):
            return
        segs = lay.segs if len(lay.segs) > 1 else None
        for i, (g, _) in enumerate(lay.segs):
            self.add(g, key, axis, "in", repeat, lay.expand, segs, i)
            self.sites.append((g, node.name, lay, i))

    def add_norm_key(self, key: str, lay: Layout, axis: int) -> None:
        """A per-unit parameter/statistic ``key`` whose ``axis`` follows the units of ``lay`` (role out)."""
        segs = lay.segs if len(lay.segs) > 1 else None
        for i, (g, _) in enumerate(lay.segs):
            self.add(g, key, axis, "out", 1, lay.expand, segs, i)

    def add_norm(self, name: str, lay: Layout, axis: int, params: tuple[str, ...]) -> None:
        for p in params:
            self.add_norm_key(f"{name}.{p}", lay, axis)

    # helpers -----------------------------------------------------------------------------------------------
    def unsupported(self, node: fx.Node, why: str = "") -> UnsupportedModelError:
        what = _op_name(node, self.model)
        extra = f" ({why})" if why else ""
        return UnsupportedModelError(
            f"unsupported op '{what}' at node '{node.name}'{extra}; it touches hidden units that would be permuted. "
            f"Supported: {SUPPORTED}. Pass a manual TransportSpec instead."
        )

    def lay(self, a: Any) -> Any:
        return expand_layout(self, self.env.get(a.name)) if isinstance(a, fx.Node) else None

    def value(self, a: Any) -> Any:
        return self.values.get(a.name) if isinstance(a, fx.Node) else a

    def check_channel(self, node: fx.Node, lay: Any, dim: int, flat_ok: bool = False) -> Layout | None:
        """``lay`` must have its channels at ``dim`` (None: fixed tensor, anything goes)."""
        if self.is_fixed(lay):
            return None
        if isinstance(lay, Stacked) or not isinstance(lay, Layout):
            raise self.unsupported(node, "reads a stacked multi-layer RNN state")
        if lay.dim != dim:
            raise self.unsupported(node, f"expects channels at dim {dim}, hidden units are at dim {lay.dim}")
        if lay.expand != 1 and not flat_ok:
            raise self.unsupported(node, f"expects channels at dim {dim}, each hidden unit there spans {lay.expand}")
        return lay

    def reshape(self, node: fx.Node, lay: Any, in_shape: Sequence[int], out_shape: Sequence[int]) -> Any:
        """view/reshape/flatten: trailing dims may change; channels × positions may flatten and unflatten."""
        if self.is_fixed(lay):
            return FIXED
        if not isinstance(lay, Layout):
            raise self.unsupported(node, "reshapes a stacked RNN state")
        d = lay.dim
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if out_shape[: d + 1] == in_shape[: d + 1] and (lay.expand == 1 or len(in_shape) == d + 1):
            return lay  # only trailing dims change
        if len(out_shape) == d + 1 and out_shape[:d] == in_shape[:d] and out_shape[d] == math.prod(in_shape[d:]):
            return Layout(d, lay.segs, lay.expand * math.prod(in_shape[d + 1 :]))  # flatten channels × positions
        if (
            len(in_shape) == d + 1
            and out_shape[:d] == in_shape[:d]
            and len(out_shape) > d + 1
            and out_shape[d] == lay.block
            and math.prod(out_shape[d + 1 :]) == lay.expand
        ):
            return Layout(d, lay.segs, 1)  # unflatten back to channels
        if out_shape[d - len(in_shape) :] == in_shape[d:] and math.prod(out_shape) == math.prod(in_shape):
            return Layout(len(out_shape) - len(in_shape) + d, lay.segs, lay.expand)  # leading dims merged/split
        self.fix(lay)  # splits/interleaves hidden units (e.g. a channel shuffle): exact only if they stay put
        return FIXED

    # main loop ---------------------------------------------------------------------------------------------
    def run(self) -> TransportSpec:
        for node in self.graph.nodes:
            if node.op == "output":
                self.fix(self._collect(node.args))  # the model output (classes) is never transported
                continue
            if node.op == "call_module":
                prefix = f"{node.target}."
                self.used.update(k for k in self.state_keys if k.startswith(prefix))
            elif node.op == "get_attr":
                self.used.add(str(node.target))
            self.env[node.name] = self.visit(node)
        return self.finalise()

    def _collect(self, args: Any) -> list[Any]:
        out: list[Any] = []
        fx.node.map_arg(args, lambda n: out.append(self.env.get(n.name)) or n)
        return out

    def visit(self, node: fx.Node) -> Any:
        val = self.values.get(node.name)
        if node.op == "placeholder":
            return FIXED
        if node.op == "get_attr":
            if isinstance(val, torch.Tensor) and str(node.target) in self.state_keys:
                return ParamRef(str(node.target), tuple(range(val.dim())))
            return FIXED if isinstance(val, torch.Tensor) else None
        if not _has_tensor(val):
            return None  # shapes, ints, bools: no constraint
        module = self.model.get_submodule(str(node.target)) if node.op == "call_module" else None
        rule = lookup_rule(node, module)
        params = any(isinstance(self.lay(a), ParamRef) for a in node.all_input_nodes)
        if rule is not None and (module is not None or params):
            return self._apply(rule, node, module)  # a layer on a fixed input still creates its own hidden units
        if all(self.is_fixed(self.lay(a)) for a in node.all_input_nodes):
            return FIXED
        if rule is None:
            raise self.unsupported(node)
        return self._apply(rule, node, module)

    def _apply(self, rule: Any, node: fx.Node, module: nn.Module | None) -> Any:
        """Run ``rule``; a rule that breaks on an unforeseen call pattern becomes the one-line refusal of its op."""
        try:
            return rule(self, node, module)
        except UnsupportedModelError:
            raise
        except Exception as exc:  # any rule bug must surface as a clear refusal, not a traceback
            first = (str(exc).splitlines() or [""])[0][:200]
            raise self.unsupported(node, f"its rule cannot read this call: {type(exc).__name__}: {first}") from exc

    # result ------------------------------------------------------------------------------------------------
    def finalise(self) -> TransportSpec:
        tie_constraints(self, self.state)
        roots: dict[int, list[Axis]] = {}
        seen: set[tuple[str, int, int]] = set()

        def seg_names(segs: tuple[tuple[int, int], ...] | None) -> tuple[str | int, ...] | None:
            if segs is None:
                return None
            return tuple(self.names[self.find(g)] if self.find(g) else n for g, n in segs)

        members = self.members
        if self.parts:  # a split group's members: one per part (rules.segments)
            members = [
                (p, replace(ax, index=k), ps)
                for gid, ax, segs in self.members
                for p, ps, k in expand_member(self, gid, segs, ax.index)
            ]
        for gid, ax, segs in members:
            r = self.find(gid)
            if r == FIXED_ID or (ax.key, ax.axis, ax.index) in seen:
                continue
            seen.add((ax.key, ax.axis, ax.index))
            roots.setdefault(r, []).append(replace(ax, segments=seg_names(segs)))
        sites: dict[int, list[Site]] = {}
        sites_all = self.sites
        if self.parts:
            sites_all = [
                (p, node_name, Layout(lay.dim, ps or lay.segs, lay.expand), k)
                for gid, node_name, lay, i in self.sites
                for p, ps, k in expand_member(self, gid, lay.segs if len(lay.segs) > 1 else None, i)
            ]
        for gid, node_name, lay, i in sites_all:
            r = self.find(gid)
            if r:
                segs = seg_names(lay.segs) if len(lay.segs) > 1 else None
                site = Site(node_name, lay.dim, lay.expand, segs, i)
                if site not in sites.setdefault(r, []):
                    sites[r].append(site)
        groups = [Group(self.names[r], self.sizes[r], tuple(roots[r]), tuple(sites.get(r, ()))) for r in sorted(roots)]
        blocks = []
        taken = {g.name for g in groups}
        used: set[int] = set()  # a group in two block sets (a GroupNorm repeated on one stream): the first one
        for names, slots in self.blocks:
            ids = [[self.find(g) for g in slot] for slot in slots]
            flat = [r for slot in ids for r in slot]
            fresh = not set(flat) & used
            used.update(flat)
            if fresh and len(set(flat)) == len(flat) and all(r in roots for r in flat) and not set(names) & taken:
                blocks.append(Blocks(names, tuple(tuple(self.names[r] for r in slot) for slot in ids)))
                taken.update(names)
        spec = TransportSpec(tuple(groups), touched=frozenset(self.touched), blocks=tuple(blocks))
        for check in BLOCK_CHECKS:  # fedfuse.align.heads: head sets the merged view cannot express are dropped
            spec = check(spec)
        return spec


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
    for whole_model in MODEL_SPECS:  # e.g. PEFT LoRA (fedfuse.align.peft_lora): only the adapters' rank units move
        spec = whole_model(model)
        if spec is not None:
            return spec
    if example_input is None:
        raise ConfigError("derive_spec needs example_input (a small input batch) or pass spec= explicitly")
    graph, values = trace_values(model, example_input)
    spec = _Deriver(model, graph, values).run()
    _DERIVED_ON[spec] = example_input
    while len(_DERIVED_ON) > 32:
        _DERIVED_ON.popitem(last=False)
    return spec


def derived_on(spec: TransportSpec) -> Any:
    """The example input ``spec`` was last derived on (None if unknown): what the gate checks a spec on when the
    caller passes the spec but no input."""
    return _DERIVED_ON.get(spec)
