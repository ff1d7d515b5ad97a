"""Normalisation statistics after fusion.

Averaging aligned weights shrinks activation variance ("variance collapse"); two fixes:

* :func:`reset_bn_stats` — recompute every BatchNorm's running mean/var on data (cumulative average);
  the one BN reset of fedfuse (fusion, REPAIR and the LMC curves use it).
* :func:`repair` — REPAIR-style (Jordan et al. 2022, our implementation): make every channel's
  activation mean and std equal the λ-interpolation of the (aligned) parents' statistics.
  With BatchNorm the channel's output is ``γ x̂ + β`` and ``x̂`` has mean 0 / std 1 on the data once the
  statistics are reset, so ``γ ← Σ λ_i std_i``, ``β ← Σ λ_i mean_i`` followed by a reset is exact.
  Without BatchNorm every hidden Linear/Conv output channel is rescaled in place, shallow → deep:
  ``W_c ← W_c·σ_t/σ_c``, ``b_c ← (b_c − μ_c)·σ_t/σ_c + μ_t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.errors import ConfigError

__all__ = ["reset_bn_stats", "repair", "has_batch_norm"]

_BN = nn.modules.batchnorm._BatchNorm


def _inputs(data: Any) -> Tensor:
    if isinstance(data, (tuple, list)):
        data = data[0]
    if not isinstance(data, Tensor) or len(data) == 0:
        raise ConfigError("repair/reset data must be a non-empty input tensor (or an (x, y) pair)")
    return data


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Any, batch_size: int = 512) -> nn.Module:
    """Recompute the running statistics of every tracked BatchNorm on ``data`` (in place; returns ``model``).

    Only the BatchNorm layers that track running statistics are put in train mode, with ``momentum=None``
    (a cumulative average: the running mean/var become the mean of the per-batch statistics over
    ``batch_size`` batches); every other module keeps its mode (Dropout stays as it is). Momenta and every
    module's training flag are restored afterwards, also on error. Call ``model.eval()`` first to run the
    rest of the model in inference mode.
    """
    x = _inputs(data)
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average = exact mean over the batches
            m.train()
        for start in range(0, len(x), int(batch_size)):
            model(x[start : start + int(batch_size)])
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        for m, training in modes:
            m.training = training
    return model


@torch.no_grad()
def _channel_stats(model: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel (mean, std) of the outputs of modules ``names`` on ``x`` in eval mode."""
    outs: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in names]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    stats = {}
    for n, o in outs.items():
        flat = o.transpose(0, 1).reshape(o.shape[1], -1) if o.dim() > 2 else o.T
        stats[n] = (flat.mean(1), flat.std(1))
    return stats


@torch.no_grad()
def repair(
    model: nn.Module, parents: Sequence[nn.Module], data: Any, weights: Sequence[float] | None = None
) -> nn.Module:
    """REPAIR the fused ``model`` in place from ``parents`` *already aligned to it* (same widths/order).

    Target per channel: ``μ_t = Σ λ_i μ_i``, ``σ_t = Σ λ_i σ_i`` of the parents' activations on ``data``.
    """
    x = _inputs(data)
    lam = torch.full((len(parents),), 1.0 / len(parents)) if weights is None else torch.as_tensor(weights).double()
    lam = (lam / lam.sum()).tolist()
    if has_batch_norm(model):
        names = [n for n, m in model.named_modules() if isinstance(m, _BN) and m.affine]
        targets = _targets(parents, names, x, lam)
        modules = dict(model.named_modules())
        for n in names:
            mean, std = targets[n]
            modules[n].weight.copy_(std)
            modules[n].bias.copy_(mean)
        return reset_bn_stats(model, x)
    names = _hidden_producers(model, x)
    targets = _targets(parents, names, x, lam)
    modules = dict(model.named_modules())
    for n in names:  # shallow → deep: each correction changes the statistics of the next layers
        mean_c, std_c = _channel_stats(model, [n], x)[n]
        mean_t, std_t = targets[n]
        scale = std_t / std_c.clamp_min(1e-8)
        mod = modules[n]
        mod.weight.mul_(scale.view(-1, *([1] * (mod.weight.dim() - 1))))
        if mod.bias is not None:
            mod.bias.copy_((mod.bias - mean_c) * scale + mean_t)
    return model


def _targets(
    parents: Sequence[nn.Module], names: list[str], x: Tensor, lam: list[float]
) -> dict[str, tuple[Tensor, Tensor]]:
    per_parent = [_channel_stats(p, names, x) for p in parents]
    out = {}
    for n in names:
        mean = sum(w * s[n][0] for w, s in zip(lam, per_parent, strict=True))
        std = sum(w * s[n][1] for w, s in zip(lam, per_parent, strict=True))
        out[n] = (mean, std)
    return out  # type: ignore[return-value]


def _hidden_producers(model: nn.Module, x: Tensor) -> list[str]:
    """Linear/Conv modules whose output channels are a hidden group (not the model output), in order."""
    from fedfuse.align.spec import derive_spec

    spec = derive_spec(model, x[:2])
    keys = {m.key for g in spec.groups for m in g.members if m.role == "out" and m.key.endswith(".weight")}
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and f"{n}.weight" in keys
    ]
