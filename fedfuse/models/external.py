"""What the builders of other libraries' models share (``torchvision:NAME``, ``timm:NAME``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedfuse.errors import ConfigError

__all__ = ["check_runs"]


def check_runs(model: nn.Module, label: str, input_shape: Sequence[int], need: str = "") -> nn.Module:
    """``model`` in train mode once a zero batch of ``input_shape`` ran through it in eval mode; else ConfigError,
    one line: ``label does not run on (C, H, W) inputs (need): <the library's first error line>``."""
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *(int(s) for s in input_shape)))
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{label} does not run on {tuple(int(s) for s in input_shape)} inputs{f' ({need})' if need else ''}: {why}"
        ) from None
    return model.train()
