"""Tracing with concrete values: a torch.fx graph of a model and every node's value on an example input.

The values give the shapes layout propagation (:mod:`fedfuse.align.spec`) needs and let Python control flow on
tensor properties (``x.dim()``, ``x.shape``) resolve to the example's branch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from fedfuse.align.inputs import ShapeProxy, call_model, is_constant, keyword_root, positional, traced_keywords
from fedfuse.align.rules import is_leaf
from fedfuse.align.rules.core import has_module_rule
from fedfuse.errors import ConfigError

__all__ = ["UnsupportedModelError", "trace_values"]


class UnsupportedModelError(ConfigError):
    """The model (or one op/module in its forward) cannot be described by a transport spec."""


class _ConcreteTracer(fx.Tracer):
    """``fx.Tracer`` that evaluates every node on the example input while tracing.

    The recorded values give shapes for layout propagation and let Python control flow on tensor
    properties (``x.dim()``, ``x.shape``) resolve to the example's branch.
    """

    def __init__(self, inputs: Sequence[Any], module_outputs: dict[str, list[Any]]) -> None:
        super().__init__()
        self.values: dict[str, Any] = {}
        self._inputs = list(inputs)
        self._module_outputs = module_outputs  # leaf-module outputs of an eager run, in call order
        self._calls: dict[str, int] = {}
        self.concrete_shapes = False  # set for keyword-input models (Hugging Face): see _ShapeProxy

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[no-untyped-def]
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            return node

        def value(a: Any) -> Any:
            return self.values[a.name]

        args_v = fx.node.map_arg(args, value)
        kwargs_v = fx.node.map_arg(kwargs, value)
        if kind == "placeholder":
            if self._inputs:
                self.values[node.name] = self._inputs.pop(0)
            elif args:  # an optional forward argument left at its default (made concrete in trace_values)
                self.values[node.name] = args[0]
            else:
                raise UnsupportedModelError(f"forward argument {target!r} has no example input; pass a tuple")
        elif kind == "get_attr":
            self.values[node.name] = _lookup(self.root, str(target))
        elif kind == "call_module":
            # Module.__call__/__getattr__ are patched while tracing, so leaf outputs come from an eager run
            k = self._calls.get(str(target), 0)
            self._calls[str(target)] = k + 1
            self.values[node.name] = self._module_outputs[str(target)][k]
        elif kind == "call_function":
            self.values[node.name] = target(*args_v, **kwargs_v)  # type: ignore[operator]
        elif kind == "call_method":
            self.values[node.name] = getattr(args_v[0], str(target))(*args_v[1:], **kwargs_v)
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapeProxy(node, self) if self.concrete_shapes else super().proxy(node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[no-untyped-def]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.concrete_shapes and isinstance(proxy, fx.Proxy):
            val = self.values.get(proxy.node.name)
            if is_constant(val):  # sizes, dims, dtypes: Python values, so slicing/ranges/shape arithmetic work
                return val
        return proxy

    def call_module(self, m, forward, args, kwargs):  # type: ignore[no-untyped-def]
        if not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()):
            try:
                self.path_of_module(m)
            except NameError:  # a module built inside forward (``nn.ReLU()(x)``): no state, so trace its forward
                return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_leaf(m):
            return True
        if not has_module_rule(m) and any(True for _ in m.children()):
            return False  # a torch.nn composite without a rule of its own (nn.Transformer): trace through it
        return super().is_leaf_module(m, module_qualified_name)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.values[obj.node.name])

    def iter(self, obj: fx.Proxy) -> Iterator:  # type: ignore[override]
        return (obj[i] for i in range(len(self.values[obj.node.name])))


def trace_values(model: nn.Module, example_input: Any) -> tuple[fx.Graph, dict[str, Any]]:
    """Trace ``model`` on ``example_input`` (eval mode, no grad): the fx graph and every node's value."""
    if isinstance(example_input, dict):
        example_input = traced_keywords(model, example_input)
    inputs = positional(example_input)
    root = keyword_root(model, list(example_input)) if isinstance(example_input, dict) else model
    outputs: dict[str, list[Any]] = {}
    hooks = []
    probe = _ConcreteTracer((), {})
    for name, mod in model.named_modules():
        if name and probe.is_leaf_module(mod, name):
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: outputs.setdefault(name, []).append(o)))
    tracer = _ConcreteTracer(inputs, outputs)
    tracer.concrete_shapes = root is not model or any(  # Hugging Face code slices and branches on sizes
        type(m).__module__.startswith("transformers.") for m in model.modules()
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                call_model(model, example_input)
            except Exception as exc:  # the input, not the tracing: say so
                first = (str(exc).splitlines() or [""])[0][:300]
                raise UnsupportedModelError(
                    f"example_input {_describe(example_input)} does not fit {type(model).__name__}: the model itself "
                    f"fails on it ({type(exc).__name__}: {first}); pass an input it runs on (e.g. two training samples)"
                ) from exc
            for h in hooks:
                h.remove()
            graph = tracer.trace(root, concrete_args=_defaults(root, len(inputs)))
    except UnsupportedModelError:
        raise
    except Exception as exc:  # fx raises many types (TraceError, RuntimeError, TypeError)
        first = (str(exc).splitlines() or [""])[0][:300]
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {first}); "
            "Python control flow on tensor values or unsupported constructs in forward: pass a manual TransportSpec"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return graph, tracer.values


def _describe(example: Any) -> str:
    """``of shape (2, 3, 8, 8)`` for a tensor, else the type (a dict: its keys)."""
    if isinstance(example, torch.Tensor):
        return f"of shape {tuple(example.shape)}"
    if isinstance(example, dict):
        return f"with keys {sorted(example)}"
    return f"({type(example).__name__})"


def _defaults(model: nn.Module, given: int) -> dict[str, Any] | None:
    """Forward arguments after the ``given`` example inputs, at their defaults (``attn_mask=None``): traced as
    constants, so ``if attn_mask is not None`` takes the branch the model takes when called with the inputs."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    plain = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    out = {p.name: p.default for p in plain[given:] if p.default is not inspect.Parameter.empty}
    return out or None


def _lookup(root: nn.Module, path: str) -> Any:
    """Attribute ``a.b.c`` of ``root`` via ``__dict__`` (the tracer patches ``Module.__getattr__``)."""
    obj: Any = root
    for part in path.split("."):
        if isinstance(obj, nn.Module):
            for store in ("_parameters", "_buffers", "_modules"):
                if part in obj.__dict__.get(store, {}):
                    obj = obj.__dict__[store][part]
                    break
            else:
                obj = object.__getattribute__(obj, part)
        else:
            obj = getattr(obj, part)
    return obj
