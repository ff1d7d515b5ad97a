"""Strategy names → classes, the full option schema, and construction from a run config.

Adding a strategy = one module + one line in :data:`STRATEGIES` + its options in
:data:`strategies.options.STRATEGY_OPTIONS` (the class's ``options``, :class:`fedfuse.config.Option`); its
construction is in ``config_kwargs``. This module merges the options into the schema the CLI, ``flwr run`` and the
ServerApp validate against, from the table alone: checking a config imports no strategy (no torch, Flower, POT).

A name is a registered one (``fedavg``) or any ``package.module:Class`` path to a Flower Message-API
strategy, so users plug their own in (constructed with FedAvg's sampling arguments, or through its own
``from_config(cfg, model=..., example_input=..., **fedavg_kwargs)`` when it has one).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedfuse import config as core
from fedfuse.config import Option
from fedfuse.errors import ConfigError
from strategies.options import STRATEGY_OPTIONS

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

__all__ = [
    "STRATEGIES", "OPTIONS", "OWNERS", "resolve_strategy", "build_strategy", "config_arguments", "validate_config",
    "options_for",
]  # fmt: skip
log = logging.getLogger("fedfuse")

STRATEGIES: dict[str, str] = {
    "fedavg": "strategies.base:FedFuseStrategy",
    "fedprox": "strategies.prox:FedProx",
    "fedpfn": "strategies.pfn:FedPFN",
    "fedpnu": "strategies.pfn:FedPNU",
    "match": "strategies.fusion:FedMatch",
    "wb": "strategies.fusion:FedWB",
    "gwb": "strategies.fusion:FedGWB",
    "cca": "strategies.fusion:FedCCA",
    "zip": "strategies.fusion:FedZip",
    "heterofl": "strategies.heterofl:HeteroFL",
    "layerwise": "strategies.layerwise:LayerwiseAvg",
    "fedavg-lora": "strategies.lora:FedAvgLoRA",
    "fedex-lora": "strategies.lora:FedExLoRA",
    "aligned-lora": "strategies.lora:AlignedLoRA",
    "svd-lora": "strategies.lora:SVDLoRA",
    "hetlora": "strategies.lora:HetLoRA",
    "flora": "strategies.lora:FLoRA",
}

KEEPS_CLIENT_STATE = frozenset({"layerwise"})  # clients keep state in Context.state between rounds: no client-pool


def _import(path: str, name: str) -> type[Strategy]:
    from flwr.serverapp.strategy import Strategy

    module_name, _, attr = path.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # a user's module beside them, as `python -m` finds it
        sys.path.append(os.getcwd())
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"strategy={name!r} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy={name!r} is not a flwr.serverapp.strategy.Strategy subclass")
    return cls


def resolve_strategy(name: str) -> type[Strategy]:
    """The strategy class for a registered name or a ``package.module:Class`` path."""
    path = STRATEGIES.get(name, name)
    if ":" not in path:
        raise ConfigError(f"strategy={name!r} is unknown; allowed: {', '.join(STRATEGIES)} or package.module:Class")
    return _import(path, name)


def _schema() -> tuple[dict[str, Option], dict[str, list[str]]]:
    """(every option, option name → the registered strategies that read it)."""
    options = dict(core.OPTIONS)
    options["strategy"] = replace(core.OPTIONS["strategy"], choices=tuple(STRATEGIES))
    owners: dict[str, list[str]] = {}
    for name in STRATEGIES:
        for opt in STRATEGY_OPTIONS[name]:
            if opt.name in core.OPTIONS or options.get(opt.name, opt) != opt:
                raise ConfigError(f"strategy {name!r} redefines option {opt.name!r} differently")
            options[opt.name] = opt
            owners.setdefault(opt.name, []).append(name)
    return options, owners


OPTIONS, OWNERS = _schema()


def validate_config(
    config: Mapping[str, Any], *, fill_defaults: bool = True, check_owners: bool = True
) -> dict[str, Any]:
    """:func:`fedfuse.config.validate_config` on the full schema; with ``check_owners``, a strategy's own
    option set to a non-default value for another registered strategy is refused (it would be ignored)."""
    cfg = core.validate_config(config, options=OPTIONS, fill_defaults=fill_defaults)
    strategy = cfg.get("strategy")
    if check_owners and strategy in STRATEGIES:
        for key, owners in OWNERS.items():
            if key in cfg and strategy not in owners and cfg[key] != OPTIONS[key].default:
                raise ConfigError(f"{key}={cfg[key]!r} needs strategy {' or '.join(owners)}; got {strategy!r}")
        needs = [f"strategy={strategy!r}"] if strategy in ("cca", "zip") else []
        needs += [f"distill-epochs={cfg['distill-epochs']}"] if cfg.get("distill-epochs") else []
        if cfg.get("distill-epochs") and (cfg.get("bn-repair", "none") != "none" or cfg.get("client-widths")):
            other = "bn-repair" if cfg.get("bn-repair", "none") != "none" else "client-widths"
            raise ConfigError(f"distill-epochs={cfg['distill-epochs']} cannot be combined with {other}={cfg[other]!r}")
        if cfg.get("client-pool") and strategy in KEEPS_CLIENT_STATE:
            raise ConfigError(
                f"client-pool={cfg['client-pool']} cannot serve strategy={strategy!r}: its clients keep personal "
                "layers in their SuperNode's Context.state between rounds, so each needs its own SuperNode; allowed: "
                "client-pool 0"
            )
        if (
            cfg.get("trusted-data") not in (None, 0, OPTIONS["trusted-data"].default)
            and cfg.get("direction-guard", "median") == "off"
        ):  # the default reference is simply unused without the guard
            raise ConfigError(
                f"trusted-data={cfg['trusted-data']} is the direction guard's reference and needs direction-guard "
                "median; got direction-guard='off'"
            )
        if needs and int(cfg.get("server-data", 0)) < 2:
            raise ConfigError(
                f"{' and '.join(needs)} needs server-data >= 2 (unlabeled inputs the server holds, e.g. "
                f"--server-data 200); got server-data={cfg.get('server-data', 0)}"
            )
    return cfg


def options_for(cfg: Mapping[str, Any], strategy: str) -> dict[str, Any]:
    """``cfg`` for ``strategy``: options only other registered strategies read are reset to their defaults."""
    if strategy not in STRATEGIES:
        return {**cfg, "strategy": strategy}
    reset = {k: OPTIONS[k].default for k, owners in OWNERS.items() if k in cfg and strategy not in owners}
    return {**cfg, **reset, "strategy": strategy}


def config_arguments(
    cls: Any, cfg: Mapping[str, Any], model: Any, example_input: Any, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """A :class:`strategies.base.FedFuseStrategy` subclass ``cls``'s constructor arguments for the run config
    ``cfg``: FedAvg's sampling ``kwargs``, the seed, partition discovery, the client pool, the defences
    (:data:`fedfuse.screening.ROBUST_OPTIONS`; the trusted reference only for a strategy that has the option),
    FedDF distillation, and ``cls.config_kwargs`` (the strategy's own options)."""
    from fedfuse.screening import ROBUST_OPTIONS
    from fedfuse.trust import trusted_reference

    own = cls.config_kwargs(cfg, model=model, example_input=example_input)
    defences = {o.name.replace("-", "_"): cfg[o.name] for o in ROBUST_OPTIONS if o.name in cfg}
    owns_trust = any(o.name == "trusted-data" for o in cls.options)  # FedPFN, layer-wise: not theirs
    wanted = defences.pop("trusted_data", 0)
    defences["trusted"] = trusted_reference(cfg, model) if wanted and owns_trust else None
    if wanted and not owns_trust and cfg.get("direction-guard", "median") != "off":
        log.warning("strategy %r measures updates against the round's median update: trusted-data (the server's "
                    "own update) and the influence test are not used by it", cfg["strategy"])  # fmt: skip
    if int(cfg["num-clients"]) < 3:
        log.warning(
            "num-clients=%d: the direction guard, the trusted reference and the influence test need 3 "
            "clients a round and are off; only the claim cap and the norm bound act",
            int(cfg["num-clients"]),
        )
    if int(cfg.get("distill-epochs", 0)):
        defences |= {"distill_epochs": int(cfg["distill-epochs"]), "distill_model": model}
    pool = int(cfg["num-clients"]) if int(cfg.get("client-pool", 0)) else 0
    return {**kwargs, "seed": int(cfg["seed"]), "discover_partitions": True, "pool_clients": pool, **defences, **own}


def build_strategy(
    cfg: Mapping[str, Any], model: Any = None, example_input: Any = None, server_data: Any = None
) -> Strategy:
    """Instantiate the configured strategy with FedAvg-style sampling arguments for ``num-clients`` nodes;
    ``server_data`` (the server's unlabeled batch, :func:`fedfuse.experiment.server_batch`) goes to ``from_config``
    when given."""
    cls = resolve_strategy(str(cfg["strategy"]))
    n = int(cfg["num-clients"])
    kwargs: dict[str, Any] = {
        "fraction_train": float(cfg["fraction-train"]),
        "fraction_evaluate": 0.0,
        "min_train_nodes": max(1, min(2, math.ceil(float(cfg["fraction-train"]) * n))),
        "min_evaluate_nodes": 0,
        "min_available_nodes": int(cfg.get("client-pool", 0)) or n,  # a pool's SuperNodes, else one per client
    }
    if server_data is not None:
        kwargs["server_data"] = server_data
    if hasattr(cls, "from_config"):
        return cls.from_config(cfg, model=model, example_input=example_input, **kwargs)
    return cls(**kwargs)
