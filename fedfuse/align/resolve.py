"""Which spec a solver uses: a given one (verified by the gate where a module is at hand) or one derived from the
model traced on an example input, inferred from its first layer when none is given.

Split from :mod:`fedfuse.align.solvers`, which re-exports these names."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.align.spec import TransportSpec, derive_spec, derived_on
from fedfuse.errors import ConfigError

__all__ = ["InputShapeError", "infer_example_input", "resolve_spec"]


def resolve_spec(spec: TransportSpec | None, model: Any, example_input: Any = None) -> TransportSpec:
    """``spec`` if given, else derived from ``model`` (an ``nn.Module``) traced on ``example_input``; either way
    verified by :func:`fedfuse.align.gate.verify_spec` (a seeded permuted copy computes the same function) when
    ``model`` is a module. A given spec with only state dicts, or whose module's input cannot be inferred and no
    ``example_input`` is given, cannot be checked: a warning says so."""
    from fedfuse.align.gate import is_verified, verify_spec  # the gate imports the solvers' users

    if spec is not None:
        if not isinstance(spec, TransportSpec):
            raise ConfigError(f"spec must be a TransportSpec, got {type(spec).__name__}")
        if isinstance(model, nn.Module) and not is_verified(model, spec):
            try:
                ex = example_input if example_input is not None else derived_on(spec)
                ex = ex if ex is not None else infer_example_input(model)
            except InputShapeError:
                warnings.warn(
                    f"the given spec of {type(model).__name__} is not verified: its input shape cannot be inferred; "
                    "pass example_input= to check that a permutation of its groups keeps the model's function",
                    stacklevel=3,
                )
                return spec
            verify_spec(model, spec, ex, given=True)  # cached: a spec that passed for this model is not redone
        return spec
    if not isinstance(model, nn.Module):
        raise ConfigError("state dicts carry no architecture: pass spec= (a TransportSpec) or an nn.Module template")
    if example_input is None:
        example_input = infer_example_input(model)
    spec = derive_spec(model, example_input)
    verify_spec(model, spec, example_input)  # a derived spec proves itself before any use (cached)
    return spec


_SIDES = (8, 16, 24, 28, 32, 40, 64, 96, 128, 224)


class InputShapeError(ConfigError):
    """:func:`infer_example_input` found no input the model runs on: the caller must give one."""


def infer_example_input(model: nn.Module) -> Tensor:
    """A batch of 2 random inputs of the shape the model's first layer fixes.

    A first ``Linear`` fixes ``(2, in_features)``; a first ``Conv1d``/``Conv2d`` fixes the channels, and the
    length/side is the smallest of 8, 16, …, 224 the model runs on (a flatten feeding a Linear fixes it; with
    adaptive pooling any size gives the same spec); a first RNN fixes the feature size. Otherwise raises
    ConfigError asking for ``example_input``.
    """
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.RNNBase))), None)
    if isinstance(first, nn.Linear):
        shapes = [(2, first.in_features)]
    elif isinstance(first, nn.Conv1d):
        shapes = [(2, first.in_channels, s) for s in _SIDES]
    elif isinstance(first, nn.Conv2d):
        shapes = [(2, first.in_channels, s, s) for s in _SIDES]
    elif isinstance(first, nn.RNNBase):
        shapes = [(2, 8, first.input_size) if first.batch_first else (8, 2, first.input_size)]
    else:
        shapes = []
    gen = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    try:
        for shape in shapes:
            x = torch.randn(shape, generator=gen)
            try:
                with torch.no_grad():
                    model(x)
            except Exception:  # a wrong guess fails in many ways (shape errors of any layer)
                continue
            return x
    finally:
        model.train(was_training)
    tried = f" (tried {shapes[0]}…{shapes[-1]})" if shapes else ""
    raise InputShapeError(
        f"cannot infer the input shape of {type(model).__name__}{tried}: pass example_input= (a small input batch)"
    )
