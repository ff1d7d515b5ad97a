"""Example inputs of three shapes: a tensor, a tuple of positional tensors, or a dict of keyword tensors.

Hugging Face models take keyword inputs (``model(input_ids=..., attention_mask=...)``) and their ``forward`` has a
``**kwargs`` tail that ``torch.fx`` cannot trace as an argument list; such a model's example input is a dict. For
tracing, :func:`keyword_root` gives a module whose ``forward(input_ids, attention_mask)`` takes the dict's keys
positionally and calls the model's own ``forward`` with them as keywords; it shares the model's submodules,
parameters and buffers (the same objects under the same names), so every traced path is a path of the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from fedfuse.errors import ConfigError

__all__ = [
    "ShapeProxy",
    "is_constant",
    "call_model",
    "first_tensor",
    "keyword_root",
    "map_floats",
    "positional",
    "traced_keywords",
]


def positional(example_input: Any) -> tuple[Any, ...]:
    """The example input as a tuple of positional arguments (a dict: its values, in key order)."""
    if isinstance(example_input, Mapping):
        return tuple(example_input.values())
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model(**dict)``, ``model(*tuple)`` or ``model(tensor)``."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    return model(*positional(example_input))


def map_floats(example_input: Any, fn: Any) -> Any:
    """``fn`` applied to every floating-point tensor of the example input, same container shape."""

    def one(v: Any) -> Any:
        return fn(v) if isinstance(v, torch.Tensor) and torch.is_floating_point(v) else v

    if isinstance(example_input, Mapping):
        return {k: one(v) for k, v in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return tuple(one(v) for v in example_input)
    return one(example_input)


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output leads with: itself, ``.logits`` of a Hugging Face output, or the first
    tensor of a tuple/dict."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for v in items:
        if isinstance(v, torch.Tensor):
            return v
    raise ConfigError(f"the model's output ({type(output).__name__}) holds no tensor to compare")


def keyword_root(model: nn.Module, names: list[str]) -> nn.Module:
    """A module sharing ``model``'s submodules/parameters/buffers whose ``forward`` takes ``names`` positionally
    and calls ``model.forward(**{name: value})`` (traceable by ``torch.fx``)."""
    bad = [n for n in names if not (isinstance(n, str) and n.isidentifier())]
    if bad:
        raise ConfigError(f"example input keys {bad} are not argument names; allowed: identifiers such as input_ids")
    root = nn.Module()
    for store in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(root, store, getattr(model, store))
    args = ", ".join(names)
    ns: dict[str, Any] = {}
    src = f"def forward(self, {args}):\n    return _model.forward({', '.join(f'{n}={n}' for n in names)})\n"
    exec(compile(src, f"<keyword forward of {type(model).__name__}>", "exec"), {"_model": model}, ns)  # noqa: S102
    cls = type(f"{type(model).__name__}Keywords", (nn.Module,), {"forward": ns["forward"]})
    root.__class__ = cls
    return root


def traced_keywords(model: nn.Module, example_input: Any) -> dict[str, Any]:
    """The keyword example input to trace with: ``use_cache=False`` added where the forward takes it (a key/value
    cache is an inference-time device, not part of the function; its objects cannot be traced)."""
    kw = dict(example_input)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kw
    if "use_cache" in params and "use_cache" not in kw:
        kw["use_cache"] = False
    return kw


_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_nested", "is_sparse", "layout", "is_cuda"})


class ShapeProxy(fx.Proxy):
    """A proxy whose shape/dtype/device attributes (and, through ``create_proxy``, ``size()``/``dim()`` and
    arithmetic on them) are the example's concrete values: library code (Hugging Face) slices buffers and builds
    masks from sizes, which symbolic sizes cannot do. The graph is only read on the example's shapes."""

    def __getattr__(self, k: str) -> Any:
        if k in _SHAPE_ATTRS:
            return getattr(self.tracer.values[self.node.name], k)  # type: ignore[attr-defined]
        return super().__getattr__(k)


def is_constant(val: Any) -> bool:
    if isinstance(val, (bool, int, float, torch.dtype, torch.device, torch.Size)):
        return True
    return isinstance(val, tuple) and bool(val) and all(isinstance(v, (int, bool)) for v in val)
