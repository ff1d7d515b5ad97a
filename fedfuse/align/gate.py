"""The gate: a derived or hand-written spec proves itself before any use.

A transport spec claims that permuting every group's units (and every parameter axis they index) leaves the
model's function unchanged. :func:`verify_spec` tests that claim: a copy of the model with its constant
parameters randomised (:func:`~fedfuse.align.selfcheck.break_symmetric_init`, so a zero bias cannot hide a
missed axis) is permuted by a seeded random permutation of every group, and its outputs must equal the
unpermuted copy's to ``rtol`` of their scale (in float64 to 1e-6 up to ``GATE_F64_MAX_PARAMS`` parameters; larger
models in float32 to 1e-3). Otherwise the spec is refused with one
line naming the groups whose permutation alone breaks the function and their parameters. A model with hidden
units but no group at all (fusion would be a plain average) is refused too.

:func:`gated_spec` derives and verifies; verification is cached per (model class, state shapes, input shapes,
spec), so a federated run pays it once, not every round. :func:`coverage` measures what a spec moves: the share
of parameters (elements) and of weight axes (axes 0 and 1 of every ≥2-d parameter: a layer's units and its
inputs; a model's own input and output axes never move) and the keys no rule touched although their module has
moving units (a sign of a missed rule; for a derived spec, keys no rule mentioned even to keep them fixed).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedfuse.align.heads import random_transports, shuffle_heads, to_merged
from fedfuse.align.inputs import call_model
from fedfuse.align.spec import TransportSpec, UnsupportedModelError, derive_spec
from fedfuse.align.transport import apply_transport, load_state, state_of
from fedfuse.errors import ConfigError

__all__ = [
    "Coverage",
    "break_symmetric_init",
    "coverage",
    "gated_spec",
    "is_verified",
    "permutation_error",
    "verify_spec",
]

F64_MAX_PARAMS = 150_000_000  # selfcheck: models up to this size are compared in float64
GATE_RTOL = 1e-6  # float64: an exact permutation differs by rounding (~1e-13); a wrong one by O(1)
# The gate holds two copies of the model it checks (unpermuted and permuted): in float64 that is 16 bytes a
# parameter (2 GB for torchvision's vgg11_bn, 129M, on top of the caller's own models), so larger models are
# compared in float32, where an exact permutation differs by the reordered sums' rounding (vgg11_bn 5e-6; the
# deepest torchvision model, RegNetY-128GF, 4.2e-4 between its own float32 and float64 outputs) and a wrong one
# by O(1).
GATE_F64_MAX_PARAMS = 64_000_000
GATE_RTOL_F32 = 1e-3
_CACHE: OrderedDict[Any, str] = OrderedDict()  # key -> "" (passed) or the refusal line
_CACHE_SIZE = 256
_MEASURING: contextvars.ContextVar[bool] = contextvars.ContextVar("fedfuse_gate_measuring", default=False)
_PASSED: OrderedDict[Any, None] = OrderedDict()  # (model class, state shapes, spec) that passed on some input


@dataclass
class Coverage:
    """What a spec moves (see the module docstring)."""

    params_moved: int = 0
    params_total: int = 0
    axes_moved: int = 0
    axes_total: int = 0
    untouched: list[str] = field(default_factory=list)

    @property
    def param_share(self) -> float:
        return self.params_moved / max(self.params_total, 1)

    @property
    def axis_share(self) -> float:
        return self.axes_moved / max(self.axes_total, 1)


def coverage(model: nn.Module, spec: TransportSpec) -> Coverage:
    """Parameters (elements) and weight axes a spec moves; keys untouched beside moving ones (module docstring)."""
    state = model.state_dict(keep_vars=True)
    cov = Coverage()
    seen: set[int] = set()
    # a layer whose own units move (an "out" member); a parametrized layer counts as its base layer
    units = {_layer(m.key) for g in spec.groups for m in g.members if m.role == "out"}
    weights: dict[str, str] = {}  # layer -> the one ≥2-d key standing for its weight (a parametrization's largest)
    for key, t in state.items():
        if isinstance(t, nn.Parameter) and t.dim() >= 2:
            w = weights.get(_weight_id(key))
            if w is None or state[w].numel() < t.numel():
                weights[_weight_id(key)] = key
    counted = set(weights.values())
    for key, t in state.items():
        if not torch.is_floating_point(t):
            continue
        axes = {m.axis for _, m in spec.members_of(key)}
        if id(t) not in seen:  # a tied tensor counts once
            seen.add(id(t))
            if isinstance(t, nn.Parameter):
                cov.params_total += t.numel()
                cov.params_moved += t.numel() if axes else 0
                if key in counted:
                    cov.axes_total += 2
                    cov.axes_moved += len(axes & {0, 1})
        mentioned = key in spec.touched if spec.touched else bool(axes)
        if not mentioned and t.numel() > 1 and _layer(key) in units:
            cov.untouched.append(key)
    return cov


def _layer(key: str) -> str:
    """The layer owning ``key`` (``fc.parametrizations.weight.original0`` → ``fc``)."""
    base = key.split(".parametrizations.", 1)[0] if ".parametrizations." in key else key.rsplit(".", 1)[0]
    return base if "." in key else ""


def _weight_id(key: str) -> str:
    """One name per weight: a parametrization's originals share ``fc.parametrizations.weight``; the hook-based
    weight norm's ``fc.weight_g``, ``fc.weight_v`` share ``fc.weight``."""
    if ".parametrizations." in key:
        return key.rsplit(".original", 1)[0]
    return key[:-2] if key.endswith(("_g", "_v")) else key


def _hidden_layers(model: nn.Module) -> list[str]:
    """Modules that own a ≥2-d parameter directly (a layer with units), and the ≥2-d parameters the model itself
    owns (``x @ self.w``); two or more, or a recurrent/attention module, mean the model has hidden units."""
    names = [n for n, m in model.named_modules() if n and any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    names = [n for n, p in model.named_parameters(recurse=False) if p.dim() >= 2] + names
    recurrent = any(isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) for m in model.modules())
    return names if len(names) >= 2 or recurrent else []


def _outputs(y: Any) -> list[torch.Tensor]:
    """The floating tensors of a (nested) model output, in order."""
    if isinstance(y, torch.Tensor):
        return [y] if torch.is_floating_point(y) else []
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _outputs(v)]
    if hasattr(y, "to_tuple"):  # a Hugging Face ModelOutput
        return _outputs(y.to_tuple())
    return []


def _rel_err(y: Any, ref: Any) -> float:
    """max |y − ref| / max |ref| over every floating output tensor (inf if the structures differ)."""
    ys, rs = _outputs(y), _outputs(ref)
    if len(ys) != len(rs) or any(a.shape != b.shape for a, b in zip(ys, rs, strict=True)):
        return float("inf")
    if not rs:
        return 0.0
    num = max(float((a - b).detach().abs().max()) for a, b in zip(ys, rs, strict=True))
    den = max(float(b.detach().abs().max()) for b in rs)
    return num / max(den, 1e-12)


@torch.no_grad()
def permutation_error(
    model: nn.Module,
    spec: TransportSpec,
    example_input: Any,
    *,
    seed: int = 1,
    float64: bool | None = None,
    in_place: bool = False,
) -> tuple[float, Any]:
    """Relative output change when every group of ``spec`` is permuted at random (0 for an exact spec), and a
    function ``err(transports)`` giving the change for any (partial) set of transports on the same network.
    One copy of the model is made (none with ``in_place=True``: ``model`` is then converted and overwritten)."""
    in_f64 = sum(p.numel() for p in model.parameters()) <= F64_MAX_PARAMS if float64 is None else bool(float64)

    def cast(i: Any) -> Any:
        return i.double() if in_f64 and isinstance(i, torch.Tensor) and torch.is_floating_point(i) else i

    if isinstance(example_input, dict):  # keyword inputs (a Hugging Face model)
        args, kwargs = (), {k: cast(v) for k, v in example_input.items()}
    else:
        args, kwargs = tuple(cast(i) for i in _as_tuple(example_input)), {}
    net = model if in_place else copy.deepcopy(model)
    net = (net.double() if in_f64 else net).eval()
    tensors = dict(net.named_parameters(remove_duplicate=False)) | dict(net.named_buffers(remove_duplicate=False))
    swap = set(state_of(net)) <= set(tensors)  # every entry a parameter or buffer: err() swaps them, never copies
    state = state_of(net) if swap else {k: v.clone() for k, v in state_of(net).items()}
    ref = net(*args, **kwargs)

    def err(transports: dict[str, torch.Tensor]) -> float:
        new = apply_transport(state, spec, transports)
        if swap:  # the network takes the permuted tensors; ``state`` keeps the unpermuted ones (no copy of either)
            for k, v in new.items():
                tensors[k].data = v
        else:
            load_state(net, new)
        return _rel_err(net(*args, **kwargs), ref)

    gen = torch.Generator().manual_seed(int(seed))  # the permutations permute_model(model, spec, seed) draws
    return err(random_transports(spec.for_state(state), gen)), err  # heads of head sets reordered as blocks too


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _key(model: nn.Module, spec: TransportSpec, example_input: Any) -> Any:
    inputs = tuple(example_input.values()) if isinstance(example_input, dict) else _as_tuple(example_input)
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())
    ins = tuple((tuple(i.shape), str(i.dtype)) if isinstance(i, torch.Tensor) else repr(i)[:100] for i in inputs)
    return (type(model), shapes, ins, spec)


def verify_spec(
    model: nn.Module, spec: TransportSpec, example_input: Any, *, seed: int = 1, given: bool = False
) -> None:
    """Raise :class:`UnsupportedModelError` (one line) unless a seeded permutation of every group of ``spec``
    leaves ``model``'s outputs on ``example_input`` unchanged, or if the model has hidden units but ``spec`` no
    group. Cached (module docstring). ``given``: ``spec`` was written by the user, not derived (the line says
    so); a spec that already passed for this model class and state shapes on any input is not checked again.
    """
    if given and is_verified(model, spec):
        return
    key = _key(model, spec, example_input)
    if key not in _CACHE:
        _CACHE[key] = _verdict(model, spec, example_input, seed, given)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        if not _CACHE[key]:
            _PASSED[_passed_key(model, spec)] = None
            while len(_PASSED) > _CACHE_SIZE:
                _PASSED.popitem(last=False)
    if _CACHE[key]:
        raise UnsupportedModelError(_CACHE[key])


def _passed_key(model: nn.Module, spec: TransportSpec) -> Any:
    return (type(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()), spec)


def is_verified(model: nn.Module, spec: TransportSpec) -> bool:
    """Whether ``spec`` already passed :func:`verify_spec` for ``model``'s class and state shapes (any input),
    or is being measured inside :func:`measuring` (which uses it whether right or wrong)."""
    return _MEASURING.get() or _passed_key(model, spec) in _PASSED


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Inside: given specs are used unchecked — for :func:`~fedfuse.align.selfcheck.selfcheck`, which measures
    what a spec does to a model (its errors are the report), not for fusing models."""
    token = _MEASURING.set(True)
    try:
        yield
    finally:
        _MEASURING.reset(token)


def _probe(model: nn.Module, example_input: Any, seed: int) -> nn.Module:
    """A copy of ``model`` in eval mode with its constant parameters randomised (:func:`break_symmetric_init`)."""
    try:
        return break_symmetric_init(copy.deepcopy(model).eval(), example_input, seed=seed)
    except Exception:  # e.g. BatchNorm with eps=0 cannot run in training mode: check the model as it is
        return copy.deepcopy(model).eval()


def _verdict(model: nn.Module, spec: TransportSpec, example_input: Any, seed: int, given: bool = False) -> str:
    name = type(model).__name__
    which = "given" if given else "derived"
    if not spec.groups:
        layers = _hidden_layers(model)
        if layers:
            shown = ", ".join(layers[:4]) + (", …" if len(layers) > 4 else "")
            return (
                f"nothing to align in {name}: the {which} spec has 0 hidden-unit groups while the model has "
                f"{len(layers)} weight layers ({shown}), so fusion would be a plain average; use method='average' "
                "or pass a manual TransportSpec"
            )
        return ""
    was_training = model.training
    try:
        probe = _probe(model, example_input, seed)  # this check's own copy: converted and permuted in place
        in_f64 = sum(p.numel() for p in model.parameters()) <= GATE_F64_MAX_PARAMS
        try:
            total, err = permutation_error(probe, spec, example_input, seed=seed, float64=in_f64, in_place=True)
            rtol = GATE_RTOL if in_f64 else GATE_RTOL_F32
        except RuntimeError:  # an op without a float64 kernel: compare in float32, to float32 rounding
            probe = _probe(model, example_input, seed)
            total, err = permutation_error(probe, spec, example_input, seed=seed, float64=False, in_place=True)
            rtol = 1e-4
        if total <= rtol:
            return ""
        gen = torch.Generator().manual_seed(seed)
        broken = []
        sized = spec.for_state(state_of(probe))
        for g in sized.groups:
            perm = torch.eye(g.size)[torch.randperm(g.size, generator=gen)]
            if err({g.name: perm}) > rtol:
                broken.append(g)
        blocks = [b for b in sized.blocks if err(_heads_swapped(sized, b)) > rtol]  # whole heads reordered alone
    except ConfigError as exc:
        return f"the {which} spec of {name} cannot be applied to it: {str(exc).splitlines()[0]}"
    finally:
        model.train(was_training)
    by_name = {g.name: g for g in sized.groups}
    broken += [by_name[n] for b in blocks for slot in b.heads for n in slot if by_name[n] not in broken]
    keys = list(dict.fromkeys(m.key for g in broken for m in g.members))
    shown = ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")
    named = [repr(g.name) for g in broken if not any(g.name in s for b in blocks for s in b.heads)]
    named = [f"heads of {b.names[0].rsplit('.', 1)[0]!r} as blocks" for b in blocks] + named
    groups = ", ".join(named[:4]) + (", …" if len(named) > 4 else "")
    untouched = coverage(model, spec).untouched
    hint = f"; untouched beside them: {', '.join(untouched[:4])}" if untouched else ""
    where = f"permuting group(s) {groups} breaks it (parameters {shown}){hint}" if broken else "no single group alone"
    fix = "fix its groups" if given else "a rule is missing or wrong — pass a manual TransportSpec"
    return (
        f"the {which} spec of {name} is not exact (a seeded permutation changes its output by {total:.2g} of its "
        f"scale): {where}; {fix} or use method='average'"
    )


def _heads_swapped(spec: TransportSpec, b: Any) -> dict[str, torch.Tensor]:
    """Head set ``b``'s heads reordered as whole blocks (a cyclic shift), units within heads kept."""
    sizes = spec.sizes
    eye = to_merged(spec, {g: torch.eye(sizes[g]) for slot in b.heads for g in slot})
    shift = torch.roll(torch.arange(len(b.heads[0])), 1).numpy()
    return {n: shuffle_heads(eye[n], shift, [sizes[g] for g in slot]) for n, slot in zip(b.names, b.heads, strict=True)}


def gated_spec(model: nn.Module, example_input: Any) -> TransportSpec:
    """:func:`~fedfuse.align.spec.derive_spec`, then :func:`verify_spec`: a spec that is safe to use."""
    spec = derive_spec(model, example_input)
    verify_spec(model, spec, example_input)
    return spec


@torch.no_grad()
def break_symmetric_init(model: nn.Module, x: Any, seed: int = 0) -> nn.Module:
    """Randomise constant parameters (zero-init heads, unit norm scales, layer scales) and set every BatchNorm's
    running statistics to the batch statistics of ``x``, variance ≥ 0.01 (activations stay O(1) at any depth).
    In place."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.numel() > 1 and float(p.std()) == 0.0:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        elif p.numel() == 1:
            p.fill_(float(p) + 0.1 * float(torch.randn((), generator=gen)))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        old = [(m.momentum, m.training) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives its own statistics
        model.eval()
        for m in bns:
            m.train()
        call_model(model, x)  # a tensor, tuple or keyword dict
        for m, (mom, _) in zip(bns, old, strict=True):
            m.momentum = mom
            if m.running_var is not None:  # 2 samples can give ~0 variance: 1/√var would amplify rounding
                m.running_var.clamp_(min=1e-2)
    return model.eval()
