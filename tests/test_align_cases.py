"""Shared model zoo for the alignment tests (no tests here): every family, small widths, random BN stats."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedfuse.models import MLP, VGG, ResNet20, SequenceClassifier


class ResidualCat(nn.Module):
    """Custom model: a residual ``add``, a ``torch.cat`` with a parallel branch, BN/LayerNorm, flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(1, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(11)
        self.fc = nn.Linear(11 * 4 * 4, 7)
        self.ln = nn.LayerNorm(7)
        self.out = nn.Linear(7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x))
        h = h + F.gelu(self.c2(h))
        z = torch.cat([h, self.c3(x)], dim=1)
        z = F.max_pool2d(self.bn(z), 2)
        return self.out(torch.tanh(self.ln(self.fc(torch.flatten(z, 1)))))


def _img(c: int = 1) -> torch.Tensor:
    return torch.randn(16, c, 8, 8, generator=torch.Generator().manual_seed(7))


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "mlp": lambda: (MLP((1, 8, 8), 10, (16, 12)), _img()),
    "vgg_bn": lambda: (VGG((1, 8, 8), 10, (4, "M", 8, "M"), batch_norm=True, hidden=16), _img()),
    "resnet20_bn": lambda: (ResNet20((3, 8, 8), 10, width=1, batch_norm=True), _img(3)),
    "rnn": lambda: (SequenceClassifier((1, 8, 8), 10, "rnn", hidden=6), _img()),
    "lstm2": lambda: (SequenceClassifier((1, 8, 8), 10, "lstm", hidden=6, num_layers=2), _img()),
    "gru": lambda: (SequenceClassifier((1, 40), 10, "gru", hidden=6), torch.randn(16, 1, 40)),
    "residual_cat": lambda: (ResidualCat(), _img()),
}


def make_case(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Model ``name`` (seeded init; BN affine and running stats randomised so they matter) in eval mode."""
    torch.manual_seed(seed)
    model, x = CASES[name]()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_(0, 0.1)
    return model.eval(), x


def max_state_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


def outputs(model: nn.Module, state: dict[str, torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
    """``model``'s eval-mode logits on ``x``, with ``state`` loaded into a copy if given."""
    import copy

    net = copy.deepcopy(model)
    if state is not None:
        net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(x)
