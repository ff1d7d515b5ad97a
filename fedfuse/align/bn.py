"""Normalisation statistics after fusion.

Averaging aligned weights shrinks activation variance ("variance collapse"); two fixes:

* :func:`reset_bn_stats` — recompute every BatchNorm's running mean/var on data (cumulative average);
  the one BN reset of fedfuse (fusion, REPAIR and the LMC curves use it).
* REPAIR (Jordan et al. 2022): rescale every hidden unit to the λ-interpolation of the aligned parents'
  statistics — :mod:`fedfuse.align.repair` (with and without BatchNorm, one-shot and federated).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.errors import ConfigError

__all__ = ["reset_bn_stats", "has_batch_norm"]

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
