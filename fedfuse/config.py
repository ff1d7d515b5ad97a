"""One schema for every run option: type, default, allowed range or choices, help.

The CLI builds its flags from it, ``flwr run --run-config`` keys are checked against it, and
both fail with one line naming the option, the value and what is allowed.

This module holds the options every run has (data, model, local training, federation, faults,
output). Each strategy declares its own options next to its code (``options`` on the class);
``strategies.registry.OPTIONS`` is the full schema = these + every registered strategy's.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedfuse.catalog import (
    DATASET_NAMES,
    MODEL_NAMES,
    OMNISCIENT,
    PARTITIONS,
    PRETRAIN_TASKS,
    attack_reason,
    dataset_problem,
    model_name_problem,
)
from fedfuse.errors import ConfigError

__all__ = ["Option", "OPTIONS", "SERVER_OPTIONS", "CLIENT_INITS", "validate_config", "defaults"]

CLIENT_INITS = ("shared", "own")
OPTIMIZERS = ("sgd", "adam", "adamw")  # the clients' local optimiser (fedfuse.train.make_optimizer)


@dataclass(frozen=True)
class Option:
    """A run option. ``low``/``high`` bound numbers (``low_open`` makes the lower bound strict)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    check_value: Callable[[Any], str | None] | None = None  # extra rule: a reason the value is refused, or None

    def _range(self) -> str:
        """The bounds as text (``> 0 and <= 1``), empty when there are none."""
        bounds = ((">" if self.low_open else ">=", self.low), ("<=", self.high))
        return " and ".join(f"{op} {b:g}" for op, b in bounds if b is not None)

    def check(self, value: Any) -> Any:
        """Coerce ``value`` to the option's type and check it; raise ConfigError otherwise."""
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                v: Any = value.lower() in ("true", "1")
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            else:
                v = self.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.name}={value!r} is not a valid {self.type.__name__}") from None
        if self.type is float and not math.isfinite(v):  # nan passes every comparison; inf is no setting
            raise ConfigError(
                f"{self.name}={value!r} is not a finite number; allowed: {self._range() or 'a finite number'}"
            )
        free = (self.name == "strategy" and ":" in v) or (self.name == "dataset" and v.startswith("synthetic:"))
        if self.choices is not None and v not in self.choices and not free:
            extra = " or package.module:Class" if self.name == "strategy" else ""
            raise ConfigError(f"{self.name}={v!r} is not allowed; allowed: {', '.join(self.choices)}{extra}")
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            raise ConfigError(f"{self.name}={v!r} is out of range; allowed: {self._range()}")
        if self.high is not None and v > self.high:
            raise ConfigError(f"{self.name}={v!r} is out of range; allowed: <= {self.high:g}")
        reason = self.check_value(v) if self.check_value is not None else None
        if reason:
            raise ConfigError(f"{self.name}={v!r} {reason}")
        return v


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        Option("strategy", str, "fedavg", "strategy: a registered name or package.module:Class"),
        Option(
            "dataset",
            str,
            "digits",
            "data set (synthetic:ALPHA,BETA too)",
            choices=DATASET_NAMES,
            check_value=dataset_problem,
        ),
        Option("data-root", str, "", "directory with data files (torchvision layout); empty = cache dir"),
        Option(
            "model",
            str,
            "mlp",
            f"{'/'.join(MODEL_NAMES)}, torchvision:NAME or timm:NAME",
            check_value=model_name_problem,
        ),
        Option("width", int, 0, "hidden width (0 = the model's default)", low=0),
        Option("depth", int, 0, "hidden layers / RNN layers (0 = default)", low=0),
        Option("batch-norm", bool, False, "BatchNorm in CNN/ResNet"),
        Option("group-norm", int, 0, "GroupNorm with this many groups in CNN/ResNet instead (0 = off)", low=0),
        Option("num-clients", int, 10, "number of simulated clients (SuperNodes)", low=1),
        Option(
            "client-pool",
            int,
            0,
            "serve num-clients clients from this many SuperNodes (>= the clients sampled per round; each round "
            "the server sends every sampled client's id to a SuperNode of the pool); 0 = one SuperNode per client",
            low=0,
        ),
        Option("num-rounds", int, 5, "federated rounds", low=1),
        Option("fraction-train", float, 1.0, "fraction of clients sampled per round", low=0.0, high=1.0, low_open=True),
        Option("partition", str, "dirichlet", "partitioning scheme", choices=PARTITIONS),
        Option("alpha", float, 0.3, "Dirichlet concentration (dirichlet, quantity)", low=0.0, low_open=True),
        Option("classes-per-client", int, 2, "classes per client (pathological)", low=1),
        Option("local-epochs", int, 1, "local epochs per round", low=1),
        Option("local-epochs-max", int, 0, "if > local-epochs: per-client epochs drawn in [min, max] by seed", low=0),
        Option(
            "straggler-fraction",
            float,
            0.0,
            "per (client, round) probability of doing only a random 10-100 % of the local steps",
            low=0.0,
            high=1.0,
        ),
        Option("batch-size", int, 32, "local batch size", low=1),
        Option(
            "optimizer",
            str,
            "sgd",
            "the clients' local optimiser, fresh each round: sgd (with momentum), adam (L2 weight decay) or adamw "
            "(decoupled weight decay); adam/adamw want a smaller lr, e.g. 0.001",
            choices=OPTIMIZERS,
        ),
        Option("lr", float, 0.05, "local learning rate", low=0.0, low_open=True),
        Option("momentum", float, 0.9, "local SGD momentum (optimizer sgd only)", low=0.0, high=1.0),
        Option("weight-decay", float, 0.0, "local weight decay", low=0.0),
        Option(
            "max-grad-norm",
            float,
            0.0,
            "clip each local step's gradient to this L2 norm over the trained parameters (Hugging Face's Trainer "
            "uses 1.0); 0 = off",
            low=0.0,
        ),
        Option("lmc-monitor", bool, False, "log full and layer-wise barriers among each round's client models"),
        Option("save-client-models", int, 0, "save the client models received in this round (0 = off)", low=0),
        Option(
            "client-init",
            str,
            "shared",
            "how clients start round 1: shared = from the global model (then wb = match = FedAvg: every client's "
            "units stay in the same order, so alignment is the identity); own = each from its own seed-derived "
            "init (models trained apart; with LoRA: the run's frozen base, each client's own adapter init), fused "
            "after round 1; later rounds are ordinary FL from the fused model",
            choices=CLIENT_INITS,
        ),
        Option(
            "client-init-from",
            str,
            "",
            "directory with one state dict per client, partition<P>.pt (e.g. a run's clients/round1/ from "
            "--save-client-models 1): client P starts round 1 from it (implies client-init own; with LoRA the file may "
            "hold only the adapters and head, on the run's frozen base); empty = off",
        ),
        Option(
            "one-shot",
            bool,
            False,
            "alias of client-init own: clients start round 1 from their own inits and are fused once; with "
            "rounds > 1 the later rounds are ordinary FL from the fused model",
        ),
        Option("fail-prob", float, 0.0, "fault injection: probability a client raises in a round", low=0.0, high=1.0),
        Option(
            "straggle-prob",
            float,
            0.0,
            "fault injection: probability a client's reply counts as late (simulated: no actor is held)",
            low=0.0,
            high=1.0,
        ),
        Option(
            "attack",
            str,
            "",
            "simulated attack: scale:S, signflip:S, num-examples:V, extra-bytes:B, alie:Z, ipm:EPS, adaptive:RATIO, "
            "evade:COS, lowkey:RATIO, freeride:RATIO, labelflip[:BOOST], noise:S (fedfuse.attacks)",
            check_value=attack_reason,
        ),
        Option("attackers", int, 1, "number of attacking clients (chosen from the seed) when attack is set", low=0),
        Option("round-timeout", float, 600.0, "seconds the server waits for replies per round", low=0.0, low_open=True),
        Option(
            "eval-every",
            int,
            1,
            "central evaluation every N rounds (and round 0 and the last); other rounds' rows have NaN accuracy/loss",
            low=1,
        ),
        Option(
            "checkpoint-every",
            int,
            1,
            "checkpoint every K rounds (and the last); --resume continues after the last checkpoint",
            low=1,
        ),
        Option(
            "plot",
            bool,
            True,
            "write accuracy.png at the end of the run (matplotlib: 0.3-0.5 s; metrics.json/csv hold the same numbers)",
        ),
        Option("client-threads", int, 1, "torch threads per client (part of bit-reproducibility)", low=1),
        Option("seed", int, 0, "seed for partitions, init, sampling and shuffling", low=0),
        Option("out", str, "runs/latest", "output directory"),
        Option(
            "base",
            str,
            "",
            "a pretrained base: a state dict of the model (torch.save(model.state_dict())) every client and the "
            "server start from (fine-tuning; LoRA strategies keep it frozen); a LoRA model's (a LoRA run's model.pt) "
            "is folded with this run's lora-alpha and lora-scale; empty = the model's own init",
        ),
        Option(
            "pretrain",
            str,
            "none",
            "pretrain the base centrally inside the run: low-classes = on the training samples of the lower half "
            "of the classes (the federated task, all classes, is then a shifted one); none = off",
            choices=PRETRAIN_TASKS,
        ),
        Option("pretrain-epochs", int, 5, "epochs of the pretrain task", low=1),
    ]
}


def defaults(options: Mapping[str, Option] | None = None) -> dict[str, Any]:
    """Every option at its default."""
    return {name: o.default for name, o in (OPTIONS if options is None else options).items()}


def validate_config(
    config: Mapping[str, Any], *, options: Mapping[str, Option] | None = None, fill_defaults: bool = True
) -> dict[str, Any]:
    """Check every key and value against ``options`` (default: the core options); unknown keys fail with
    the nearest valid key suggested."""
    options = OPTIONS if options is None else options
    out = defaults(options) if fill_defaults else {}
    for key, value in config.items():
        if key not in options:
            near = difflib.get_close_matches(key, list(options), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; allowed: {', '.join(options)}"
            raise ConfigError(f"unknown option {key!r}{hint}")
        out[key] = options[key].check(value)
    if out.get("local-epochs-max", 0) and out["local-epochs-max"] < out["local-epochs"]:
        raise ConfigError(
            f"local-epochs-max={out['local-epochs-max']} is below local-epochs={out['local-epochs']}; "
            "allowed: 0 (off) or >= local-epochs"
        )
    momentum = options["momentum"].default if "momentum" in options else None
    if out.get("optimizer", "sgd") != "sgd" and out.get("momentum", momentum) != momentum:  # Adam: betas, no momentum
        raise ConfigError(
            f"momentum={out['momentum']} applies to optimizer sgd; got optimizer={out['optimizer']!r} "
            "(Adam's moment decay is fixed at betas=(0.9, 0.999))"
        )
    if out.get("client-pool", 0):
        _check_pool(out)
    if str(out.get("attack", "none") or "none") != "none" and "num-clients" in out:
        _check_attackers(str(out["attack"]), int(out.get("attackers", 1)), int(out["num-clients"]))
    elif int(out.get("attackers", 1)) > 1:  # would simulate nothing, silently
        raise ConfigError(
            f"attackers={out['attackers']} has no attack to run (attack is not set); allowed: set attack "
            "(e.g. --attack signflip:4) or leave attackers at 1"
        )
    if out.get("save-client-models", 0) > out.get("num-rounds", math.inf):  # would save nothing, silently
        raise ConfigError(
            f"save-client-models={out['save-client-models']} is past the run's last round (num-rounds="
            f"{out['num-rounds']}); allowed: 0 (off) or 1..{out['num-rounds']}"
        )
    return out


def round_sample_size(num_clients: int, fraction: float) -> int:
    """Clients a train round samples: ``min(N, max(1, ceil(fraction·N)))`` (:func:`fedfuse.experiment.sample_clients`
    with the registry's ``min_train_nodes``)."""
    return min(num_clients, max(1, math.ceil(fraction * num_clients)))


def _check_attackers(attack: str, attackers: int, n: int) -> None:
    """At most every client attacks; an omniscient attack (it recomputes the honest updates) needs one honest."""
    omniscient = attack.split(":", 1)[0] in OMNISCIENT
    top = n - 1 if omniscient else n
    if attackers > top:
        why = f"; attack {attack!r} recomputes the honest clients' updates: one must be honest" if omniscient else ""
        raise ConfigError(f"attackers={attackers} exceeds the {top} allowed of num-clients={n}{why}; allowed: 0..{top}")


def _check_pool(cfg: Mapping[str, Any]) -> None:
    """A pool of ``client-pool`` SuperNodes must hold every client a round samples, and no more than one per client."""
    pool, n = int(cfg["client-pool"]), int(cfg["num-clients"])
    if pool > n:
        raise ConfigError(f"client-pool={pool} exceeds num-clients={n}; allowed: 0 (off) or 1..{n}")
    need = round_sample_size(n, float(cfg["fraction-train"]))
    if pool < need:
        raise ConfigError(
            f"client-pool={pool} is below the {need} clients a round samples (fraction-train={cfg['fraction-train']:g} "
            f"of num-clients={n}); allowed: 0 (off) or {need}..{n}"
        )


SERVER_OPTIONS = (
    Option(
        "server-data",
        int,
        0,
        "N unlabeled inputs the server holds (FedDF), for cca/zip and distill-epochs (0 = none); in simulation "
        "a seeded draw from the training split, i.e. the clients' own distribution",
        low=0,
    ),
    Option(
        "distill-epochs",
        int,
        0,
        "FedDF: after aggregation, distil the clients' averaged logits on the server-data batch into the "
        "global model for this many epochs (0 = off)",
        low=0,
    ),
)  # the server's own data: run options of every strategy that can distil
