"""What a run config means, in one place: the model, each client's data and local schedule.

The Flower client, the server and the plain-loop benchmarks all call these, so the same
config gives the same partitions, inits and local training everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfuse import protocol
from fedfuse.data import Dataset, load_dataset
from fedfuse.data.partition import partition_indices
from fedfuse.errors import ConfigError
from fedfuse.models import build_model
from fedfuse.train import TrainResult, make_optimizer, train

__all__ = [
    "dataset_for",
    "model_for",
    "is_adapted",
    "ADAPTING_OPTIONS",
    "client_data",
    "LocalPlan",
    "local_plan",
    "local_train",
    "derive_seed",
    "round_mask",
    "inject_faults",
    "sample_clients",
    "client_widths",
    "client_model",
    "INIT_FILE",
    "init_mode",
    "own_init_seed",
    "init_path",
    "load_init_state",
    "check_init_files",
    "apart_model",
    "server_batch",
]


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across machines (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def dataset_for(cfg: Mapping[str, Any]) -> Dataset:
    """The run's data set (cached per process)."""
    return load_dataset(str(cfg["dataset"]), cfg.get("data-root") or None, int(cfg["seed"]))


ADAPTING_OPTIONS = ("base", "pretrain", "lora-rank", "lora-ranks")  # what turns the built model into a LoRA/base one


def is_adapted(cfg: Mapping[str, Any]) -> bool:
    """Whether :func:`model_for` loads a base (``base``/``pretrain``) or wraps adapters (``lora-rank(s)``) around the
    built architecture."""
    return bool(
        cfg.get("base") or str(cfg.get("pretrain", "none")) != "none" or cfg.get("lora-rank") or cfg.get("lora-ranks")
    )


def model_for(
    cfg: Mapping[str, Any], ds: Dataset, seed: int | None = None, width: int | None = None, lora_rank: int | None = None
) -> nn.Module:
    """The run's model; ``seed`` fixes the init (default: the run seed), ``width`` overrides the hidden width. With
    ``base``/``pretrain`` the pretrained base is loaded, with LoRA on (``lora-rank``/``lora-ranks``) adapters of
    ``lora_rank`` (default: the global rank) wrap it (:func:`fedfuse.lora.run.adapt_model`). Then ``seed`` draws
    only the adapters' init: the base is the run's in every process — built from the run seed before it is
    pretrained, or, with neither base nor pretraining, that init itself."""
    adapted = is_adapted(cfg)
    model = _built_model(cfg, ds, None if adapted else seed, width)
    if adapted:
        from fedfuse.lora.run import adapt_model

        model = adapt_model(cfg, ds, model, lora_rank, seed)
    return model


def _built_model(cfg: Mapping[str, Any], ds: Dataset, seed: int | None, width: int | None) -> nn.Module:
    w = width if width is not None else int(cfg.get("width", 0))
    d = int(cfg.get("depth", 0))
    return build_model(
        str(cfg["model"]),
        ds.input_shape,
        ds.num_classes,
        width=w or None,
        depth=d or None,
        batch_norm=bool(cfg.get("batch-norm", False)),
        group_norm=int(cfg.get("group-norm", 0)),
        seed=int(cfg["seed"]) if seed is None else seed,
    )


def client_data(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s training tensors under the configured partitioning scheme; for a federated data
    set (``synthetic``) client ``partition_id``'s own data, whatever ``num_partitions`` (no partitioner)."""
    ds = dataset_for(cfg)
    if ds.federation is not None:
        return ds.federation.client(partition_id)
    parts = partition_indices(
        ds.y_train.numpy(),
        str(cfg["partition"]),
        num_partitions,
        alpha=float(cfg["alpha"]),
        classes_per_client=int(cfg["classes-per-client"]),
        seed=int(cfg["seed"]),
    )
    idx = torch.as_tensor(parts[partition_id])
    return ds.x_train[idx], ds.y_train[idx]


@dataclass(frozen=True)
class LocalPlan:
    """A client's work in one round: epochs, an optional step cap (straggler) and the shuffling seed."""

    epochs: int
    max_steps: int | None
    seed: int
    straggler: bool


def local_plan(cfg: Mapping[str, Any], partition_id: int, server_round: int, num_samples: int) -> LocalPlan:
    """System heterogeneity from the seed alone.

    - epochs: ``local-epochs``, or with ``local-epochs-max`` > it, a per-client draw in [min, max]
      fixed for the whole run (a slow device stays slow);
    - straggler: with probability ``straggler-fraction`` per (client, round), the client completes only
      a uniform fraction in [0.1, 1) of its local steps (FedProx-style partial work).
    """
    seed = int(cfg["seed"])
    lo, hi = int(cfg["local-epochs"]), int(cfg.get("local-epochs-max", 0))
    epochs = lo
    if hi > lo:
        epochs = int(np.random.default_rng(derive_seed(seed, partition_id, 1)).integers(lo, hi + 1))
    rng = np.random.default_rng(derive_seed(seed, partition_id, server_round, 2))
    straggler = bool(rng.random() < float(cfg.get("straggler-fraction", 0.0)))
    max_steps = None
    if straggler:
        steps = epochs * -(-num_samples // int(cfg["batch-size"]))
        max_steps = max(1, int(steps * rng.uniform(0.1, 1.0)))
    return LocalPlan(epochs, max_steps, derive_seed(seed, partition_id, server_round, 3), straggler)


def local_train(
    cfg: Mapping[str, Any], model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: LocalPlan, **kwargs: Any
) -> TrainResult:
    """One client's local update under ``plan`` with the configured optimiser (``optimizer``, fresh each round) and
    hyper-parameters; ``kwargs`` go to :func:`fedfuse.train.train` (an explicit ``optimizer`` object wins)."""
    lr, momentum, decay = float(cfg["lr"]), float(cfg["momentum"]), float(cfg["weight-decay"])
    if "optimizer" not in kwargs:
        kwargs["optimizer"] = make_optimizer(str(cfg.get("optimizer", "sgd")), model.parameters(), lr, momentum, decay)
    return train(
        model,
        x,
        y,
        epochs=plan.epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=decay,
        batch_size=int(cfg["batch-size"]),
        seed=plan.seed,
        max_steps=plan.max_steps,
        max_grad_norm=float(cfg.get("max-grad-norm", 0.0)),
        **kwargs,
    )


def client_widths(cfg: Mapping[str, Any]) -> list[int]:
    """The ``client-widths`` option as a list (empty: every client has the global width)."""
    text = str(cfg.get("client-widths", "")).strip()
    return [int(w) for w in text.split(",")] if text else []


def width_arguments(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A width-heterogeneous strategy's ``client_widths`` and ``model_factory(width) -> module`` arguments (both
    ``None`` when every client has the global width)."""
    widths = client_widths(cfg)
    return {
        "client_widths": widths or None,
        "model_factory": (lambda w: model_for(cfg, dataset_for(cfg), width=w)) if widths else None,
    }


def client_model(cfg: Mapping[str, Any], ds: Dataset, partition_id: int, seed: int | None = None) -> nn.Module:
    """The model a client trains: the global architecture, at its own width under width heterogeneity."""
    widths = client_widths(cfg)
    from fedfuse.lora.run import client_rank, lora_on

    rank = client_rank(cfg, partition_id) if lora_on(cfg) else None
    return model_for(cfg, ds, seed=seed, width=widths[partition_id % len(widths)] if widths else None, lora_rank=rank)


INIT_FILE = "partition{}.pt"  # client P's round-1 model in --client-init-from DIR (--save-client-models' names)


def init_mode(cfg: Mapping[str, Any]) -> str:
    """How clients start round 1: ``shared`` (the global model), ``own`` (own seeds) or ``files``.

    ``one-shot`` is an alias of ``client-init=own``; ``client-init-from`` implies starting apart, from files.
    """
    if str(cfg.get("client-init-from", "")):
        return "files"
    if cfg.get("one-shot", False) or str(cfg.get("client-init", "shared")) == "own":
        return "own"
    return "shared"


def own_init_seed(cfg: Mapping[str, Any], partition_id: int) -> int:
    """Client ``partition_id``'s own init seed (``client-init=own``), derived from (run seed, client)."""
    return derive_seed(int(cfg["seed"]), partition_id, 13)


def init_path(cfg: Mapping[str, Any], partition_id: int) -> Path:
    """Client ``partition_id``'s file in ``client-init-from``: ``DIR/partition<P>.pt``, or where that is absent, a
    PEFT ``save_pretrained`` directory ``DIR/partition<P>/`` (a LoRA run's sites' adapters)."""
    from fedfuse.lora.fold import is_peft_dir

    path = Path(str(cfg["client-init-from"])) / INIT_FILE.format(partition_id)
    return path.with_suffix("") if not path.is_file() and is_peft_dir(path.with_suffix("")) else path


def load_init_state(
    path: str | Path, template: nn.Module, what: str = "client-init-from", lora: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` checked against ``template`` (:func:`fedfuse.checkpoint.read_state_dict`: never
    unpickles code); ConfigError with one line naming ``what`` and the file otherwise. ``lora``: ``template`` is a
    LoRA client's model; the file may hold only what trains (adapters, head: what ``--save-client-models`` or
    :func:`fedfuse.lora.run.adapter_state` gives), the frozen base comes from the run and must match where given."""
    from fedfuse.checkpoint import check_read_state, read_state_dict
    from fedfuse.lora.fold import as_client_adapters, is_peft_dir, read_peft_adapter

    peft = is_peft_dir(path)
    if peft and not lora:
        raise ConfigError(f"{what}: {str(path)!r} is a PEFT adapter directory; it needs a LoRA run (--lora-rank)")
    if not lora:
        return read_state_dict(path, template.state_dict(), what=what)
    from fedfuse.lora.run import frozen_state

    hint = "pass the --base/--pretrain, --lora-rank(s), --lora-targets and --lora-head it was trained with"
    if not peft:
        return read_state_dict(path, template.state_dict(), what=what, hint=hint, fixed=frozen_state(template))
    try:
        adapter, alpha, scale = read_peft_adapter(path)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    state = as_client_adapters(adapter, alpha, scale, template)
    return check_read_state(state, template.state_dict(), where=f"{what}: {str(path)!r}", hint=hint,
                            fixed=frozen_state(template))  # fmt: skip


def check_init_files(cfg: Mapping[str, Any], ds: Dataset) -> None:
    """``client-init-from``: a directory holding ``partition<P>.pt`` for every client P < ``num-clients``, each a
    state dict of tensors that fits that client's model; ConfigError with one line otherwise."""
    directory, n = Path(str(cfg["client-init-from"])), int(cfg["num-clients"])
    wanted = (f"a directory with {INIT_FILE.format(0)} .. {INIT_FILE.format(n - 1)} (one state dict per client; "
              "in a LoRA run also PEFT adapter directories partition0/ ..)")  # fmt: skip
    if not directory.is_dir():
        raise ConfigError(f"client-init-from={str(directory)!r} is not a directory; allowed: {wanted}")
    missing = [p for p in range(n) if not init_path(cfg, p).exists()]
    if missing:
        raise ConfigError(
            f"client-init-from={str(directory)!r} lacks {INIT_FILE.format(missing[0])}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; num-clients={n} needs {wanted}"
        )
    from fedfuse.lora.run import lora_on

    for p in range(n):
        load_init_state(init_path(cfg, p), client_model(cfg, ds, p), lora=lora_on(cfg))


def apart_model(
    cfg: Mapping[str, Any], ds: Dataset, partition_id: int, node_file: str | None = None
) -> nn.Module | None:
    """Client ``partition_id``'s round-1 model when clients start apart (:func:`init_mode` not ``shared``), else
    None (the client starts from the global model it received).

    In order: the node's own file ``node_file`` (a deployed SuperNode's ``init-from`` node config), the client's
    file in ``client-init-from``, its own seed (:func:`own_init_seed`). The model is the client's architecture
    (:func:`client_model`, its own width under width heterogeneity, its own LoRA rank). With LoRA the run's frozen
    base stays: an own seed draws only the adapters, a file may hold only what trains (:func:`load_init_state`).
    """
    mode = init_mode(cfg)
    if mode == "shared":
        return None
    if node_file or mode == "files":
        model = client_model(cfg, ds, partition_id)
        what = "node config init-from" if node_file else "client-init-from"
        from fedfuse.lora.run import lora_on

        path = node_file or init_path(cfg, partition_id)
        model.load_state_dict(load_init_state(path, model, what, lora=lora_on(cfg)))
        return model
    return client_model(cfg, ds, partition_id, seed=own_init_seed(cfg, partition_id))


def sample_clients(seed: int, server_round: int, num_clients: int, fraction: float, min_clients: int = 1) -> list[int]:
    """Sorted indices of the ``max(ceil(fraction·N), min_clients)`` clients sampled in a round, from (seed, round)."""
    k = min(num_clients, max(math.ceil(fraction * num_clients), min_clients))
    rng = np.random.default_rng(derive_seed(seed, server_round, 7))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def inject_faults(cfg: Mapping[str, Any], partition_id: int, server_round: int) -> bool:
    """Simulated client faults, drawn from (seed, client, round): raise with ``fail-prob``; with
    ``straggle-prob`` return True: this client is a straggler whose reply counts as arriving after
    ``round-timeout``. It does not sleep: a sleeping client would hold a simulation actor (Ray runs as many
    clients at a time as it has actors), so honest clients queued behind it would be late too and the
    number of late replies would measure the actor count, not what was injected. The ClientApp replies at
    once with :data:`fedfuse.protocol.INJECTED_LATE` and the ServerApp counts that reply as late."""
    rng = np.random.default_rng(derive_seed(int(cfg["seed"]), partition_id, server_round, 5))
    fail, straggle = rng.random(), rng.random()
    if fail < float(cfg.get("fail-prob", 0.0)):
        raise RuntimeError(f"injected fault: partition {partition_id} failed in round {server_round}")
    return bool(straggle < float(cfg.get("straggle-prob", 0.0)))


def round_mask(config: Mapping[str, Any], model: nn.Module, server_round: int) -> dict[str, torch.Tensor] | None:
    """The fixed mask a PFN-family strategy asked for in this round's config, or None.

    ``pfn-mode`` = ``"pfn"``: one mask from ``pfn-seed`` for the whole run (FedPFN);
    ``"pnu"``: redrawn from (``pfn-seed``, round) every round (FedPNU). Server and clients call this
    with the same config, so masks never travel over the wire.
    """
    from fedfuse.subspace import pfn_mask, pnu_mask

    mode = str(config.get(protocol.PFN_MODE, ""))
    if not mode:
        return None
    ratio, seed = float(config[protocol.PFN_RATIO]), int(config[protocol.PFN_SEED])
    granularity = str(config.get(protocol.PFN_GRANULARITY, "weight"))
    if mode == "pfn":
        return pfn_mask(model, ratio, seed, granularity=granularity)  # type: ignore[arg-type]
    if mode == "pnu":
        return pnu_mask(model, ratio, seed, server_round, granularity=granularity)  # type: ignore[arg-type]
    raise ValueError(f"pfn-mode={mode!r} is unknown; allowed: pfn, pnu")


def server_batch(cfg: Mapping[str, Any], ds: Dataset) -> torch.Tensor | None:
    """The ``server-data`` = N unlabeled inputs the server holds (FedDF's unlabeled set), or None when N = 0.

    N training inputs drawn without replacement by a generator seeded with ``derive_seed(seed, 29)``; labels are
    dropped. In simulation they come from the same training split, hence the same distribution, as the clients'
    data (and may be among their samples): an optimistic stand-in for a server's own unlabeled public data.
    """
    n = int(cfg.get("server-data", 0))
    if n <= 0:
        return None
    total = len(ds.x_train)
    if n > total:
        raise ConfigError(f"server-data={n} exceeds the {total} training samples of {ds.name!r}; allowed: 0..{total}")
    gen = torch.Generator().manual_seed(derive_seed(int(cfg["seed"]), 29))
    return ds.x_train[torch.randperm(total, generator=gen)[:n]].clone()
