"""A LoRA model's state dict as its plain model's: each adapter folded into its base weight, W = W₀ + s·B·A (PEFT's
``merge_and_unload``, on tensors alone). What lets models fine-tuned apart with LoRA — sites' checkpoints, a run's
``--save-client-models`` files — enter every tool that takes plain state dicts (``fedfuse merge``, ``fedfuse lmc``):
the plain average of folded models is the exact mean of their updates, Σ λ_i (W₀ + s_i·B_i·A_i) = W₀ + mean(s·B·A).

Names: fedfuse's built-in adapters (``X.base.weight``, ``X.lora_A``, ``X.lora_B``) and PEFT's (``X.base_layer.weight``,
``X.lora_A.<adapter>.weight``, ``X.lora_B.<adapter>.weight``, the ``base_model.model.`` prefix of a ``PeftModel``, a
head in ``modules_to_save`` as ``X.modules_to_save.<adapter>.*`` beside the unused ``X.original_module.*``).
The scale is not in a state dict: s = alpha / r (``standard``) or alpha / √r (``rslora``), alpha given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from fedfuse.errors import ConfigError
from fedfuse.lora.layers import adapter_pairs, base_weight_key, check_alpha, layer_scales, lora_scale

__all__ = ["as_client_adapters", "fold_adapters", "has_adapters", "is_peft_dir", "read_peft_adapter", "with_base"]

State = dict[str, torch.Tensor]
_PEFT_PREFIX = "base_model.model."
_SAVED = re.compile(r"\.modules_to_save\.[^.]+\.")  # PEFT's trained copy of a head: X.modules_to_save.default.W
_FACTOR = re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")  # PEFT's X.lora_A[.<adapter>].weight


def has_adapters(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds LoRA adapters (a ``lora_A`` key)."""
    return any("lora_A" in k for k in state)


def fold_adapters(
    state: Mapping[str, torch.Tensor], alpha: float, scale: str = "standard", transposed: Collection[str] = ()
) -> State:
    """``state`` with every adapter folded: the adapted layer's weight W₀ + s·B·A (reshaped to W₀'s shape for a
    convolution; s from ``alpha``, ``scale`` and the adapter's rank), its other base entries under the plain
    layer's names, adapter keys dropped; PEFT's wrapper prefix and head copies resolved. ``transposed``: the plain
    model's layers that store their weight in × out (transformers' ``Conv1D``, GPT-2): fedfuse's adapters hold
    those bases as out × in (:func:`fedfuse.lora.layers.as_linear`), PEFT's in their own layout; either way the
    folded weight comes out in × out. ConfigError (one line) for an adapter without its base weight or of a shape
    that does not fit it."""
    check_alpha(alpha)
    state = dict(state)
    folded: State = {}
    pairs = adapter_pairs(state)
    for prefix, (ak, bk) in pairs.items():
        w_key = base_weight_key(prefix, state)
        w0, a, b = state[w_key], state[ak], state[bk]
        plain = prefix.removeprefix(_PEFT_PREFIX)
        flip = plain in transposed and w_key.endswith(".base_layer.weight")  # PEFT keeps Conv1D's in × out
        w = w0.double().t() if flip else w0.double()
        a2, b2 = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
        if b2.shape[1] != a2.shape[0] or (b2.shape[0], a2.shape[1]) != (w.shape[0], w[0].numel()):
            raise ConfigError(
                f"adapter {prefix!r}: B {tuple(b.shape)} · A {tuple(a.shape)} does not fit its base weight "
                f"{tuple(w0.shape)}"
            )
        w = w + lora_scale(alpha, a2.shape[0], scale) * (b2 @ a2).reshape(w.shape)
        folded[w_key] = (w.t().contiguous() if plain in transposed else w).to(w0.dtype)
    out: State = {}
    for key, value in state.items():
        if "lora_A" in key or "lora_B" in key or ".original_module." in key:
            continue
        value = folded.get(key, value)
        for prefix in pairs:  # X.base.W / X.base_layer.W of an adapted layer X → X.W
            for inner in (".base.", ".base_layer."):
                if key.startswith(prefix + inner):
                    key = prefix + "." + key[len(prefix + inner) :]
        key = _SAVED.sub(".", key.removeprefix(_PEFT_PREFIX))
        out[key] = value
    return out


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's save_pretrained, newest first


def is_peft_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory PEFT's ``save_pretrained`` wrote (adapter_config.json + adapter weights)."""
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file() and any((p / f).is_file() for f in ADAPTER_FILES)


def read_peft_adapter(path: str | Path) -> tuple[State, float, str]:
    """(adapter state, alpha, scale) of a PEFT ``save_pretrained`` directory: its weights (safetensors, or a .bin
    read with ``weights_only``) and ``adapter_config.json``'s ``lora_alpha`` and ``use_rslora``. ConfigError (one
    line) for what this cannot fold exactly: per-layer ``alpha_pattern``, DoRA, a non-LoRA adapter."""
    p = Path(path)
    where = f"{str(path)!r}"
    try:
        config = json.loads((p / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: adapter_config.json is not readable JSON ({type(exc).__name__})") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"{where}: peft_type={config.get('peft_type')!r} is not supported; allowed: LORA")
    if config.get("alpha_pattern") or config.get("use_dora"):
        what = "alpha_pattern" if config.get("alpha_pattern") else "use_dora"
        raise ConfigError(f"{where}: {what} is not supported (one alpha per adapter, plain LoRA); save without it")
    weights = next(p / f for f in ADAPTER_FILES if (p / f).is_file())
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — an unreadable adapter file is bad input
        raise ConfigError(f"{where}: {weights.name} is not readable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not has_adapters(state):
        raise ConfigError(f"{where}: {weights.name} holds no LoRA adapters (lora_A/lora_B)")
    alpha = check_alpha(float(config.get("lora_alpha", 8)))
    return dict(state), alpha, "rslora" if config.get("use_rslora") else "standard"


def with_base(adapter: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> State:
    """A PEFT adapter (no base weights, names under ``base_model.model.``) joined with the plain model's ``base``
    state dict into the LoRA state dict :func:`fold_adapters` reads: each adapted layer's base entries as
    ``X.base_layer.*``, the adapter's other entries (a ``modules_to_save`` head) replacing the base's."""
    pairs = adapter_pairs(adapter)
    out: State = {}
    plain = {p.removeprefix(_PEFT_PREFIX): p for p in pairs}
    for key, value in base.items():
        layer, _, name = key.rpartition(".")
        if layer in plain:
            out[f"{plain[layer]}.base_layer.{name}"] = value
        else:
            out[_PEFT_PREFIX + key] = value
    for key, value in adapter.items():
        out[_PEFT_PREFIX + key.removeprefix(_PEFT_PREFIX)] = value
    missing = [p for p in plain if f"{plain[p]}.base_layer.weight" not in out]
    if missing:
        raise ConfigError(f"the adapter's layer {missing[0]!r} has no weight in the base state dict")
    return out


def as_client_adapters(adapter: Mapping[str, torch.Tensor], alpha: float, scale: str, model: torch.nn.Module) -> State:
    """A PEFT adapter (:func:`read_peft_adapter`: its tensors, ``lora_alpha``, scale) as the entries of fedfuse's
    LoRA ``model`` it trains, computing the same function: ``X.lora_A[.<adapter>].weight`` → ``X.lora_A`` and B
    alike (a convolution's factors flattened to r × in·kh·kw and out × r), B rescaled by s_PEFT / s so that
    s·B'·A = s_PEFT·B·A (s: the layer's scale in ``model``, s_PEFT from ``alpha``, ``scale`` and the adapter's
    rank); a ``modules_to_save`` head and trained biases under ``model``'s names (``X.b`` → ``X.base.b`` for an
    adapted layer). Entries ``model`` lacks keep their names, for the caller's fit check to name."""
    layers = layer_scales(model)  # adapted layer → its scale s
    own = model.state_dict()
    out: State = {}
    for key, value in adapter.items():
        key = _SAVED.sub(".", key.removeprefix(_PEFT_PREFIX))
        factor = _FACTOR.match(key)
        if factor and factor.group(1) in layers:
            name, which = factor.groups()
            rank = value.shape[0] if which == "A" else value.shape[1]
            flat = value.reshape(rank, -1) if which == "A" else value.reshape(value.shape[0], rank)
            ratio = lora_scale(alpha, rank, scale) / layers[name] if which == "B" else 1.0
            out[f"{name}.lora_{which}"] = (flat.double() * ratio).to(value.dtype) if ratio != 1.0 else flat
            continue
        layer_name, _, leaf = key.rpartition(".")
        if key not in own and layer_name in layers:
            key = f"{layer_name}.base.{leaf}"
        out[key] = value
    return out
