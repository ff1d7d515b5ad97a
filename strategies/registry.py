"""Strategy names → classes, and construction from a validated run config.

A name is a built-in (``fedavg``) or any ``package.module:Class`` path to a Flower Message-API
strategy, so users plug their own in.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedfuse.config import STRATEGY_NAMES
from fedfuse.errors import ConfigError

__all__ = ["BUILTIN", "resolve_strategy", "build_strategy"]

BUILTIN: dict[str, str] = {
    "fedavg": "strategies.base:FedFuseStrategy",
    "fedpfn": "strategies.pfn:FedPFN",
    "fedpnu": "strategies.pfn:FedPNU",
    "match": "strategies.fusion:FedMatch",
    "wb": "strategies.fusion:FedWB",
    "gwb": "strategies.fusion:FedGWB",
    "layerwise": "strategies.layerwise:LayerwiseAvg",
}
assert set(BUILTIN) == set(STRATEGY_NAMES), "fedfuse.config.STRATEGY_NAMES and BUILTIN must list the same names"


def resolve_strategy(name: str) -> type[Strategy]:
    """The strategy class for a built-in name or a ``package.module:Class`` path."""
    path = BUILTIN.get(name, name)
    if ":" not in path:
        raise ConfigError(f"strategy={name!r} is unknown; allowed: {', '.join(BUILTIN)} or package.module:Class")
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"strategy={name!r} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy={name!r} is not a flwr.serverapp.strategy.Strategy subclass")
    return cls


def build_strategy(
    cfg: Mapping[str, Any], template: nn.Module | None = None, example_input: torch.Tensor | None = None
) -> Strategy:
    """Instantiate the configured strategy with FedAvg-style sampling arguments.

    fedfuse strategies also get the run seed, a ``template`` module of the global architecture and
    their own options from the config (``pfn-*``).
    """
    cls = resolve_strategy(str(cfg["strategy"]))
    n = int(cfg["num-clients"])
    kwargs: dict[str, Any] = {
        "fraction_train": float(cfg["fraction-train"]),
        "fraction_evaluate": 0.0,
        "min_train_nodes": max(1, min(2, math.ceil(float(cfg["fraction-train"]) * n))),
        "min_evaluate_nodes": 0,
        "min_available_nodes": n,
    }
    from strategies.base import FedFuseStrategy
    from strategies.fusion import FedFusion
    from strategies.layerwise import LayerwiseAvg
    from strategies.pfn import FedPFN

    if cfg.get("client-widths") and not issubclass(cls, FedFusion):
        raise ConfigError(f"client-widths={cfg['client-widths']!r} needs strategy wb or gwb; got {cfg['strategy']!r}")
    if issubclass(cls, FedFuseStrategy):
        kwargs["seed"] = int(cfg["seed"])
        kwargs["template"] = template
    if issubclass(cls, FedPFN):
        kwargs["pfn_ratio"] = float(cfg["pfn-ratio"])
        kwargs["pfn_granularity"] = str(cfg["pfn-granularity"])
        kwargs["fusion"] = str(cfg["pfn-fusion"])
        kwargs["example_input"] = example_input
    if issubclass(cls, FedFusion):
        kwargs["example_input"] = example_input
        kwargs["solver"] = str(cfg["fusion-solver"])
        kwargs["epsilon"] = float(cfg["fusion-epsilon"])
        kwargs["max_iter"] = int(cfg["fusion-iters"]) or None
        kwargs["bn_repair"] = str(cfg["bn-repair"])
        if cfg["client-widths"]:
            from fedfuse.experiment import client_widths, dataset_for, model_for

            ds = dataset_for(cfg)
            kwargs["client_widths"] = client_widths(cfg)
            kwargs["model_factory"] = lambda w: model_for(cfg, ds, width=w)
    if issubclass(cls, LayerwiseAvg):  # personalised evaluation on every client's holdout, every round
        kwargs["preset"] = str(cfg["layerwise-preset"])
        kwargs["fraction_evaluate"] = 1.0
    return cls(**kwargs)
