"""Round checkpoints: written atomically every round, read back for an exact resume.

A checkpoint holds the round number, the run config, the global model, the strategy's state,
the RNG states of this process (torch, numpy, random) and the metrics history.
"""

from __future__ import annotations

import io
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfuse.errors import ConfigError
from fedfuse.results import atomic_write_bytes

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint", "rng_states", "restore_rng_states", "config_mismatch"]

CHECKPOINT = "checkpoint.pt"

# Options that may differ between a run and its resumption (they do not change the result).
RESUMABLE_OVERRIDES = frozenset({"out"})


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}


def restore_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])


def save_checkpoint(out: Path, payload: Mapping[str, Any]) -> Path:
    """``torch.save`` into memory, then temp file + rename: a crash mid-write keeps the previous one."""
    buf = io.BytesIO()
    torch.save(dict(payload), buf)
    path = Path(out) / CHECKPOINT
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The last complete checkpoint in ``out``; ConfigError when there is none or it is unreadable."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume={str(out)!r} holds no {CHECKPOINT}; allowed: an --out directory of an earlier run")
    try:
        ckpt = torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"resume={str(out)!r}: {CHECKPOINT} cannot be read ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or not {"round", "config", "model"} <= set(ckpt):
        raise ConfigError(f"resume={str(out)!r}: {CHECKPOINT} is not a fedfuse checkpoint")
    return ckpt


def config_mismatch(saved: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """The first option whose value in ``given`` differs from the checkpoint's, as a message, or None."""
    for key, value in given.items():
        if key in RESUMABLE_OVERRIDES:
            continue
        if key in saved and saved[key] != value:
            return f"{key}={value!r} differs from the checkpoint's {key}={saved[key]!r}"
    return None
