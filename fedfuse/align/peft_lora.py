"""Alignment of PEFT LoRA adapters: the rank axis of every adapter is a group; the frozen base never moves.

A LoRA layer computes ``W x + s · B A x`` with ``A`` (``r × in``) and ``B`` (``out × r``); ``B A = Σ_k B[:, k]
A[k, :]`` is a sum over the rank axis, so permuting ``A``'s rows and ``B``'s columns jointly leaves ``B A`` — and so
the merged ``W + s·B A`` and the model's function — unchanged (Hu et al. 2021, LoRA; the rank axis is a hidden
layer of width ``r``). In federated LoRA every client shares the same frozen base ``W``: it stays put (it is not in
any group), and only the adapters' rank units are aligned (one group per adapter and layer). Linear, Embedding
(``lora_embedding_A`` ``r × vocab``, ``lora_embedding_B`` ``out × r``) and Conv adapters have the same structure
(rank on axis 0 of A, axis 1 of B). DoRA's magnitude reads the column norms of ``W + s·B A``: unchanged too.
Models whose adapters differ in rank or target modules are refused in one line (:func:`check_lora_states`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedfuse.align.spec import Axis, Group, TransportSpec
from fedfuse.errors import ConfigError

__all__ = ["check_lora_states", "has_lora", "lora_spec"]

# A key of a LoRA factor: "<layer>.lora_A.<adapter>.weight" (Linear/Conv) or "<layer>.lora_embedding_A.<adapter>"
_FACTOR = re.compile(r"^(?P<layer>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])\.(?P<adapter>[^.]+)(?P<w>\.weight)?$")


def has_lora(model_or_state: nn.Module | Mapping[str, Tensor]) -> bool:
    """Whether a module (or state dict) carries LoRA adapter factors."""
    keys = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return any(_FACTOR.match(k) for k in keys)


def _pairs(state: Mapping[str, Tensor]) -> dict[tuple[str, str, bool], dict[str, str]]:
    """``(layer, adapter, embedding) -> {"A": key, "B": key}`` for every LoRA factor in ``state``."""
    out: dict[tuple[str, str, bool], dict[str, str]] = {}
    for k in state:
        m = _FACTOR.match(k)
        if m is not None:
            out.setdefault((m["layer"], m["adapter"], bool(m["emb"])), {})[m["ab"]] = k
    return out


def lora_spec(model_or_state: nn.Module | Mapping[str, Tensor]) -> TransportSpec:
    """One group per (layer, adapter): the rank units, indexing ``A``'s rows (axis 0) and ``B``'s columns (axis 1)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    groups = []
    for (layer, adapter, _), keys in _pairs(state).items():
        if set(keys) != {"A", "B"}:
            raise ConfigError(
                f"LoRA layer {layer!r} (adapter {adapter!r}) has only factor {sorted(keys)}; needs A and B"
            )
        a, b = state[keys["A"]], state[keys["B"]]
        r = a.shape[0]
        if b.dim() < 2 or b.shape[1] != r:
            raise ConfigError(f"LoRA layer {layer!r}: A has rank {r} rows but B has shape {tuple(b.shape)}")
        members = (Axis(keys["A"], 0, "out"), Axis(keys["B"], 1, "in"))
        groups.append(Group(f"{layer}.lora.{adapter}", int(r), members))
    if not groups:
        raise ConfigError("the model has no LoRA adapter factors (lora_A/lora_B) to align")
    return TransportSpec(tuple(groups))


def check_lora_states(states: list[dict[str, Tensor]]) -> None:
    """One line if the models' LoRA adapters differ in target modules or rank (alignment needs the same adapters)."""
    if not states or not has_lora(states[0]):
        return
    ref = _pairs(states[0])
    for i, s in enumerate(states[1:], start=1):
        other = _pairs(s)
        if set(other) != set(ref):
            diff = sorted(set(ref) ^ set(other))[0]
            raise ConfigError(
                f"model {i}'s LoRA targets differ from model 0's (layer {diff[0]!r}, adapter {diff[1]!r} in only one "
                "of them); fuse adapters of the same target modules"
            )
        for key, ab in ref.items():
            r0, ri = states[0][ab["A"]].shape[0], s[other[key]["A"]].shape[0]
            if r0 != ri:
                raise ConfigError(
                    f"model {i}'s LoRA rank at {key[0]!r} is {ri}, model 0's is {r0}; fuse adapters of equal rank"
                )


def lora_delta(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``B A`` per (layer, adapter) (without the scaling): what an alignment must leave unchanged."""
    out = {}
    for (layer, adapter, emb), keys in _pairs(state).items():
        a, b = state[keys["A"]], state[keys["B"]]
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1], -1)[..., 0]
        out[f"{layer}.{adapter}"] = (b2 @ a2) if not emb else (b2 @ a2).T
    return {k: torch.as_tensor(v) for k, v in out.items()}
