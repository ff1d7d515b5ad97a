"""A client's own training data, read from a directory on the SuperNode's host (data never leaves it).

A deployed SuperNode started with ``--node-config 'data-dir="/path" partition-id=0 num-partitions=3'``
makes the ClientApp train on the files in ``/path`` instead of a simulated partition of a named data
set. The directory holds **one** of:

``train.pt``
    ``torch.save({"x": x, "y": y}, "train.pt")`` with tensors ``x`` (N×…, float) and ``y`` (N, integer
    class labels in ``[0, num_classes)``).
``train.npz``
    ``numpy.savez("train.npz", x=x, y=y)`` with the same arrays.

``x`` must be preprocessed like the run's ``dataset`` (same shape per sample, e.g. 1×8×8 for
``digits``, and the same scaling: fedfuse standardises each named data set by its training mean and
std), because the server evaluates the global model on that data set's test split. A flat ``x``
(N×D with D = the product of the input shape) is reshaped. :func:`save_local_data` writes the format.

``train.pt`` is read with ``torch.load(weights_only=True)``: plain tensors only, no pickled code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedfuse.errors import DataUnavailableError

__all__ = ["LOCAL_DATA_FILES", "load_local_data", "save_local_data"]

LOCAL_DATA_FILES = ("train.pt", "train.npz")


def _read(path: Path) -> tuple[object, object]:
    if path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError(f"expected a dict with keys 'x' and 'y', got {type(obj).__name__}")
        keys = set(obj)
    else:
        obj = np.load(path, allow_pickle=False)
        keys = set(obj.files)
    missing = {"x", "y"} - keys
    if missing:
        raise ValueError(f"missing key(s) {sorted(missing)} (has {sorted(keys)})")
    return obj["x"], obj["y"]


def load_local_data(
    data_dir: str | Path,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from ``data_dir/train.pt`` or ``data_dir/train.npz`` (float32 inputs, int64 labels).

    With ``input_shape`` (per sample) and ``num_classes``, the data is checked against the run's model.
    Raises :class:`~fedfuse.errors.DataUnavailableError` naming the path when the directory or file is
    missing, unreadable or malformed.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataUnavailableError(f"data-dir={str(data_dir)!r}: directory not found (node_config 'data-dir')")
    files = [root / name for name in LOCAL_DATA_FILES if (root / name).is_file()]
    if not files:
        raise DataUnavailableError(
            f"data-dir={str(data_dir)!r}: no {' or '.join(LOCAL_DATA_FILES)} in {root} (node_config 'data-dir')"
        )
    path = files[0]

    def bad(why: str) -> DataUnavailableError:
        return DataUnavailableError(f"local data {str(path)!r}: {why}")

    try:
        raw_x, raw_y = _read(path)
        x = torch.as_tensor(np.asarray(raw_x) if not isinstance(raw_x, torch.Tensor) else raw_x)
        y = torch.as_tensor(np.asarray(raw_y) if not isinstance(raw_y, torch.Tensor) else raw_y)
    except Exception as exc:  # noqa: BLE001 — any unreadable file is one clear error naming the path
        raise bad(f"cannot be read ({type(exc).__name__}: {exc})") from None

    if x.dim() < 1 or len(x) == 0:
        raise bad("x is empty")
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise bad(f"x has dtype {x.dtype}; expected numbers")
    if y.dim() != 1 or len(y) != len(x):
        raise bad(f"y must be 1-D with one label per sample; x has {len(x)} samples, y has shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_complex() or (y.is_floating_point() and not torch.equal(y, y.round())):
        raise bad(f"y has dtype {y.dtype} with non-integer values; expected integer class labels")
    x = x.to(torch.float32)
    y = y.to(torch.int64)
    if not torch.isfinite(x).all():
        raise bad("x contains NaN or infinite values")
    if int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes):
        allowed = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise bad(f"labels span [{int(y.min())}, {int(y.max())}]; allowed {allowed}")
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if tuple(x.shape[1:]) != shape:
            if x.dim() == 2 and x.shape[1] == math.prod(shape):
                x = x.reshape(len(x), *shape)
            else:
                raise bad(f"samples have shape {tuple(x.shape[1:])}; the run's data set needs {shape}")
    return x, y


def save_local_data(data_dir: str | Path, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> Path:
    """Write ``(x, y)`` as ``data_dir/train.pt`` (the format :func:`load_local_data` reads); return the path."""
    root = Path(data_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    path = root / "train.pt"
    torch.save({"x": torch.as_tensor(x).float().contiguous(), "y": torch.as_tensor(y).long().contiguous()}, path)
    return path
