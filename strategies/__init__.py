"""fedfuse's Flower server side: strategies usable in any ServerApp, and fedfuse's own ServerApp.

The classes are imported on first use (``from strategies import FedWB``), so the option table
(:mod:`strategies.options`) and the registry load without torch or Flower.
"""

import importlib
from typing import Any

_HOME = {
    "FedFuseStrategy": "strategies.base",
    "FedCCA": "strategies.fusion",
    "FedFusion": "strategies.fusion",
    "FedGWB": "strategies.fusion",
    "FedMatch": "strategies.fusion",
    "FedWB": "strategies.fusion",
    "FedZip": "strategies.fusion",
    "HeteroFL": "strategies.heterofl",
    "LayerwiseAvg": "strategies.layerwise",
    "FedPFN": "strategies.pfn",
    "FedPNU": "strategies.pfn",
    "FedProx": "strategies.prox",
    "FedAvgLoRA": "strategies.lora",
    "FedExLoRA": "strategies.lora",
    "AlignedLoRA": "strategies.lora",
    "SVDLoRA": "strategies.lora",
    "HetLoRA": "strategies.lora",
    "FLoRA": "strategies.lora",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
