"""fedfuse core: pure PyTorch + POT + scipy. Imports nothing from Flower.

``from fedfuse import fuse, align, barrier`` works on plain modules or checkpoints; the alignment
engine and LMC tools are imported on first use (POT and scipy are not loaded by ``import fedfuse``).
"""

from typing import Any

from fedfuse.data import Dataset, load_dataset
from fedfuse.errors import ConfigError, DataUnavailableError
from fedfuse.models import build_model
from fedfuse.train import evaluate, train

__all__ = [
    "ConfigError",
    "DataUnavailableError",
    "Dataset",
    "align",
    "barrier",
    "build_model",
    "evaluate",
    "fuse",
    "load_dataset",
    "train",
]
__version__ = "0.1.0"

_LAZY = {"fuse": "fedfuse.align", "align": "fedfuse.align", "barrier": "fedfuse.lmc"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedfuse' has no attribute {name!r}")
