"""What the builders of other libraries' models share (``torchvision:NAME``, ``timm:NAME``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedfuse.errors import ConfigError

__all__ = ["check_runs", "collapsed_convs", "min_input_side", "degenerate_input"]

MAX_COLLAPSED = 0.5  # more than this fraction of a model's k×k convolutions on 1×1 maps: degenerate input
MAX_PROBE_SIDE = 1024


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


def collapsed_convs(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[str], list[str]]:
    """(every k×k convolution with k > 1, those of them that see a 1×1 feature map) on ``input_shape`` inputs, by
    module name in call order; one eval-mode forward of a zero batch, the model's mode restored after.

    On a 1×1 map a k×k kernel touches the input with its centre tap only (the rest reads padding): the layer is a
    1×1 convolution and the network has lost the spatial structure it was built for."""
    spatial: list[str] = []
    collapsed: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.kernel_size != (1, 1) and args and args[0].dim() == 4:
            spatial.append(names[module])
            if tuple(args[0].shape[-2:]) == (1, 1):
                collapsed.append(names[module])

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *(int(s) for s in input_shape)))
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return spatial, collapsed


def _degenerate(model: nn.Module, input_shape: Sequence[int]) -> bool | None:
    """Whether more than :data:`MAX_COLLAPSED` of the k×k convolutions see 1×1 maps (None: it does not run)."""
    try:
        spatial, collapsed = collapsed_convs(model, input_shape)
    except Exception:  # noqa: BLE001 — a size the model cannot take (a fixed token grid, a too small map)
        return None
    return bool(spatial) and len(collapsed) > MAX_COLLAPSED * len(spatial)


def min_input_side(model: nn.Module, channels: int, start: int) -> int | None:
    """The smallest square side ≥ ``start`` on which ``model`` runs and is not degenerate (see
    :func:`degenerate_input`), found by doubling then bisecting (a map's size grows with the input's); None if
    none up to :data:`MAX_PROBE_SIDE`."""
    lo, hi = start, start
    while _degenerate(model, (channels, hi, hi)) is not False:
        lo, hi = hi, hi * 2
        if hi > MAX_PROBE_SIDE:
            return None
    while hi - lo > 1:  # _degenerate(lo) is not False, _degenerate(hi) is False
        mid = (lo + hi) // 2
        if _degenerate(model, (channels, mid, mid)) is False:
            hi = mid
        else:
            lo = mid
    return hi


def degenerate_input(model: nn.Module, label: str, input_shape: Sequence[int]) -> str | None:
    """One line when the data set's inputs make ``model`` degenerate, else None.

    Degenerate: more than half of the model's k×k convolutions (k > 1) see a 1×1 feature map, so they act as
    1×1 convolutions — e.g. torchvision's mobilenet_v3_small on 8×8 digits (stride 2 three times by its third
    convolution). The line names the smallest square input on which at most half of them do. A warning, not a
    refusal: such a model still learns on easy data (timm's resnet10t reaches 0.97 on 8×8 digits)."""
    if len(input_shape) != 3:
        return None
    c, h, w = (int(s) for s in input_shape)
    spatial, collapsed = collapsed_convs(model, input_shape)
    if not spatial or len(collapsed) <= MAX_COLLAPSED * len(spatial):
        return None
    side = min_input_side(model, c, max(h, w) + 1)
    need = f"inputs of at least {side}×{side}" if side else "larger inputs"
    return (
        f"{label} on {(c, h, w)} inputs is degenerate: {len(collapsed)} of its {len(spatial)} k×k convolutions see "
        f"a 1×1 feature map (from {collapsed[0]} on), where a k×k kernel is a 1×1 one; it needs {need}"
    )
