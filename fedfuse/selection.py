"""One glob grammar for choosing layers and parameters (LMC layer groups, partial averaging, PFN masks).

A pattern ``p`` matches a state-dict key (or parameter name) ``k`` when ``fnmatchcase(k, p)`` or
``fnmatchcase(k, p + ".*")``: a glob on full keys, where a module name also selects every entry below it
(``net.1`` selects ``net.1.weight`` and ``net.1.bias``; ``net.*`` everything under ``net``). Matching is
case-sensitive and ``*`` crosses dots.

Partial-averaging presets (``layerwise-preset``, :func:`shared_keys`):

* ``body``  — FedPer: everything but the head (the last ``nn.Linear``) is shared.
* ``head``  — only the head is shared.
* ``no-bn`` — FedBN: everything but BatchNorm weights, biases and running statistics is shared.
* ``layers=<glob,glob>`` — the keys matching a glob are shared.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

from fedfuse.errors import ConfigError

__all__ = [
    "LAYERWISE_PRESETS",
    "matches",
    "select_keys",
    "head_keys",
    "batchnorm_keys",
    "shared_keys",
]

LAYERWISE_PRESETS = ("body", "head", "no-bn")


def matches(key: str, pattern: str) -> bool:
    """``key`` is selected by ``pattern``: the glob matches it, or matches the module that owns it."""
    return fnmatchcase(key, pattern) or fnmatchcase(key, pattern + ".*")


def select_keys(keys: Iterable[str], patterns: Iterable[str], *, label: str = "patterns") -> list[str]:
    """The ``keys`` matching any of ``patterns``, in the order of ``keys``.

    Raises ConfigError (prefixed with ``label``) naming every pattern that matches no key, with the first keys.
    """
    keys, patterns = list(keys), list(patterns)
    unmatched = [p for p in patterns if not any(matches(k, p) for k in keys)]
    if unmatched:
        more = " ..." if len(keys) > 8 else ""
        raise ConfigError(f"{label}: {unmatched} match no state-dict key; keys: {', '.join(keys[:8])}{more}")
    return [k for k in keys if any(matches(k, p) for p in patterns)]


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the head: the last ``nn.Linear`` registered (the classifier of every fedfuse model)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear head; use layerwise-preset=layers=<globs>")
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] == last]


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys owned by BatchNorm modules (affine parameters and running statistics)."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] in names]


def shared_keys(model: nn.Module, preset: str) -> list[str]:
    """The state-dict keys ``preset`` averages, in state-dict order (see the module docstring)."""
    keys = list(model.state_dict())
    if preset == "body":
        head = set(head_keys(model))
        shared = [k for k in keys if k not in head]
    elif preset == "head":
        shared = head_keys(model)
    elif preset == "no-bn":
        bn = set(batchnorm_keys(model))
        if not bn:
            raise ConfigError("layerwise-preset='no-bn' keeps nothing local: the model has no BatchNorm (--batch-norm)")
        shared = [k for k in keys if k not in bn]
    elif preset.startswith("layers="):
        patterns = [p.strip() for p in preset[len("layers=") :].split(",") if p.strip()]
        shared = select_keys(keys, patterns, label=f"layerwise-preset={preset!r}")
    else:
        allowed = ", ".join(LAYERWISE_PRESETS)
        raise ConfigError(f"layerwise-preset={preset!r} is not allowed; allowed: {allowed} or layers=<glob,glob>")
    if not shared:
        raise ConfigError(f"layerwise-preset={preset!r} shares no parameter of {type(model).__name__}")
    return shared
