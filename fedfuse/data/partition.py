"""Non-IID client partitions built with flwr-datasets partitioners on an in-memory ``datasets.Dataset``.

Schemes:
- ``iid``: uniform random split (``IidPartitioner``'s split, computed by :func:`iid_shards` without loading it).
- ``dirichlet``: per class, client shares ~ Dir(α) (``DirichletPartitioner``); smaller α, more skew.
- ``pathological``: every client holds ``k`` classes (``PathologicalPartitioner``; client i's first class
  is i mod K so every class is used, the others are drawn at random).
- ``quantity``: IID labels, client sizes ~ N·Dir(α) (NIID-Bench's quantity skew, ``SizePartitioner``).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedfuse.catalog import PARTITIONS
from fedfuse.errors import ConfigError
from fedfuse.protocol import PARTITION_CACHE

__all__ = ["PARTITIONS", "CACHE_ENV", "partition_indices", "label_skew"]

CACHE_ENV = PARTITION_CACHE  # fedfuse.protocol: the partition cache a run's processes share


def _check(scheme: str, num_partitions: int, n: int, alpha: float, classes_per_client: int, num_classes: int) -> None:
    if scheme not in PARTITIONS:
        raise ConfigError(f"partition={scheme!r} is unknown; allowed: {', '.join(PARTITIONS)}")
    if num_partitions < 1:
        raise ConfigError(f"num-clients={num_partitions} must be >= 1")
    if num_partitions > n:
        raise ConfigError(f"num-clients={num_partitions} exceeds the {n} training samples; allowed: 1..{n}")
    if scheme in ("dirichlet", "quantity") and not alpha > 0:
        raise ConfigError(f"alpha={alpha} must be > 0")
    if scheme == "pathological" and not 1 <= classes_per_client <= num_classes:
        raise ConfigError(f"classes-per-client={classes_per_client} must be in 1..{num_classes}")


@lru_cache(maxsize=8)
def _partitions(
    labels: tuple[int, ...], scheme: str, num_partitions: int, alpha: float, classes_per_client: int, seed: int
) -> tuple[np.ndarray, ...]:
    y = np.asarray(labels)
    num_classes = int(y.max()) + 1
    _check(scheme, num_partitions, len(y), alpha, classes_per_client, num_classes)
    if scheme == "iid":  # no flwr-datasets import (seconds: datasets, seaborn, scipy.stats) for a shuffle and a cut
        return iid_shards(len(y), num_partitions, seed)
    from datasets import Dataset as HFDataset
    from flwr_datasets import partitioner as P

    ds = HFDataset.from_dict({"label": y, "idx": np.arange(len(y))})
    if scheme == "dirichlet":
        part = P.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(2, len(y) // num_partitions),
            self_balancing=False,
            seed=seed,
        )
    elif scheme == "pathological":
        part = P.PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            # first class of client i is class i mod K (so every class is used), the rest random
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        rng = np.random.default_rng(seed)
        props = rng.dirichlet([alpha] * num_partitions)
        # every client gets at least one sample; the rest is spread by the Dirichlet proportions
        sizes = 1 + np.floor(props * (len(y) - num_partitions)).astype(int)
        sizes[np.argmax(sizes)] += len(y) - sizes.sum()
        part = P.SizePartitioner(partition_sizes=sizes.tolist())
        ds = ds.shuffle(seed=seed)
    part.dataset = ds
    try:
        return tuple(np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_partitions))
    except ValueError as exc:  # e.g. Dirichlet could not satisfy the minimum size
        raise ConfigError(f"partition={scheme!r} failed for num-clients={num_partitions}: {exc}") from None


def iid_shards(n: int, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    """``iid``: a permutation π of 0..n-1 from ``numpy.random.default_rng(seed)``, cut into ``num_partitions``
    contiguous shards of ⌊n/K⌋ (the first n mod K one longer) — what ``IidPartitioner`` gives on the data set
    shuffled with ``seed`` (``datasets.Dataset.shuffle`` then ``shard(contiguous=True)``), without loading them."""
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    div, mod = divmod(n, num_partitions)
    starts = [i * div + min(i, mod) for i in range(num_partitions + 1)]
    return tuple(order[starts[i] : starts[i + 1]] for i in range(num_partitions))


def partition_indices(
    labels: np.ndarray | list[int],
    scheme: str,
    num_partitions: int,
    *,
    alpha: float = 0.3,
    classes_per_client: int = 2,
    seed: int = 0,
    cache_dir: str | None = None,
) -> list[np.ndarray]:
    """Indices of every client's samples, in partition-id order. Deterministic in ``seed``.

    ``cache_dir`` (default ``$FEDFUSE_PARTITION_CACHE``; none: no disk cache) holds each result under a hash of the
    labels and the arguments, written atomically by the first process that computes it."""
    labels_t = tuple(int(v) for v in np.asarray(labels).tolist())
    args = (scheme, int(num_partitions), float(alpha), int(classes_per_client), int(seed))
    cache_dir = os.environ.get(CACHE_ENV) if cache_dir is None else cache_dir
    parts = _shared_partitions(labels_t, args, cache_dir) if cache_dir else _partitions(labels_t, *args)
    return list(parts)


@lru_cache(maxsize=8)
def _shared_partitions(labels: tuple[int, ...], args: tuple[Any, ...], cache_dir: str) -> tuple[np.ndarray, ...]:
    """:func:`_partitions` through the disk cache in ``cache_dir``, read or written once per process."""
    path = _cache_path(cache_dir, np.asarray(labels, dtype=np.int64), args)
    cached = _read_cached(path, args[1])
    if cached is not None:
        return tuple(cached)
    parts = _partitions(labels, *args)
    _write_cached(path, list(parts))
    return parts


def _cache_path(cache_dir: str, y: np.ndarray, args: tuple[object, ...]) -> Path:
    digest = hashlib.sha256(y.tobytes() + repr((args, _partitioner_version())).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"partition-{digest}.npz"


@lru_cache(maxsize=1)
def _partitioner_version() -> str:
    """flwr-datasets' version (its partitioners draw the splits), read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr-datasets")
    except PackageNotFoundError:
        return ""


def _read_cached(path: Path, num_partitions: int) -> list[np.ndarray] | None:
    """The cached partitions (concatenated indices cut at ``ends``), or None if absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            order, ends = f["order"], f["ends"]
    except (OSError, ValueError, KeyError):
        return None
    if len(ends) != num_partitions:
        return None
    return [a.copy() for a in np.split(order, ends[:-1])]


def _write_cached(path: Path, parts: list[np.ndarray]) -> None:
    """Best effort (a read-only or vanished directory only costs the next process a recomputation)."""
    ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, order=order.astype(np.int64), ends=ends)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance ½‖p_client − p_global‖₁ between label distributions (0 = IID)."""
    y = np.asarray(labels)
    k = int(y.max()) + 1
    glob = np.bincount(y, minlength=k) / len(y)
    tvs = [0.5 * np.abs(np.bincount(y[p], minlength=k) / max(len(p), 1) - glob).sum() for p in parts if len(p)]
    return float(np.mean(tvs))
