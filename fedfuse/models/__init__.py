"""Model zoo: MLP, VGG-style CNN, CIFAR-style ResNet-20, RNN/LSTM/GRU sequence classifiers.

Every convolutional model is dimension-generic: an input of shape ``(C, L)`` builds Conv1d
layers, ``(C, H, W)`` builds Conv2d layers, so every model runs on every data set
(digits 1×8×8, MNIST-1D 1×40, MNIST 1×28×28, CIFAR-10 3×32×32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedfuse.catalog import LIBRARY_NAMES as _LIBRARY_NAMES
from fedfuse.catalog import model_name_problem
from fedfuse.errors import ConfigError
from fedfuse.models import hf_models, timm_models, torchvision_models

__all__ = [
    "MLP",
    "VGG",
    "ResNet20",
    "SequenceClassifier",
    "MODELS",
    "LIBRARIES",
    "build_model",
    "library_of",
    "model_name_problem",
]


def _conv_layers(ndim: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """Conv, BatchNorm and MaxPool classes for 1-d (``ndim=2``) or 2-d (``ndim=3``) inputs."""
    if ndim == 2:
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d
    if ndim == 3:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d
    raise ConfigError(
        f"input shape of rank {ndim} is not supported by convolutional models; allowed: (C, L) or (C, H, W)"
    )


def norm_layer(ndim: int, batch_norm: bool = False, group_norm: int = 0) -> Callable[[int], nn.Module] | None:
    """The normalisation after each conv: BatchNorm, GroupNorm with ``group_norm`` groups (the usual choice for
    non-IID federated clients, Hsieh et al. 2020: no batch statistics to disagree on), or None."""
    if batch_norm and group_norm:
        raise ConfigError(f"batch-norm and group-norm={group_norm} exclude each other; allowed: one of them")
    if group_norm:
        return lambda c: nn.GroupNorm(group_norm, c)
    return _conv_layers(ndim)[1] if batch_norm else None


def check_group_norm(group_norm: int, channels: Sequence[int]) -> None:
    """GroupNorm needs every channel width divisible by its group count."""
    bad = sorted({int(c) for c in channels if int(c) % group_norm}) if group_norm else []
    if bad:
        raise ConfigError(
            f"group-norm={group_norm} does not divide the model's channel width(s) {bad}; allowed: a divisor of "
            f"{math.gcd(*(int(c) for c in channels))}"
        )


class MLP(nn.Module):
    """Fully connected net ``x -> flatten -> [Linear -> ReLU] * len(widths) -> Linear``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        in_features = int(torch.tensor(input_shape).prod())
        layers: list[nn.Module] = [nn.Flatten()]
        for width in widths:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VGG(nn.Module):
    """VGG-style CNN: blocks of ``conv3 -> [BN] -> ReLU`` with ``"M"`` max-pools, then flatten -> MLP head.

    ``cfg`` lists channel counts and ``"M"``; a pool is skipped when the spatial size is already 1.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        cfg: Sequence[int | str] = (32, "M", 64, "M"),
        batch_norm: bool = False,
        hidden: int = 128,
        group_norm: int = 0,
    ) -> None:
        super().__init__()
        conv, _, pool = _conv_layers(len(input_shape))
        norm = norm_layer(len(input_shape), batch_norm, group_norm)
        check_group_norm(group_norm, [c for c in cfg if c != "M"])
        layers: list[nn.Module] = []
        channels, size = int(input_shape[0]), min(int(s) for s in input_shape[1:])
        for item in cfg:
            if item == "M":
                if size >= 2:
                    layers.append(pool(2))
                    size //= 2
                continue
            layers.append(conv(channels, int(item), kernel_size=3, padding=1, bias=norm is None))
            if norm is not None:
                layers.append(norm(int(item)))
            layers.append(nn.ReLU())
            channels = int(item)
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block ``relu(F(x) + shortcut(x))``; the shortcut is a 1×1 conv (+BN) when shapes change."""

    def __init__(self, ndim: int, in_ch: int, out_ch: int, stride: int, batch_norm: bool, group_norm: int = 0) -> None:
        super().__init__()
        conv, _, _ = _conv_layers(ndim)
        made = norm_layer(ndim, batch_norm, group_norm)
        norm: Callable[[int], nn.Module] = made if made is not None else (lambda c: nn.Identity())
        bias = made is None
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, stride=1, padding=1, bias=bias)
        self.bn2 = norm(out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(conv(in_ch, out_ch, 1, stride=stride, bias=bias), norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 3 stages × 3 basic blocks, widths 16·w, 32·w, 64·w."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 1,
        batch_norm: bool = True,
        blocks: int = 3,
        group_norm: int = 0,
    ) -> None:
        super().__init__()
        ndim = len(input_shape)
        conv, _, _ = _conv_layers(ndim)
        w = [16 * width, 32 * width, 64 * width]
        check_group_norm(group_norm, w)
        norm = norm_layer(ndim, batch_norm, group_norm)
        self.conv1 = conv(int(input_shape[0]), w[0], 3, padding=1, bias=norm is None)
        self.bn1 = norm(w[0]) if norm is not None else nn.Identity()
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        in_ch = w[0]
        for stage, out_ch in enumerate(w):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(ndim, in_ch, out_ch, stride, batch_norm, group_norm))
                in_ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1) if ndim == 2 else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(out)))


class SequenceClassifier(nn.Module):
    """RNN/LSTM/GRU classifier over a sequence; the head reads the last time step's hidden state.

    An image ``(C, H, W)`` is read row by row (H steps of C·W features); a signal ``(C, L)`` in windows of ``k``
    consecutive positions (L/k steps of k·C features), ``k`` the smallest divisor of L giving at most
    :attr:`MAX_STEPS` steps unless ``window`` is given (MNIST-1D: 10 steps of 4; read as 40 steps of 1, the
    last-step head trained by SGD stayed at chance).
    """

    CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
    MAX_STEPS = 10

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        cell: str = "lstm",
        hidden: int = 128,
        num_layers: int = 1,
        window: int | None = None,
    ) -> None:
        super().__init__()
        if cell not in self.CELLS:
            raise ConfigError(f"cell={cell!r} is not supported; allowed: {sorted(self.CELLS)}")
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) == 2:
            length = self.input_shape[1]
            if window is None:
                window = next(k for k in range(1, length + 1) if length % k == 0 and length // k <= self.MAX_STEPS)
            if window < 1 or length % window:
                raise ConfigError(f"window={window} does not divide the signal's length {length}; allowed: a divisor")
            self.window = int(window)
            features = self.input_shape[0] * self.window
        else:
            self.window = 0
            features = self.input_shape[0] * self.input_shape[2]
        self.rnn = self.CELLS[cell](features, hidden, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (B, C, L) -> (B, L/k, k·C): windows of k positions, each step position-major
            seq = x.transpose(1, 2).reshape(x.shape[0], -1, self.window * x.shape[1])
        else:  # (B, C, H, W) -> (B, H, C*W)
            seq = x.permute(0, 2, 1, 3).flatten(2)
        out, _ = self.rnn(seq)
        return self.fc(out[:, -1])


def _mlp(
    input_shape: Sequence[int], num_classes: int, width: int, depth: int, batch_norm: bool, group_norm: int = 0
) -> nn.Module:
    return MLP(input_shape, num_classes, widths=[width] * depth)


def _cnn(
    input_shape: Sequence[int], num_classes: int, width: int, depth: int, batch_norm: bool, group_norm: int = 0
) -> nn.Module:
    base = max(1, width // 4)
    cfg = (base, "M", 2 * base, "M", 2 * base, "M")
    return VGG(input_shape, num_classes, cfg=cfg, batch_norm=batch_norm, hidden=width, group_norm=group_norm)


def _resnet(
    input_shape: Sequence[int], num_classes: int, width: int, depth: int, batch_norm: bool, group_norm: int = 0
) -> nn.Module:
    return ResNet20(input_shape, num_classes, width=width // 16, batch_norm=batch_norm, group_norm=group_norm)


def _seq(cell: str) -> Callable[..., nn.Module]:
    def build(
        input_shape: Sequence[int], num_classes: int, width: int, depth: int, batch_norm: bool, group_norm: int = 0
    ) -> nn.Module:
        return SequenceClassifier(input_shape, num_classes, cell=cell, hidden=width, num_layers=depth)

    return build


# name -> (builder, default width, default depth). ``width`` is the hidden size (MLP/RNN/CNN head);
# for ResNet-20 it is 16 × the width multiplier.
MODELS: dict[str, tuple[Callable[..., nn.Module], int, int]] = {
    "mlp": (_mlp, 128, 2),
    "cnn": (_cnn, 128, 1),
    "resnet20": (_resnet, 16, 1),
    "rnn": (_seq("rnn"), 64, 1),
    "lstm": (_seq("lstm"), 64, 1),
    "gru": (_seq("gru"), 64, 1),
}


NORM_MODELS = ("cnn", "resnet20")  # the models with a normalisation after each conv (batch-norm / group-norm)

# ``PREFIX`` + NAME -> another library's model: (why NAME is not one of its models or None, builder)
LIBRARIES: dict[str, tuple[Callable[[str], str | None], Callable[..., nn.Module]]] = {
    torchvision_models.PREFIX: (torchvision_models.check_torchvision_name, torchvision_models.build_torchvision),
    timm_models.PREFIX: (timm_models.check_timm_name, timm_models.build_timm),
    hf_models.PREFIX: (hf_models.check_hf_name, hf_models.build_hf),
}


def library_of(name: str) -> str | None:
    """The library prefix of ``name`` (``"torchvision:"``, ``"timm:"``), or None for fedfuse's own models."""
    return next((p for p in LIBRARIES if name.startswith(p)), None)


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int | None = None,
    depth: int | None = None,
    batch_norm: bool = False,
    seed: int | None = None,
    group_norm: int = 0,
) -> nn.Module:
    """Build model ``name`` for ``input_shape``; with ``seed``, the init is fixed by ``torch.manual_seed``-free
    forking (global RNG state is restored afterwards). ``group_norm`` = G > 0: GroupNorm(G) after every conv of
    ``cnn``/``resnet20`` instead of BatchNorm (:func:`norm_layer`)."""
    prefix = library_of(name)
    if prefix is not None:  # the library fixes the architecture: width/depth/batch_norm must not be asked for
        asked = [f"{k}={v}" for k, v in (("width", width), ("depth", depth)) if v is not None]
        asked += ["batch-norm=True"] if batch_norm else []
        asked += [f"group-norm={group_norm}"] if group_norm else []
        if asked:
            raise ConfigError(
                f"{', '.join(asked)} does not apply to model={name!r}, which fixes its own architecture; "
                f"allowed with {', '.join(MODELS)}"
            )
        return LIBRARIES[prefix][1](name[len(prefix) :], input_shape, num_classes, seed=seed)
    if name not in MODELS:
        raise ConfigError(f"model={name!r} is unknown; allowed: {', '.join(sorted(MODELS))}, {_LIBRARY_NAMES}")
    builder, default_width, default_depth = MODELS[name]
    w = default_width if width is None else int(width)
    d = default_depth if depth is None else int(depth)
    if w < 1 or d < 1:
        raise ConfigError(f"model width={w} / depth={d} must be >= 1")
    if name == "resnet20" and w % 16:  # 16·m, 32·m, 64·m channels: any other width would be rounded silently
        raise ConfigError(
            f"width={w} does not fit model='resnet20', whose stages have 16·m, 32·m and 64·m channels for a width "
            "of 16·m; allowed: a multiple of 16 (16, 32, 48, ...)"
        )
    if group_norm and name not in NORM_MODELS:
        raise ConfigError(
            f"group-norm={group_norm} does not apply to model={name!r}; allowed with {', '.join(NORM_MODELS)}"
        )
    if seed is None:
        return builder(input_shape, num_classes, w, d, batch_norm, group_norm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(input_shape, num_classes, w, d, batch_norm, group_norm)
