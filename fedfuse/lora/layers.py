"""LoRA adapters on a frozen base: a small built-in wrapper for ``nn.Linear``/``nn.Conv2d`` and PEFT's path.

LoRA (Hu et al. 2021): a frozen weight W (out × in, a conv's in·kh·kw flattened) is used as
W + s·B·A with trainable A (r × in), B (out × r), s = alpha / r (``scale="standard"``, PEFT's default) or
s = alpha / √r (``scale="rslora"``: rank-stabilised LoRA, Kalajdzievski 2023, PEFT's ``use_rslora=True``, so the
update's size does not shrink as r grows); A starts Kaiming-uniform (as PEFT's), B at zero, so an injected model
computes exactly what its base does.

Built-in keys: ``<layer>.base.weight`` (frozen), ``<layer>.lora_A`` (r × in), ``<layer>.lora_B`` (out × r).
PEFT keys: ``base_model.model.<layer>.base_layer.weight``, ``...<layer>.lora_A.default.weight`` (r × in, or
r × in × kh × kw for a conv), ``...lora_B.default.weight`` (out × r, or out × r × 1 × 1). Adapters are
detected by the names ``lora_A``/``lora_B`` either way (:func:`adapter_pairs`).

Dense parts trained with the adapters (PEFT's ``modules_to_save`` and ``bias``): the *head* (by default the
output layer, :func:`output_layer`) is trained fully and not adapted, and with ``bias="lora_only"``/``"all"`` the
biases of the adapted layers / of every layer are trainable. :func:`trained_keys` names these entries (every
trainable parameter that is not an adapter); they travel with the adapters and are averaged plainly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedfuse.catalog import LORA_SCALES
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
    "lora_scale",
    "check_scale",
    "check_alpha",
    "conv1d_layers",
    "SCALES",
    "max_rank",
    "is_conv1d",
    "as_linear",
    "BIAS_MODES",
    "output_layer",
    "head_modules",
    "trained_keys",
    "travelling_state",
]

BIAS_MODES = ("none", "lora_only", "all")  # PEFT's LoraConfig.bias
SCALES = LORA_SCALES  # s = alpha / r, s = alpha / √r (PEFT's use_rslora)

State = dict[str, torch.Tensor]


def check_scale(scale: str) -> str:
    """``scale`` if it is one of :data:`SCALES`, else ConfigError naming it and what is allowed."""
    if scale not in SCALES:
        raise ConfigError(f"lora-scale={scale!r} is not allowed; allowed: {', '.join(SCALES)}")
    return scale


def check_alpha(alpha: float) -> float:
    """``alpha`` (the LoRA scale numerator) as a float if it is > 0, else ConfigError naming it."""
    if not float(alpha) > 0:
        raise ConfigError(f"lora-alpha={alpha!r} is out of range; allowed: > 0")
    return float(alpha)


def conv1d_layers(model: nn.Module) -> set[str]:
    """The names of ``model``'s transformers ``Conv1D`` layers (weight stored in × out)."""
    return {n for n, m in model.named_modules() if is_conv1d(m)}


def lora_scale(alpha: float, rank: int, scale: str = "standard") -> float:
    """The LoRA scale s of a rank-``rank`` adapter: alpha / r (``standard``) or alpha / √r (``rslora``)."""
    return float(alpha) / (math.sqrt(rank) if check_scale(scale) == "rslora" else rank)


class _LoRA(nn.Module):
    """Shared parts: the frozen ``base`` module, ``lora_A``, ``lora_B`` and the scale s (:func:`lora_scale`)."""

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, fan_in: int, fan_out: int, scale: str = "standard"
    ) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.scale_mode = int(rank), float(alpha), check_scale(scale)
        self.scale = lora_scale(self.alpha, self.rank, scale)
        self.lora_A = nn.Parameter(torch.empty(self.rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, self.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A

    def delta(self) -> torch.Tensor:
        """s·B·A (out × in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, as PEFT's layers expose it (models read a layer's ``weight``, e.g. ViT its dtype)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (or None)."""
        return self.base.bias


class LoRALinear(_LoRA):
    """y = base(x) + s·x·Aᵀ·Bᵀ."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, scale: str = "standard") -> None:
        super().__init__(base, rank, alpha, base.in_features, base.out_features, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRAConv2d(_LoRA):
    """The base convolution with weight W + s·(B·A).reshape(W.shape) (A over in·kh·kw)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, scale: str = "standard") -> None:
        if base.groups != 1:
            raise ConfigError(f"LoRA on a grouped Conv2d (groups={base.groups}) is not supported")
        fan_in = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
        super().__init__(base, rank, alpha, fan_in, base.out_channels, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: nn.Conv2d = self.base  # type: ignore[assignment]
        weight = conv.weight + self.delta().reshape(conv.weight.shape)
        return conv._conv_forward(x, weight, conv.bias)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, y = x·W + b with W stored in × out),
    recognised by name so that transformers stays optional."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def as_linear(module: nn.Module) -> nn.Linear:
    """A transformers ``Conv1D`` as the ``nn.Linear`` that computes the same (weight transposed to out × in)."""
    w = module.weight
    layer = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w.t())
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    return layer


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d(module)


def max_rank(module: nn.Module) -> int:
    """The largest rank a LoRA on ``module`` can have: min(in, out) of its weight matrix."""
    if is_conv1d(module):
        return min(module.weight.shape)
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d):
        return min(module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels)
    raise ConfigError(f"LoRA supports nn.Linear, nn.Conv2d and transformers' Conv1D; got {type(module).__name__}")


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
    if str(text).strip() and not out:  # "," or " , ": not the empty default (every layer) by accident
        raise ConfigError(f"lora-targets={text!r} names no module; allowed: module-name globs (e.g. net.1,net.3:8), "
                          "or leave it empty for every Linear/Conv layer")  # fmt: skip
    return out


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def target_modules(
    model: nn.Module,
    targets: str | list[tuple[str, int | None]] | None,
    rank: int,
    exclude: Sequence[str] = (),
) -> dict[str, int]:
    """Module name → rank of every ``nn.Linear``/``nn.Conv2d``/``Conv1D`` a target pattern selects (all of them but the
    ``exclude``d ones — the head trained fully — when ``targets`` is empty). Raises ConfigError naming a pattern
    that matches no such layer, one that names an excluded layer, a rank <= 0 and a rank above min(in, out)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"lora-rank={rank!r} is out of range; allowed: an integer >= 1")
    parsed = parse_targets(targets) if isinstance(targets, str) or targets is None else list(targets)
    parsed = parsed if targets else []
    layers = {n: m for n, m in model.named_modules() if _adaptable(m) and n}
    chosen: dict[str, int] = {}
    if not parsed:
        chosen = dict.fromkeys((n for n in layers if n not in exclude), rank)
    for pattern, own in parsed:
        hits = [n for n in layers if _matches(n, pattern)]
        if not hits:
            names = ", ".join(list(layers)[:8]) + (" ..." if len(layers) > 8 else "")
            raise ConfigError(f"lora-targets: {pattern!r} matches no Linear/Conv2d/Conv1D layer; layers: {names}")
        both = [n for n in hits if n in exclude]
        if both:
            raise ConfigError(
                f"lora-targets: {pattern!r} matches {both[0]!r}, which is trained fully (lora-head); "
                "drop it from one of them (e.g. --lora-head none)"
            )
        for n in hits:
            chosen[n] = own if own is not None else rank
    if not chosen:  # e.g. an RNN whose only Linear is the head, or Conv1d layers
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n and not list(m.children())})
        raise ConfigError(
            f"LoRA finds no Linear/Conv2d/Conv1D layer to adapt besides the fully trained head "
            f"({', '.join(exclude) or '-'}); the model's layers: {', '.join(kinds[:8])}; allowed: a model with "
            "Linear/Conv2d layers (e.g. mlp, cnn) or transformers' Conv1D (GPT-2)"
        )
    for name, r in chosen.items():
        limit = max_rank(layers[name])
        if r > limit:
            raise ConfigError(
                f"lora-rank={r} is too large for layer {name!r} ({type(layers[name]).__name__}); allowed: 1..{limit}"
            )
    return chosen


def _bias_mode(bias: str) -> str:
    if bias not in BIAS_MODES:
        raise ConfigError(f"lora-bias={bias!r} is not allowed; allowed: {', '.join(BIAS_MODES)}")
    return bias


def inject_lora(
    model: nn.Module,
    targets: str | list[tuple[str, int | None]] | None = None,
    rank: int = 4,
    alpha: float = 8.0,
    head: Sequence[str] = (),
    bias: str = "none",
    scale: str = "standard",
) -> nn.Module:
    """Replace every targeted Linear/Conv2d of ``model`` (in place) by its LoRA wrapper and freeze everything
    else; returns ``model``. A transformers ``Conv1D`` (GPT-2) becomes the equivalent ``nn.Linear`` first
    (:func:`as_linear`), so every adapted base weight is out × in. ``targets``: module-name globs
    (``"net.1,net.3:8"``, a ``:R`` suffix gives that target its own rank); empty = every Linear/Conv2d/Conv1D but
    the ``head``. ``head``: module names trained fully (PEFT's
    ``modules_to_save``, :func:`head_modules`); ``bias``: ``none`` (frozen), ``lora_only`` (the adapted layers'
    biases trainable) or ``all`` (every bias), as PEFT's ``LoraConfig.bias``; ``scale``: ``standard`` (alpha / r)
    or ``rslora`` (alpha / √r)."""
    check_alpha(alpha)
    _bias_mode(bias)
    check_scale(scale)
    chosen = target_modules(model, targets, rank, exclude=head)
    heads = [model.get_submodule(n) for n in head]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, r in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        base = as_linear(base) if is_conv1d(base) else base  # GPT-2's Conv1D: the same map, weight out × in
        wrapper = LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d
        layer = wrapper(base, r, alpha, scale)
        setattr(parent, child, layer)
        if bias == "lora_only" and base.bias is not None:
            base.bias.requires_grad_(True)
    for module in heads:
        for p in module.parameters():
            p.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    return model


def output_layer(model: nn.Module, example: torch.Tensor | None = None) -> str:
    """The module name of the output layer: the last ``nn.Linear``/``nn.Conv2d``/``Conv1D`` to run in a forward pass on
    ``example`` (forward hooks, eval mode, no grad), or without an example the last one registered. Raises
    ConfigError when the model has none."""
    layers = [(n, m) for n, m in model.named_modules() if n and _adaptable(m)]
    if not layers:
        raise ConfigError(f"lora-head=auto: {type(model).__name__} has no Linear/Conv2d layer to train as the head")
    if example is None:
        return layers[-1][0]
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order[-1] if order else layers[-1][0]


def head_modules(
    model: nn.Module, spec: str, example: torch.Tensor | None = None, targets: str | None = None
) -> list[str]:
    """The modules trained fully (``lora-head``): ``auto`` = the output layer (:func:`output_layer`) unless the
    LoRA ``targets`` name it (then it is adapted, as asked), ``none`` or empty = no head, else comma-separated
    module-name globs (each must match a module with parameters)."""
    text = str(spec or "").strip()
    if text in ("", "none"):
        return []
    if text == "auto":
        out = output_layer(model, example)
        adapted = any(_matches(out, pattern) for pattern, _ in parse_targets(targets or ""))
        return [] if adapted else [out]
    named = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    out: list[str] = []
    for pattern in (p.strip() for p in text.split(",")):
        if not pattern:
            continue
        hits = [n for n in named if _matches(n, pattern)]
        if not hits:
            names = ", ".join(named[:8]) + (" ..." if len(named) > 8 else "")
            raise ConfigError(f"lora-head: {pattern!r} matches no module with parameters; modules: {names}")
        out += [n for n in hits if n not in out]
    return out


def trained_keys(model: nn.Module) -> list[str]:
    """The dense entries trained along with the adapters (a head trained fully, trainable biases): every
    parameter with ``requires_grad`` that is not a ``lora_A``/``lora_B``, in state-dict order."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if k in trainable and "lora_A" not in k and "lora_B" not in k]


def travelling_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA client sends: its adapters and the dense entries it trains (:func:`trained_keys`)."""
    state = model.state_dict()
    keep = set(adapter_keys(state)) | set(trained_keys(model))
    return {k: v for k, v in state.items() if k in keep}


def inject_peft(
    model: nn.Module,
    targets: str | None = None,
    rank: int = 4,
    alpha: float = 8.0,
    head: Sequence[str] = (),
    bias: str = "none",
    scale: str = "standard",
) -> nn.Module:
    """PEFT's ``get_peft_model`` with a ``LoraConfig`` on the same targets (checked as :func:`inject_lora` does);
    a single rank (PEFT's ``rank_pattern`` carries per-target ranks); ``head`` → ``modules_to_save``, ``bias`` →
    ``bias``, ``scale="rslora"`` → ``use_rslora=True``."""
    from peft import LoraConfig, get_peft_model

    check_scale(scale)
    chosen = target_modules(model, targets, rank, exclude=head)
    ranks = {name: r for name, r in chosen.items() if r != rank}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(chosen), rank_pattern=ranks, lora_dropout=0.0,
        bias=_bias_mode(bias), modules_to_save=list(head) or None, use_rslora=scale == "rslora",
    )  # fmt: skip
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


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """What a server must know of a LoRA model (built-in or PEFT) to aggregate its adapters as its clients apply
    them: ``alpha``, ``scale`` (``standard``: s = alpha / r, ``rslora``: alpha / √r) and ``train_keys``
    (:func:`trained_keys`), the keyword arguments of ``strategies.LoRAStrategy``. Raises ConfigError for a model
    without adapters or whose layers disagree on alpha or the scale (one alpha per run; PEFT's ``alpha_pattern``)."""
    found: set[tuple[float, str]] = set()
    for module in model.modules():
        if isinstance(module, _LoRA):
            found.add((module.alpha, module.scale_mode))
        elif hasattr(module, "lora_A") and isinstance(getattr(module, "lora_alpha", None), dict):  # PEFT's layers
            rslora = getattr(module, "use_rslora", {})
            for name, alpha in module.lora_alpha.items():
                found.add((float(alpha), "rslora" if rslora.get(name, False) else "standard"))
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no LoRA adapters (fedfuse.lora.inject_lora or PEFT's get_peft_model)"
        )
    if len(found) > 1:
        raise ConfigError(
            f"the model's LoRA layers disagree on (alpha, scale): {sorted(found)}; allowed: one for every layer"
        )
    ((alpha, scale),) = found
    return {"alpha": alpha, "scale": scale, "train_keys": trained_keys(model)}


def layer_scales(model: nn.Module) -> dict[str, float]:
    """Layer prefix (as in :func:`adapter_pairs`) → its scale s (alpha / r, or alpha / √r under rslora), built-in
    and PEFT modules alike (PEFT's ``scaling`` holds either)."""
    scales: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, _LoRA):
            scales[name] = module.scale
        elif hasattr(module, "lora_A") and isinstance(getattr(module, "scaling", None), dict):
            scales[name] = float(next(iter(module.scaling.values())))
    return scales
