"""LoRA adapters on a frozen base: a small built-in wrapper for ``nn.Linear``/``nn.Conv2d`` and PEFT's path.

LoRA (Hu et al. 2021): a frozen weight W (out × in, a conv's in·kh·kw flattened) is used as
W + s·B·A with trainable A (r × in), B (out × r), s = alpha / r; A starts Kaiming-uniform (as PEFT's),
B at zero, so an injected model computes exactly what its base does.

Built-in keys: ``<layer>.base.weight`` (frozen), ``<layer>.lora_A`` (r × in), ``<layer>.lora_B`` (out × r).
PEFT keys: ``base_model.model.<layer>.base_layer.weight``, ``...<layer>.lora_A.default.weight`` (r × in, or
r × in × kh × kw for a conv), ``...lora_B.default.weight`` (out × r, or out × r × 1 × 1). Adapters are
detected by the names ``lora_A``/``lora_B`` either way (:func:`adapter_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedfuse.errors import ConfigError

__all__ = [
    "LoRALinear",
    "LoRAConv2d",
    "parse_targets",
    "target_modules",
    "inject_lora",
    "inject_peft",
    "adapter_pairs",
    "adapter_keys",
    "base_weight_key",
    "layer_scales",
    "max_rank",
]

State = dict[str, torch.Tensor]


class _LoRA(nn.Module):
    """Shared parts: the frozen ``base`` module, ``lora_A``, ``lora_B`` and the scale s = alpha / r."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(self.rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, self.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A

    def delta(self) -> torch.Tensor:
        """s·B·A (out × in)."""
        return self.scale * (self.lora_B @ self.lora_A)


class LoRALinear(_LoRA):
    """y = base(x) + s·x·Aᵀ·Bᵀ."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha, base.in_features, base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRAConv2d(_LoRA):
    """The base convolution with weight W + s·(B·A).reshape(W.shape) (A over in·kh·kw)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float) -> None:
        if base.groups != 1:
            raise ConfigError(f"LoRA on a grouped Conv2d (groups={base.groups}) is not supported")
        fan_in = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
        super().__init__(base, rank, alpha, fan_in, base.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv2d = self.base  # type: ignore[assignment]
        weight = conv.weight + self.delta().reshape(conv.weight.shape)
        return conv._conv_forward(x, weight, conv.bias)


def max_rank(module: nn.Module) -> int:
    """The largest rank a LoRA on ``module`` can have: min(in, out) of its weight matrix."""
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        return min(module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels)
    raise ConfigError(f"LoRA supports nn.Linear and nn.Conv2d; got {type(module).__name__}")


def parse_targets(text: str) -> list[tuple[str, int | None]]:
    """``"net.1,net.3:8"`` → [("net.1", None), ("net.3", 8)]: module-name globs, each with an optional own rank."""
    out: list[tuple[str, int | None]] = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        pattern, sep, rank = item.rpartition(":") if ":" in item else (item, "", "")
        if sep and not (rank.strip().isdigit() and int(rank) > 0):
            raise ConfigError(f"lora-targets={text!r}: rank {rank!r} of {pattern!r} is not allowed; allowed: >= 1")
        out.append((pattern.strip(), int(rank) if sep else None))
    return out


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def target_modules(model: nn.Module, targets: str | list[tuple[str, int | None]] | None, rank: int) -> dict[str, int]:
    """Module name → rank of every ``nn.Linear``/``nn.Conv2d`` a target pattern selects (all of them when
    ``targets`` is empty). Raises ConfigError naming a pattern that matches no such layer, a rank <= 0 and a rank
    above min(in, out) of a layer."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"lora-rank={rank!r} is out of range; allowed: an integer >= 1")
    parsed = parse_targets(targets) if isinstance(targets, str) or targets is None else list(targets)
    parsed = parsed if targets else []
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n}
    chosen: dict[str, int] = {}
    if not parsed:
        chosen = dict.fromkeys(layers, rank)
    for pattern, own in parsed:
        hits = [n for n in layers if _matches(n, pattern)]
        if not hits:
            names = ", ".join(list(layers)[:8]) + (" ..." if len(layers) > 8 else "")
            raise ConfigError(f"lora-targets: {pattern!r} matches no Linear/Conv2d layer; layers: {names}")
        for n in hits:
            chosen[n] = own if own is not None else rank
    for name, r in chosen.items():
        limit = max_rank(layers[name])
        if r > limit:
            raise ConfigError(
                f"lora-rank={r} is too large for layer {name!r} ({type(layers[name]).__name__}); allowed: 1..{limit}"
            )
    return chosen


def inject_lora(
    model: nn.Module, targets: str | list[tuple[str, int | None]] | None = None, rank: int = 4, alpha: float = 8.0
) -> nn.Module:
    """Replace every targeted Linear/Conv2d of ``model`` (in place) by its LoRA wrapper and freeze everything
    else; returns ``model``. ``targets``: module-name globs (``"net.1,net.3:8"``, a ``:R`` suffix gives that
    target its own rank); empty = every Linear/Conv2d."""
    if not float(alpha) > 0:
        raise ConfigError(f"lora-alpha={alpha!r} is out of range; allowed: > 0")
    chosen = target_modules(model, targets, rank)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, r in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        wrapper = LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d
        setattr(parent, child, wrapper(base, r, alpha))
    return model


def inject_peft(model: nn.Module, targets: str | None = None, rank: int = 4, alpha: float = 8.0) -> nn.Module:
    """PEFT's ``get_peft_model`` with a ``LoraConfig`` on the same targets (checked as :func:`inject_lora` does);
    a single rank (PEFT's ``rank_pattern`` carries per-target ranks)."""
    from peft import LoraConfig, get_peft_model

    chosen = target_modules(model, targets, rank)
    ranks = {name: r for name, r in chosen.items() if r != rank}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(chosen), rank_pattern=ranks, lora_dropout=0.0, bias="none"
    )
    return get_peft_model(model, config)


def adapter_pairs(state: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Layer prefix → (A key, B key) of every adapter in ``state``, found by the key names ``lora_A``/``lora_B``
    (built-in and PEFT alike). Raises ConfigError for an A without its B."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        if "lora_A" in key:
            b = key.replace("lora_A", "lora_B")
            if b not in state:
                raise ConfigError(f"adapter {key!r} has no {b!r}")
            pairs[key.split("lora_A")[0].rstrip(".")] = (key, b)
    return pairs


def adapter_keys(state: Mapping[str, Any]) -> list[str]:
    """The adapter entries (``lora_A``/``lora_B``) of a state dict or a model's state dict, in order."""
    return [k for k in state if "lora_A" in k or "lora_B" in k]


def base_weight_key(prefix: str, state: Mapping[str, Any]) -> str:
    """The frozen base weight of the adapted layer ``prefix`` (built-in ``.base.weight``, PEFT
    ``.base_layer.weight``)."""
    for key in (f"{prefix}.base.weight", f"{prefix}.base_layer.weight"):
        if key in state:
            return key
    raise ConfigError(f"no base weight for adapted layer {prefix!r}")


def layer_scales(model: nn.Module) -> dict[str, float]:
    """Layer prefix (as in :func:`adapter_pairs`) → its scale s = alpha / r, built-in and PEFT modules alike."""
    scales: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, _LoRA):
            scales[name] = module.scale
        elif hasattr(module, "lora_A") and isinstance(getattr(module, "scaling", None), dict):
            scales[name] = float(next(iter(module.scaling.values())))
    return scales
