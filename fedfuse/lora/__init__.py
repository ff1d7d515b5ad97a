"""Federated fine-tuning with LoRA adapters: the adapters (:mod:`fedfuse.lora.layers`: a built-in wrapper for
Linear/Conv2d, and PEFT's path), their aggregation (:mod:`fedfuse.lora.aggregate`: FedAvg on the factors, exact
SVD + FedEx-LoRA residual, rank-aligned, FLoRA stacking, HetLoRA padding) and what the run options mean
(:mod:`fedfuse.lora.run`). No Flower here; ``strategies/lora.py`` adapts it."""

from fedfuse.lora.aggregate import (
    aggregation_error,
    aligned_lora,
    exact_lora,
    fedavg_lora,
    flora_stack,
    hetlora_pad,
    mean_products,
    mean_update,
    pad_rank,
    svd_lora,
    truncate_rank,
)
from fedfuse.lora.layers import (
    LoRAConv2d,
    LoRALinear,
    adapter_keys,
    adapter_pairs,
    base_weight_key,
    check_scale,
    head_modules,
    inject_lora,
    inject_peft,
    layer_scales,
    lora_scale,
    lora_settings,
    output_layer,
    trained_keys,
    travelling_state,
)

__all__ = [
    "LoRALinear",
    "LoRAConv2d",
    "inject_lora",
    "inject_peft",
    "lora_settings",
    "adapter_pairs",
    "adapter_keys",
    "base_weight_key",
    "layer_scales",
    "lora_scale",
    "check_scale",
    "output_layer",
    "head_modules",
    "trained_keys",
    "travelling_state",
    "mean_products",
    "mean_update",
    "fedavg_lora",
    "svd_lora",
    "exact_lora",
    "aligned_lora",
    "flora_stack",
    "hetlora_pad",
    "pad_rank",
    "truncate_rank",
    "aggregation_error",
]
