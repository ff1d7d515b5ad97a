"""The transport spec's data model: units (:class:`Group`), the tensor axes they index (:class:`Axis`), the
activation sites where they can be observed (:class:`Site`), heads reordered as whole blocks (:class:`Blocks`), and
:class:`TransportSpec`, the whole model's set of groups. :mod:`fedfuse.align.spec` derives one from a model with
``torch.fx``; a hand-written one comes from rows (:meth:`TransportSpec.from_rows`).

An axis of length ``L`` is read as ``(repeat, block, expand)``: ``repeat`` gate blocks (LSTM 4, GRU 3), ``block``
channels and ``expand`` positions per channel; a consumer of a ``torch.cat`` sees its block split in ``segments``
(:func:`segment_range` finds ours).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from fedfuse.errors import ConfigError

__all__ = ["Axis", "Blocks", "Group", "Site", "TransportSpec", "segment_range"]


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
class Blocks:
    """``H`` blocks (attention heads) that may also be reordered as wholes, by one block permutation ``σ`` shared by
    every slot: ``heads[k][h]`` is slot ``k``'s group of head ``h`` (e.g. slot 0 the q/k units, slot 1 the v units
    of each head). Besides each group's own (within-head) transport, target head ``h`` may take source head
    ``σ(h)``: slot ``k``'s units as one group ``names[k]`` of ``Σ_h n_h`` units whose transport is block-structured
    (block ``(h, σ(h))`` the within-head transport, zero elsewhere; see :mod:`fedfuse.align.heads`)."""

    names: tuple[str, ...]
    heads: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class TransportSpec:
    """Groups in topological order (shallow → deep). Parameters not listed are never transported.

    ``blocks``: head sets whose groups may also be reordered as whole blocks (:class:`Blocks`); empty for a
    hand-written spec unless given. ``merged_heads`` is set on the merged view only
    (:func:`fedfuse.align.heads.merged_spec`): merged group name → its heads' widths."""

    groups: tuple[Group, ...]
    _by_key: dict[str, list[tuple[Group, Axis]]] = field(default=None, repr=False, compare=False)  # type: ignore
    #: state keys the derivation rules mentioned (moving or kept fixed); empty for a hand-written spec
    touched: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    blocks: tuple[Blocks, ...] = ()
    merged_heads: Any = field(default=None, repr=False, compare=False)
    _merged: Any = field(default=None, repr=False, compare=False)  # the merged view, built on first use

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"transport spec has duplicate group names: {names}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.blocks and self.merged_heads is None:
            _check_blocks(self.blocks, set(names))
        by_key: dict[str, list[tuple[Group, Axis]]] = {}
        for g in self.groups:
            for m in g.members:
                by_key.setdefault(m.key, []).append((g, m))
        object.__setattr__(self, "_by_key", by_key)

    @classmethod
    def from_rows(cls, rows: Any, model_or_state: Any) -> TransportSpec:
        """A hand-written spec from rows ``(param, axis) -> group`` (Git Re-Basin's ``axes_to_perm`` read per row).

        ``rows``: a mapping ``{(key, axis): group}`` or pairs ``((key, axis), group)``; ``group`` is a name, or
        ``(name, role)`` to override the role (default: axis 1 of a ≥2-d weight is a consumer's ``"in"`` axis,
        every other axis the unit's own ``"out"``). Widths come from ``model_or_state``; groups keep first-seen order
        (shallow → deep). Gate blocks, flattened positions and concatenations need :class:`Axis` rows directly::

            TransportSpec.from_rows({("fc1.weight", 0): "h", ("fc1.bias", 0): "h", ("fc2.weight", 1): "h"}, model)
        """
        state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
        pairs = list(rows.items()) if isinstance(rows, dict) else list(rows)
        members: dict[str, list[Axis]] = {}
        for (key, axis), target in pairs:
            name, role = target if isinstance(target, tuple) else (target, None)
            if key not in state:
                raise ConfigError(f"spec row ({key!r}, {axis}) names no parameter of the model")
            if not 0 <= int(axis) < state[key].dim():
                raise ConfigError(f"spec row ({key!r}, {axis}): the parameter has shape {tuple(state[key].shape)}")
            if role is None:
                role = "in" if int(axis) == 1 and state[key].dim() >= 2 else "out"
            if role not in ("in", "out"):
                raise ConfigError(f"spec row ({key!r}, {axis}): role {role!r} is not allowed; allowed: 'in', 'out'")
            members.setdefault(str(name), []).append(Axis(key, int(axis), role))
        groups = tuple(Group(n, 0, tuple(ms)) for n, ms in members.items())
        return cls(groups).for_state(state)

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
        groups = tuple(replace(g, size=int(sizes.get(g.name, g.size))) for g in self.groups)
        heads = self.merged_heads
        if heads is not None:  # the merged view resized: its heads split evenly
            width = {g.name: g.size for g in groups}
            heads = {n: h if sum(h) == width[n] else _even(n, width[n], len(h)) for n, h in heads.items()}
        return TransportSpec(groups, touched=self.touched, blocks=self.blocks, merged_heads=heads)

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


def _check_blocks(blocks: tuple[Blocks, ...], names: set[str]) -> None:
    """Every head group exists, once; slots have one name each (not a group's) and equally many heads."""
    seen: set[str] = set()
    for b in blocks:
        heads = [g for slot in b.heads for g in slot]
        if len(b.names) != len(b.heads) or len({len(slot) for slot in b.heads}) != 1:
            raise ConfigError(f"head blocks {b.names}: one name per slot and equally many heads per slot needed")
        if set(b.names) & names or set(heads) - names or seen & set(heads) or len(set(heads)) != len(heads):
            raise ConfigError(f"head blocks {b.names}: names must be new and heads distinct groups of the spec")
        seen.update(heads)


def _even(name: str, size: int, heads: int) -> tuple[int, ...]:
    if size % heads:
        raise ConfigError(f"merged head group {name!r} of {size} units cannot be split into {heads} equal heads")
    return (size // heads,) * heads


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
