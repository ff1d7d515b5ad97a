"""Checks a client update must pass before any aggregation or fusion sees it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Number

import torch

__all__ = ["check_update"]

ShapeCheck = Callable[[str, tuple[int, ...], tuple[int, ...]], bool]


def check_update(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    num_examples: object,
    *,
    shape_ok: ShapeCheck | None = None,
) -> str | None:
    """Why ``state`` cannot be aggregated against the global ``reference``, or None when it can.

    Rules: the same keys; the same dtype per key; the same shape per key (or, with width
    heterogeneity, ``shape_ok(key, shape, reference_shape)``); every value finite; ``num_examples``
    a positive integer.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, Number):
        return f"num-examples={num_examples!r} is not a number"
    if float(num_examples) != int(float(num_examples)) or int(float(num_examples)) <= 0:
        return f"num-examples={num_examples!r} is not a positive integer"
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing:
        return f"missing key(s) {missing[:3]}"
    if extra:
        return f"unexpected key(s) {extra[:3]}"
    for key, ref in reference.items():
        value = state[key]
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype} != {ref.dtype}"
        shape, ref_shape = tuple(value.shape), tuple(ref.shape)
        if shape != ref_shape and not (shape_ok is not None and shape_ok(key, shape, ref_shape)):
            return f"{key}: shape {shape} != {ref_shape}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            return f"{key}: {bad} non-finite value(s)"
    return None
