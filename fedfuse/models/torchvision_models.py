"""torchvision's classification builders as fedfuse models: ``--model torchvision:mobilenet_v3_small``.

The builder gets the data set's classes (``num_classes``) and channels (the first 3-channel convolution
is rebuilt for ``C`` channels); Vision Transformers get ``image_size = H`` and MaxViT ``input_size``.
Random init only: no weights are downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.models.external import check_runs

__all__ = [
    "PREFIX",
    "torchvision_names",
    "min_input_size",
    "check_input_size",
    "build_torchvision",
    "check_torchvision_name",
]

PREFIX = "torchvision:"

# smallest square input (H = W) each family runs on; 32 unless listed (found by trying sizes)
_MIN_SIZE = {"inception_v3": 75, "alexnet": 64, "maxvit_t": 224, "squeezenet1_0": 32, "squeezenet1_1": 24}


def torchvision_names() -> list[str]:
    """Every classification builder of ``torchvision.models`` (detection/segmentation/video excluded)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_torchvision_name(name: str) -> str | None:
    """Why ``name`` (without the prefix) is not a torchvision classification model, or None."""
    names = torchvision_names()
    if name not in names:
        return f"is not a torchvision classification model; allowed: {PREFIX}NAME with NAME in {', '.join(names)}"
    return None


def min_input_size(name: str) -> int:
    """The smallest square image side ``name`` runs on (ViT: a multiple of its patch size)."""
    if name.startswith("vit_"):
        return int(name.split("_")[-1])  # one patch: vit_b_16 -> 16
    return _MIN_SIZE.get(name, 32)


def check_input_size(name: str) -> int:
    """Side of the small square input the coverage check uses: ≥ 32, ViT 2×2 patches."""
    return 2 * min_input_size(name) if name.startswith("vit_") else max(32, min_input_size(name))


def _builder_kwargs(name: str, input_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_classes": int(num_classes)}
    h, w = int(input_shape[1]), int(input_shape[2])
    if name.startswith("vit_"):
        patch = int(name.split("_")[-1])
        if h != w or h % patch:
            raise ConfigError(f"{PREFIX}{name} needs square images with a side divisible by {patch}, got {h}×{w}")
        kw["image_size"] = h
    if name == "maxvit_t":
        kw["input_size"] = (h, w)
    if name in ("inception_v3", "googlenet"):
        kw.update(aux_logits=False, init_weights=True)
    return kw


def _rebuild_first_conv(model: nn.Module, channels: int) -> None:
    """Replace the first 3-channel ``Conv2d`` by one reading ``channels`` channels (same geometry)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                conv = nn.Conv2d(
                    channels, child.out_channels, child.kernel_size, child.stride, child.padding, child.dilation,
                    child.groups if child.groups == 1 else channels, child.bias is not None, child.padding_mode,
                )  # fmt: skip
                setattr(parent, child_name, conv)
                return


def build_torchvision(name: str, input_shape: Sequence[int], num_classes: int, *, seed: int | None = None) -> nn.Module:
    """torchvision model ``name`` (random init) for images of ``input_shape = (C, H, W)`` and ``num_classes``."""
    reason = check_torchvision_name(name)
    if reason:
        raise ConfigError(f"model={PREFIX + name!r} {reason}")
    if len(input_shape) != 3:
        raise ConfigError(f"{PREFIX}{name} needs images (C, H, W); this data set's inputs are {tuple(input_shape)}")
    import torchvision

    kw = _builder_kwargs(name, input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = torchvision.models.get_model(name, **kw)
        if int(input_shape[0]) != 3:
            _rebuild_first_conv(model, int(input_shape[0]))
    side = min_input_size(name)
    return check_runs(model, PREFIX + name, input_shape, f"it needs at least {side}×{side} images")
