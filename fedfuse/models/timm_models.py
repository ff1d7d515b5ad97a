"""timm's models as fedfuse models: ``--model timm:resnet10t``.

``timm.create_model(NAME, pretrained=False, num_classes=K, in_chans=C)`` — timm rebuilds the stem for the data
set's channels itself — plus ``img_size=(H, W)`` for the models that take it (Vision Transformers and other fixed
token grids; CNNs do not). Random init only: no weights are downloaded. timm is optional: without it a
``timm:NAME`` model is refused with one line saying how to install it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.models.external import check_runs

__all__ = ["PREFIX", "check_timm_name", "build_timm"]

PREFIX = "timm:"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        return None
    return timm


def check_timm_name(name: str) -> str | None:
    """Why ``name`` (without the prefix) is not a timm model this machine can build, or None."""
    timm = _timm()
    if timm is None:
        return "needs timm, which is not installed: pip install timm"
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
    return f"is not a timm model; allowed: {PREFIX}NAME with NAME in timm.list_models(){hint}"


def build_timm(name: str, input_shape: Sequence[int], num_classes: int, *, seed: int | None = None) -> nn.Module:
    """timm model ``name`` (random init) for images of ``input_shape = (C, H, W)`` and ``num_classes``."""
    reason = check_timm_name(name)
    if reason:
        raise ConfigError(f"model={PREFIX + name!r} {reason}")
    if len(input_shape) != 3:
        raise ConfigError(f"{PREFIX}{name} needs images (C, H, W); this data set's inputs are {tuple(input_shape)}")
    timm = _timm()
    c, h, w = (int(s) for s in input_shape)
    kw: dict[str, Any] = {"pretrained": False, "num_classes": int(num_classes), "in_chans": c}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        state = torch.random.get_rng_state()
        try:
            model = timm.create_model(name, img_size=(h, w), **kw)
        except TypeError as exc:  # a model without a fixed token grid takes no img_size
            if "img_size" not in str(exc):
                raise ConfigError(f"{PREFIX}{name} cannot be built: {str(exc).splitlines()[0]}") from None
            torch.random.set_rng_state(state)  # the same init as if img_size had not been tried
            model = timm.create_model(name, **kw)
        except Exception as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{PREFIX}{name} cannot be built for {(c, h, w)} inputs: {why}") from None
    return check_runs(model, PREFIX + name, input_shape)
