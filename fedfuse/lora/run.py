"""What the LoRA run options mean: ranks per client, the frozen base (a user's checkpoint or pretrained inside
the run) and the adapted model. Called by :mod:`fedfuse.experiment` (models), the ClientApp and the CLI checks.

Options: ``lora-rank`` (0 = off), ``lora-ranks`` (``"4,8,16"``: client with partition p gets ranks[p % len]; the
global adapters have the largest), ``lora-targets`` (module-name globs, ``PAT:R`` for a rank of its own; empty =
every Linear/Conv2d but the head), ``lora-alpha`` (scale alpha / r), ``lora-scale`` (``standard``: alpha / r;
``rslora``: alpha / √r, PEFT's ``use_rslora``), ``lora-head`` (``auto``: the output layer is
trained fully and travels, as PEFT's ``modules_to_save`` for a classifier; ``none``; or module-name globs) and
``lora-bias`` (``none``/``lora_only``/``all``: which biases are trainable and travel, PEFT's ``bias``). Base:
``base`` (a state dict of the model, read with ``torch.load(weights_only=True)``) or ``pretrain`` = ``low-classes``:
the model is trained centrally on the training samples of the lower half of the classes (labels < C/2) for
``pretrain-epochs`` epochs (SGD lr 0.05, momentum 0.9, batch 32, whatever the fine-tuning's), seeded by the run
seed, so every process (server, each client) computes the same base — a stand-in for a public pretrained checkpoint.
The federated task (all classes, partitioned non-IID) is then a shifted one: half its classes are new to the base.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfuse.catalog import LORA_ALPHA, PRETRAIN_TASKS
from fedfuse.catalog import positive_ints_reason as ranks_reason  # noqa: F401  (a lora-ranks value's check)
from fedfuse.errors import ConfigError
from fedfuse.lora.layers import check_alpha, check_scale, head_modules, inject_lora, target_modules, travelling_state

__all__ = [
    "PRETRAIN_TASKS",
    "lora_ranks",
    "lora_on",
    "client_rank",
    "global_rank",
    "ranks_reason",
    "base_state",
    "adapt_model",
    "check_lora",
    "load_received",
    "adapter_state",
    "frozen_state",
    "base_warning",
    "lora_head",
]

_BASES: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}  # per process: (config subset) → base state


def lora_ranks(cfg: Mapping[str, Any]) -> list[int]:
    """The clients' ranks, cycled over partitions (empty: LoRA is off)."""
    text = str(cfg.get("lora-ranks", "") or "").strip()
    if text:
        return [int(r) for r in text.split(",")]
    rank = int(cfg.get("lora-rank", 0) or 0)
    return [rank] if rank > 0 else []


def lora_on(cfg: Mapping[str, Any]) -> bool:
    """Whether clients train LoRA adapters on a frozen base (``lora-rank`` > 0 or ``lora-ranks`` set)."""
    return bool(lora_ranks(cfg))


def client_rank(cfg: Mapping[str, Any], partition_id: int) -> int:
    """Client ``partition_id``'s rank: ``lora-ranks[p % len]``, else ``lora-rank``."""
    ranks = lora_ranks(cfg)
    return ranks[partition_id % len(ranks)]


def global_rank(cfg: Mapping[str, Any]) -> int:
    """The server's adapter rank: the largest client rank."""
    return max(lora_ranks(cfg))


def derive_seed(*parts: int) -> int:
    """:func:`fedfuse.experiment.derive_seed` (which imports this module: no cycle)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _pretrain(cfg: Mapping[str, Any], ds: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    from fedfuse.state import torch_threads
    from fedfuse.train import train

    keep = ds.y_train < ds.num_classes // 2
    with torch_threads(1):  # the same bits in every process, whatever its thread count
        train(
            model, ds.x_train[keep], ds.y_train[keep], epochs=int(cfg.get("pretrain-epochs", 5)),
            lr=0.05, momentum=0.9, batch_size=32,  # fixed: the base must not depend on the fine-tuning's SGD
            seed=derive_seed(int(cfg["seed"]), 97),
        )  # fmt: skip
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_state(cfg: Mapping[str, Any], ds: Any, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The frozen base for ``model`` (the run's architecture, freshly built): the ``base`` file, the
    ``pretrain`` task's result (cached per process), or None (neither set: the model's own init)."""
    path = str(cfg.get("base", "") or "")
    task = str(cfg.get("pretrain", "none") or "none")
    if path and task != "none":
        raise ConfigError(f"base={path!r} and pretrain={task!r} are exclusive; give one")
    if path:  # a LoRA model's state dict (a LoRA run's model.pt) is folded with this run's alpha and scale
        from fedfuse.checkpoint import read_state_dict
        from fedfuse.merge.inputs import lora_folder

        adapt = lora_folder(float(cfg.get("lora-alpha", LORA_ALPHA)), str(cfg.get("lora-scale", "standard")), model)
        return read_state_dict(path, model.state_dict(), what="base", adapt=adapt)
    if task == "none":
        return None
    if task not in PRETRAIN_TASKS:
        raise ConfigError(f"pretrain={task!r} is not allowed; allowed: {', '.join(PRETRAIN_TASKS)}")
    keys = (
        "dataset",
        "data-root",
        "model",
        "width",
        "depth",
        "batch-norm",
        "group-norm",
        "seed",
        "pretrain",
        "pretrain-epochs",
    )
    key = tuple(str(cfg.get(k, "")) for k in keys) + (tuple(model.state_dict()),)
    if key not in _BASES:
        _BASES[key] = _pretrain(cfg, ds, model)
    return _BASES[key]


def lora_head(cfg: Mapping[str, Any], ds: Any, model: nn.Module) -> list[str]:
    """The modules ``lora-head`` trains fully (``auto``: the output layer, found by a forward pass on two
    training samples, unless ``lora-targets`` adapts it)."""
    example = ds.x_train[:2] if ds is not None else None
    return head_modules(model, str(cfg.get("lora-head", "auto")), example, str(cfg.get("lora-targets", "") or ""))


def adapt_model(
    cfg: Mapping[str, Any], ds: Any, model: nn.Module, rank: int | None = None, seed: int | None = None
) -> nn.Module:
    """``model`` with the run's base loaded and, when LoRA is on, adapters of ``rank`` (default: the global rank)
    injected on ``lora-targets`` (everything else frozen). The adapters' init (A random, B = 0) is drawn from
    ``seed`` (default: the run seed, so server and clients agree on it); a client that starts apart
    (``client-init own``) passes its own seed: the same frozen base, its own A."""
    base = base_state(cfg, ds, model)
    if base is not None:
        model.load_state_dict(base)
    if not lora_on(cfg):
        return model
    rank = global_rank(cfg) if rank is None else rank
    targets = str(cfg.get("lora-targets", "") or "")
    head = lora_head(cfg, ds, model)
    with torch.random.fork_rng(devices=[]):  # the adapters' init (A) depends on the seed alone
        torch.manual_seed(derive_seed(int(cfg["seed"] if seed is None else seed), 61))
        return inject_lora(
            model, targets, rank, float(cfg.get("lora-alpha", LORA_ALPHA)), head, str(cfg.get("lora-bias", "none")),
            str(cfg.get("lora-scale", "standard")),
        )  # fmt: skip


def check_lora(cfg: Mapping[str, Any], ds: Any, model: nn.Module) -> None:
    """Every LoRA option against the run's model (ConfigError naming the value): targets that match no
    Linear/Conv2d, ranks <= 0 or above a layer's min(in, out) (for every client rank), a base file that does not
    fit the model."""
    base_state(cfg, ds, model) if cfg.get("base") else None
    if lora_on(cfg):
        targets = str(cfg.get("lora-targets", "") or "")
        head = lora_head(cfg, ds, model)
        for rank in sorted(set(lora_ranks(cfg))):
            target_modules(model, targets, rank, exclude=head)
        check_alpha(cfg.get("lora-alpha", LORA_ALPHA))
        check_scale(str(cfg.get("lora-scale", "standard")))


def load_received(model: nn.Module, received: Mapping[str, torch.Tensor]) -> None:
    """Load what a LoRA client receives (its adapters, and the adapted layers' base weights where the server
    folded updates into them) into ``model``; every key must be one of the model's, of the same shape."""
    own = model.state_dict()
    for key, value in received.items():
        if key not in own or tuple(own[key].shape) != tuple(value.shape):
            where = "is not in the model" if key not in own else f"has shape {tuple(value.shape)}"
            raise ValueError(
                f"received {key!r} {where}; the client's LoRA model has {tuple(own.get(key, value).shape)}"
            )
    model.load_state_dict(dict(received), strict=False)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA client sends: its adapters (``lora_A``/``lora_B``) and the dense entries it trains (the head,
    trainable biases: :func:`fedfuse.lora.layers.trained_keys`)."""
    return travelling_state(model)


def base_warning(cfg: Mapping[str, Any]) -> str | None:
    """A line when LoRA adapts a base nobody trained (no ``base``, ``pretrain`` none): the frozen weights are then
    the seed's random init, which adapters of low rank cannot make up for; else None."""
    if not lora_on(cfg) or cfg.get("base") or str(cfg.get("pretrain", "none")) != "none":
        return None
    return (
        "LoRA adapts a base nobody trained (no --base, --pretrain none): its frozen weights are the seed's random "
        "init; pass --base FILE (your model's state_dict) or --pretrain low-classes"
    )


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA client never changes: every entry of ``model``'s state dict but :func:`adapter_state` (the
    frozen base, its buffers). A client's own file (``client-init-from``) may leave it out."""
    travelling = adapter_state(model)
    return {k: v for k, v in model.state_dict().items() if k not in travelling}
