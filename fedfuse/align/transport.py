"""Applying transports to a model: one contraction per (parameter, axis).

A transport for a group is a matrix ``T`` (``n_target × n_source``), row-stochastic: target unit ``a``
is the barycentric average ``Σ_b T[a, b] · unit_b`` (a permutation is the 0/1 special case; an OT
coupling Π becomes ``T = Π / Π·1``).

* ``out`` axes (the unit's own weights, bias, norm parameters/statistics): ``W ← T W``.
* ``in`` axes (a consumer's columns): ``W ← W Sᵀ`` with ``S = T / 1ᵀT`` column-normalised, i.e. the
  outgoing weights of a source unit are *split* among the target units it is mapped to (columns sum to
  the source column). For a permutation ``S = T``; for rectangular transports this keeps the
  function: duplicating a unit into two copies halves its outgoing weights. *(our reading: the WB
  paper writes ``n·W Πᵀ``; the mass-preserving split is its function-preserving form for unequal widths.)*

Gate blocks (``repeat``), spatial expansion after flatten (``expand``) and concatenated segments are
handled by reading the axis as ``(repeat, block, expand)``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedfuse.align.heads import merged_spec, random_transports, to_merged
from fedfuse.align.spec import Axis, Group, TransportSpec, segment_range
from fedfuse.errors import ConfigError
from fedfuse.state import single_threaded

__all__ = [
    "Transports",
    "apply_transport",
    "permute_model",
    "state_of",
    "input_side",
    "transport_axis",
    "member_features",
    "member_rows",
    "permutation_index",
    "load_state",
]

Transports = dict[str, Tensor]


def state_of(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A detached copy-free view of a module's (or a mapping's) state as ``{key: tensor}``."""
    if isinstance(model_or_state, nn.Module):
        return {k: v.detach() for k, v in model_or_state.state_dict().items()}
    if isinstance(model_or_state, Mapping):
        return {k: torch.as_tensor(v) for k, v in model_or_state.items()}
    raise ConfigError(f"expected an nn.Module or a state dict, got {type(model_or_state).__name__}")


def input_side(t: Tensor) -> Tensor:
    """``S = T / 1ᵀT``: the column-normalised transport used on consumer (input) axes."""
    return _analyse(t)[1]


_PERM_CACHE: dict[int, tuple[Tensor, Tensor | None, Tensor]] = {}


def _analyse(mat: Tensor) -> tuple[Tensor | None, Tensor]:
    """(permutation index or None, column-normalised ``S``) of a transport, cached by tensor identity."""
    hit = _PERM_CACHE.get(id(mat))
    if hit is not None and hit[0] is mat:
        return hit[1], hit[2]
    idx: Tensor | None = None
    if mat.dim() == 2 and mat.shape[0] == mat.shape[1]:
        cand = mat.argmax(1)
        if (
            bool((mat.sum(1) == 1).all())
            and bool((mat.gather(1, cand[:, None]) == 1).all())
            and bool((torch.bincount(cand, minlength=mat.shape[1]) == 1).all())
        ):
            idx = cand
    side = mat if idx is not None else mat / mat.sum(0, keepdim=True).clamp_min(1e-12)
    if len(_PERM_CACHE) > 4096:
        _PERM_CACHE.clear()
    _PERM_CACHE[id(mat)] = (mat, idx, side)  # holds a reference, so the id cannot be reused meanwhile
    return idx, side


def permutation_index(mat: Tensor) -> Tensor | None:
    """``idx`` with ``mat = I[idx]`` when ``mat`` is a permutation matrix (so ``mat @ x = x[idx]``), else None."""
    return _analyse(mat)[0]


def transport_axis(w: Tensor, axis: int, members: list[tuple[Axis, Tensor | None]], sizes: Mapping[str, int]) -> Tensor:
    """Contract ``w`` along ``axis`` with each member's matrix (``M @ segment``); untransported parts stay.

    All ``members`` share ``(key, axis)`` (one per concatenated segment); each matrix ``M`` is
    already the out-side ``T`` or the in-side ``S``; ``None`` = identity; a 1-D integer tensor ``idx``
    stands for the permutation ``I[idx]``. Permutation matrices are applied as an index gather, other
    matrices as one ``tensordot``.
    """
    if all(m is None for _, m in members):
        return w
    first = members[0][0]
    shape = tuple(w.shape)
    block = shape[axis] // (first.repeat * first.expand)
    x = w.reshape(*shape[:axis], first.repeat, block, first.expand, *shape[axis + 1 :])
    bdim = axis + 1
    if len(members) == 1 and first.segments is None:
        pieces = [(0, block, members[0][1])]
    else:
        by_index = {ax.index: mat for ax, mat in members}
        pieces = []
        offset = 0
        for i, seg in enumerate(first.segments or ()):
            width = sizes[seg] if isinstance(seg, str) else int(seg)
            pieces.append((offset, width, by_index.get(i)))
            offset += width
        if offset != block:
            raise ConfigError(f"{first.key}: segments {first.segments} do not add up to axis block {block}")
    out = []
    for off, width, mat in pieces:
        seg = x.narrow(bdim, off, width)
        if mat is not None:
            if mat.shape[-1] != width:
                raise ConfigError(
                    f"transport for {first.key!r} axis {axis} has {mat.shape[-1]} source units, the axis has {width}"
                )
            idx = mat if mat.dim() == 1 else permutation_index(mat)
            if idx is not None:
                seg = seg.index_select(bdim, idx)
            else:
                seg = torch.tensordot(mat.to(seg.dtype), seg, dims=([1], [bdim])).movedim(0, bdim)
        out.append(seg)
    y = torch.cat(out, dim=bdim) if len(out) > 1 else out[0]
    return y.reshape(*shape[:axis], -1, *shape[axis + 1 :])


def _matrices(
    spec: TransportSpec, key: str, transports: Mapping[str, Tensor], skip_axis: int | None = None
) -> dict[int, list[tuple[Axis, Tensor | None]]]:
    """Per axis of ``key``: its members with the matrix to apply (``T`` for out, ``S`` for in)."""
    per_axis: dict[int, list[tuple[Axis, Tensor | None]]] = {}
    for g, ax in spec.members_of(key):
        if ax.axis == skip_axis:
            continue
        t = transports.get(g.name)
        if t is not None and ax.role == "in":
            t = input_side(t)
        per_axis.setdefault(ax.axis, []).append((ax, t))
    return per_axis


@single_threaded()
def apply_transport(
    model_or_state: nn.Module | Mapping[str, Tensor], spec: TransportSpec, transports: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Re-index a model by one transport per group: ``out`` axes ``T W``, ``in`` axes ``W Sᵀ``.

    Groups missing from ``transports`` are left as they are. With permutations the function is
    unchanged; with rectangular ``T`` the result has the target widths. Returns a new state dict.
    A transport keyed by a head set's merged group (:mod:`fedfuse.align.heads`) applies on its merged view.
    """
    state = state_of(model_or_state)
    spec = spec.for_state(state)
    if spec.blocks and any(n in transports for b in spec.blocks for n in b.names):
        transports = to_merged(spec, transports)
        spec = merged_spec(spec)
    sizes = spec.sizes
    unknown = set(transports) - set(sizes)
    if unknown:
        raise ConfigError(f"transports for unknown groups {sorted(unknown)}; groups are {spec.names}")
    for name, t in transports.items():
        if t.dim() != 2 or t.shape[1] != sizes[name]:
            raise ConfigError(f"transport for group {name!r} has shape {tuple(t.shape)}; expected (n, {sizes[name]})")
    out: dict[str, Tensor] = {}
    for key, w in state.items():
        per_axis = _matrices(spec, key, transports)
        if not per_axis or not torch.is_floating_point(w):
            out[key] = w.clone()
            continue
        for axis, members in per_axis.items():
            w = transport_axis(w, axis, members, sizes)
        out[key] = w.contiguous()
    return out


def member_features(
    state: Mapping[str, Tensor],
    spec: TransportSpec,
    group: Group,
    member: Axis,
    transports: Mapping[str, Tensor] | None = None,
    require: bool = False,
) -> Tensor | None:
    """The ``(n, d)`` rows of ``member`` (its axis first, flattened) with every *other* axis transported.

    Groups missing from ``transports`` are left untransported, or (``require=True``) the member is
    skipped (returns None) — used on the first layer-wise sweep before deeper groups are solved.
    """
    w = state[member.key]
    sizes = spec.sizes
    if transports is not None:
        for axis, members in _matrices(spec, member.key, transports, skip_axis=member.axis).items():
            if require and any(mat is None for _, mat in members):
                return None
            w = transport_axis(w, axis, members, sizes)
    return member_rows(w, member, sizes)


def member_rows(w: Tensor, member: Axis, sizes: Mapping[str, int]) -> Tensor:
    """``w`` read as ``member``'s ``(n, d)`` rows: its ``(repeat, block, expand)`` axis, our segment, moved first."""
    shape = tuple(w.shape)
    block, off, n = segment_range(member, sizes, shape[member.axis])
    x = w.reshape(*shape[: member.axis], member.repeat, block, member.expand, *shape[member.axis + 1 :])
    return x.narrow(member.axis + 1, off, n).movedim(member.axis + 1, 0).reshape(n, -1)


def permute_model(model: nn.Module, spec: TransportSpec, seed: int = 0) -> tuple[nn.Module, Transports]:
    """A copy of ``model`` with every hidden group randomly permuted (same function); and the permutations.

    The returned matrices ``P`` map the original to the copy (``copy = apply_transport(model, P)``); head sets'
    heads are also reordered as blocks (keyed by their merged groups, :func:`~fedfuse.align.heads.random_transports`).
    """
    gen = torch.Generator().manual_seed(int(seed))
    state = state_of(model)
    spec = spec.for_state(state)
    perms = random_transports(spec, gen)
    new = copy.deepcopy(model)
    load_state(new, apply_transport(state, spec, perms))
    return new, perms


def load_state(module: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """``module.load_state_dict(state)`` keeping the module's own state-dict metadata (versions some
    modules check on load, e.g. torchvision's MNASNet); returns ``module``."""
    sd = OrderedDict(state)
    sd._metadata = getattr(module.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    module.load_state_dict(sd)
    return module
