"""fedfuse core: pure PyTorch + POT + scipy. Imports nothing from Flower.

``from fedfuse import fuse, align, barrier, train, ...`` works on plain modules or checkpoints; every name is
imported on first use, so ``import fedfuse.config`` (the CLI's option checks, ``fedfuse --help``) loads no torch.
"""

import importlib
import sys
import types
from typing import Any

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

_LAZY = {
    "ConfigError": "fedfuse.errors",
    "DataUnavailableError": "fedfuse.errors",
    "Dataset": "fedfuse.data",
    "load_dataset": "fedfuse.data",
    "build_model": "fedfuse.models",
    "evaluate": "fedfuse.train",
    "train": "fedfuse.train",
    "fuse": "fedfuse.align",
    "align": "fedfuse.align",
    "barrier": "fedfuse.lmc",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedfuse' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``fedfuse.train`` stays the function (as when this package imported it eagerly), not the submodule that
    defines it: importing the submodule does not rebind it (``from fedfuse.train import ...`` is unaffected)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
