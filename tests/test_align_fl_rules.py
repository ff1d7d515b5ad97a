"""Rules met in FL models: ``F.pad`` of the channel axis (ResNet option-A shortcuts), ``ConvTranspose`` (U-Nets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedfuse.align import derive_spec
from fedfuse.align.gate import coverage
from fedfuse.align.selfcheck import break_symmetric_init, selfcheck


class Block(nn.Module):
    def __init__(self, cin: int, c: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.pad = (c - cin) // 2 if c != cin else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        if self.pad:  # option A: subsample, then zero channels on both sides
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + x)


class ResNetA(nn.Module):
    """CIFAR ResNet (He et al. 2016, option-A shortcuts), one block per stage."""

    def __init__(self, w: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w)
        self.layers = nn.Sequential(Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2))
        self.fc = nn.Linear(4 * w, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_option_a_shortcut_pads_zero_units_and_every_hidden_axis_moves() -> None:
    torch.manual_seed(0)
    model, x = ResNetA(), torch.randn(2, 3, 8, 8)
    break_symmetric_init(model, x)
    spec = derive_spec(model, x)
    cov = coverage(model, spec)
    assert cov.axes_total == 16 and cov.axes_moved == 14  # all but the input's and the classes' axes
    # the stage-2 output (8 channels) moves as zeros | the 4 stage-1 units | zeros
    parts = {m.segments for g in spec for m in g.members if m.key == "layers.1.c2.weight" and m.axis == 0}
    assert parts and all(s is not None and len(s) == 3 for s in parts)
    res = selfcheck(model, x)
    assert res.ok and res.permuted_err < 1e-10 and res.errors == {"match": 0.0, "wb": 0.0}


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_non_constant_channel_padding_keeps_units_fixed(mode: str) -> None:
    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.pad(self.a(x).unsqueeze(1), (1, 1), mode).squeeze(1))

    x = torch.randn(2, 3)
    res = selfcheck(Padded(), x)
    assert res.ok or res.nothing_aligned  # exact: never a wrong permutation of padded copies
    assert res.permuted_err is not None and res.permuted_err < 1e-10


class UNet(nn.Module):
    def __init__(self, w: int = 3) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(1, w, 3, padding=1), nn.Conv2d(w, 2 * w, 3, padding=1)
        self.up, self.d1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), nn.Conv2d(2 * w, w, 3, padding=1)
        self.up1d = nn.ConvTranspose1d(w, w, 1)
        self.out = nn.Conv2d(w, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(F.max_pool2d(a, 2)))
        d = F.relu(self.d1(torch.cat([self.up(b), a], 1)))
        n, c, h, w = d.shape
        return self.out(self.up1d(d.flatten(2)).view(n, c, h, w))


def test_conv_transpose_moves_weight_axis_0_as_inputs_and_axis_1_as_units() -> None:
    torch.manual_seed(0)
    model, x = UNet(), torch.randn(2, 1, 4, 4)
    spec = derive_spec(model, x)
    up = {(m.key, m.axis, m.role) for m in spec["up"].members}
    assert {("up.weight", 1, "out"), ("up.bias", 0, "out")} <= up
    assert ("up.weight", 0, "in") in {(m.key, m.axis, m.role) for m in spec["e2"].members}
    assert coverage(model, spec).axes_moved == coverage(model, spec).axes_total - 2
    res = selfcheck(model, x)
    assert res.ok and res.permuted_err < 1e-10


def test_grouped_conv_transpose_stays_fixed_and_exact() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.ConvTranspose2d(4, 4, 2, groups=2), nn.Conv2d(4, 2, 1))
    res = selfcheck(model, torch.randn(2, 1, 3, 3))
    assert res.permuted_err is not None and res.permuted_err < 1e-10
