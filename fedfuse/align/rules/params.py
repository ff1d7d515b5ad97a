"""Rules for how a layer's parameters are stored: ``torch.nn.utils.parametrize`` and weights tied across modules.

**Parametrized weights.** ``weight_norm(fc)`` stores ``fc.weight`` as ``fc.parametrizations.weight.original0``
(``g``) and ``original1`` (``v``), ``W = g · v / ‖v‖`` with the norm over every axis but ``dim``; a rule that claims
axis ``a`` of ``fc.weight`` is redirected here:

* weight norm (``dim = k``): axis ``a`` of ``v`` moves; ``g`` moves with it only for ``a = k`` (its other axes
  have length 1); the norm over the other axes is a sum over them, so permuting one of them leaves it unchanged.
  ``dim=None`` (one norm for the whole tensor): only ``v`` moves.
* spectral norm (``dim = k``, default 0; ``W / σ``, ``σ = uᵀ W̃ v`` with ``W̃`` the weight with axis ``k`` first,
  the others flattened): ``original`` moves; ``u`` moves with axis ``k``; ``v`` with the first of the other
  axes (each of its units spans the product of the later axes). Power iteration commutes with the same
  permutations, so training mode stays exact too.
* any other parametrization (or a stack of several): refused in one line when a rule needs to move the weight
  (its originals may mix the weight's units); :func:`register_parametrization` adds one.

**Tied weights.** One tensor under two keys (``decoder.weight = encoder.weight``) must follow the union of both
modules' constraints. Every rule's claim on one key is mirrored on its aliases (the deriver does that); and an
axis of a tied tensor that a module *using* it leaves unclaimed (its rule keeps that axis fixed, or the module has
no rule and runs on fixed inputs) fixes the groups the other modules give it (:func:`tie_constraints`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["Redirect", "parametrized_weights", "register_parametrization", "tie_constraints"]

#: axis of the computed weight -> the (original key, axis, expand) members it becomes; or a refusal line
Redirect = Callable[[int], list[tuple[str, int, int]]] | str

_KNOWN: dict[str, Callable[[nn.Module, str, tuple[int, ...]], Redirect]] = {}


def register_parametrization(cls: type | str, fn: Callable[[nn.Module, str, tuple[int, ...]], Redirect]) -> None:
    """Teach the deriver a parametrization: ``fn(parametrization, prefix, weight_shape)`` returns a :data:`Redirect`
    (``prefix`` is ``"layer.parametrizations.weight"``; originals are ``prefix + ".original"`` or
    ``".original0"``, ``".original1"``...)."""
    _KNOWN[cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"] = fn


def _norm_members(g: str, v: str, dim: int, ndim: int) -> Redirect:
    """``W = g · v / ‖v‖`` (norm over every axis but ``dim``; ``dim = -1``: over the whole tensor)."""

    def members(axis: int) -> list[tuple[str, int, int]]:
        out = [(v, axis, 1)]
        if dim != -1 and axis == dim % ndim:
            out.append((g, axis, 1))
        return out

    return members


def _weight_norm(p: nn.Module, prefix: str, shape: tuple[int, ...]) -> Redirect:
    return _norm_members(f"{prefix}.original0", f"{prefix}.original1", int(p.dim), len(shape))  # type: ignore[arg-type]


def _spectral_norm(p: nn.Module, prefix: str, shape: tuple[int, ...]) -> Redirect:
    dim, ndim = int(p.dim), len(shape)  # type: ignore[arg-type]
    rest = [a for a in range(ndim) if a != dim]

    def members(axis: int) -> list[tuple[str, int, int]]:
        out = [(f"{prefix}.original", axis, 1)]
        if ndim == 1:
            return out  # a 1-d weight is just L2-normalised: permutation-equivariant, no buffers
        if axis == dim:
            out.append((f"{prefix}.0._u", 0, 1))
        elif axis == rest[0]:
            out.append((f"{prefix}.0._v", 0, math.prod(shape[a] for a in rest[1:])))
        else:
            raise ValueError(f"spectral norm of {prefix}: axis {axis} is flattened inside v")
        return out

    return members


register_parametrization("torch.nn.utils.parametrizations._WeightNorm", _weight_norm)
register_parametrization("torch.nn.utils.parametrizations._SpectralNorm", _spectral_norm)


def parametrized_weights(model: nn.Module) -> dict[str, Redirect]:
    """``{"fc.weight": redirect}`` for every parametrized tensor of ``model`` (see the module docstring); also the
    older hook-based ``torch.nn.utils.weight_norm`` (keys ``fc.weight_g``, ``fc.weight_v``)."""
    out: dict[str, Redirect] = {}
    for name, mod in model.named_modules():
        for hook in mod._forward_pre_hooks.values():
            if type(hook).__name__ == "WeightNorm" and hasattr(hook, "name") and hasattr(hook, "dim"):
                key = f"{name}.{hook.name}" if name else hook.name
                v = mod._parameters.get(f"{hook.name}_v")
                if v is not None:
                    out[key] = _norm_members(f"{key}_g", f"{key}_v", int(hook.dim), v.dim())
        plists = getattr(mod, "parametrizations", None)
        if not isinstance(plists, nn.ModuleDict):
            continue
        for tensor, plist in plists.items():
            key = f"{name}.{tensor}" if name else tensor
            prefix = f"{name}.parametrizations.{tensor}" if name else f"parametrizations.{tensor}"
            kinds = [type(p) for p in plist]
            qual = [f"{k.__module__}.{k.__qualname__}" for k in kinds]
            orig = plist.__dict__["_parameters"].get("original", plist.__dict__["_parameters"].get("original1"))
            shape = tuple(orig.shape) if orig is not None else ()  # not getattr(mod, tensor): no power iteration
            if len(kinds) == 1 and qual[0] in _KNOWN:
                out[key] = _KNOWN[qual[0]](plist[0], prefix, shape)
            else:
                names = " then ".join(k.__name__ for k in kinds)
                out[key] = (
                    f"parametrization {names} on {key!r}: fedfuse does not know how its originals follow a permutation "
                    "of the weight's units; known: weight_norm, spectral_norm (add one with "
                    "fedfuse.align.rules.params.register_parametrization) or pass a manual TransportSpec"
                )
    return out


def tie_constraints(d: Any, tensors: dict[str, Any]) -> None:
    """Fix the groups a tied tensor's axis gets where a module using the tensor leaves that axis unclaimed.

    ``d``: the deriver (its ``aliases``, ``claims``, ``direct`` claims and ``used`` keys); ``tensors``: the state."""
    done: set[str] = set()
    for key, others in d.aliases.items():
        if key in done:
            continue
        keys = [key, *others]
        done.update(keys)
        used = [k for k in keys if k in d.used]
        for axis in range(tensors[key].dim()):
            if all((k, axis) in d.direct for k in used):
                continue
            for (k, a, _), gid in d.claims.items():
                if k in keys and a == axis:
                    d.union(gid, 0)
