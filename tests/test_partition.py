import os
from pathlib import Path

import numpy as np
import pytest

from fedfuse.data import load_dataset
from fedfuse.data.partition import _shared_partitions, label_skew, partition_indices
from fedfuse.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_dataset("digits").y_train.numpy()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "quantity"])
def test_partitions_cover_the_data_set_exactly_once(labels: np.ndarray, scheme: str) -> None:
    parts = partition_indices(labels, scheme, 10, alpha=0.5, classes_per_client=2, seed=1)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    if scheme == "pathological":  # every sample of a class goes to the clients holding that class
        assert len(np.unique(joined)) == len(joined) <= len(labels)
    else:
        assert sorted(joined.tolist()) == list(range(len(labels)))


def test_label_skew_grows_as_alpha_falls(labels: np.ndarray) -> None:
    skews = [
        np.mean([label_skew(labels, partition_indices(labels, "dirichlet", 10, alpha=a, seed=s)) for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2], skews
    iid = label_skew(labels, partition_indices(labels, "iid", 10, seed=0))
    assert iid < skews[1]


def test_pathological_gives_k_classes_per_client(labels: np.ndarray) -> None:
    for k in (1, 2, 3):
        parts = partition_indices(labels, "pathological", 10, classes_per_client=k, seed=0)
        assert all(len(np.unique(labels[p])) <= k for p in parts)
        assert set(np.unique(labels[np.concatenate(parts)])) == set(range(10))


def test_quantity_skew_keeps_labels_iid_but_sizes_vary(labels: np.ndarray) -> None:
    parts = partition_indices(labels, "quantity", 10, alpha=0.5, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == len(labels) and sizes.min() >= 1
    assert sizes.max() > 3 * sizes.min()


def test_partitions_are_deterministic_in_the_seed(labels: np.ndarray) -> None:
    a = partition_indices(labels, "dirichlet", 10, alpha=0.3, seed=5)
    b = partition_indices(labels, "dirichlet", 10, alpha=0.3, seed=5)
    c = partition_indices(labels, "dirichlet", 10, alpha=0.3, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "nope", "num_partitions": 10}, "partition='nope' is unknown"),
        ({"scheme": "dirichlet", "num_partitions": 10, "alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"scheme": "iid", "num_partitions": 100000}, "exceeds"),
        ({"scheme": "pathological", "num_partitions": 10, "classes_per_client": 11}, "classes-per-client=11"),
    ],
)
def test_bad_partition_arguments(labels: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        partition_indices(labels, **kwargs)


@pytest.mark.parametrize(("n", "k", "seed"), [(100, 10, 0), (1437, 7, 3), (50, 50, 11)])
def test_iid_shards_equal_flower_datasets_iid_partitioner(n: int, k: int, seed: int) -> None:
    # Prepare: what the iid scheme was built from, Flower Datasets' IidPartitioner on the data shuffled with seed
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import IidPartitioner

    from fedfuse.data.partition import iid_shards

    part = IidPartitioner(num_partitions=k)
    part.dataset = HFDataset.from_dict({"idx": np.arange(n)}).shuffle(seed=seed)
    # Execute
    shards = iid_shards(n, k, seed)
    # Assert
    for i, shard in enumerate(shards):
        assert np.array_equal(shard, np.asarray(part.load_partition(i)["idx"]))


def test_a_runs_processes_share_one_partitioning_through_the_cache(labels: np.ndarray, tmp_path) -> None:
    """The first process writes the partitions to the run's cache; another process reads the same indices without
    importing flwr-datasets; other arguments are another entry; an unreadable entry is recomputed."""
    import subprocess
    import sys

    kwargs = {"alpha": 0.3, "seed": 5}
    first = partition_indices(labels, "dirichlet", 7, cache_dir=str(tmp_path), **kwargs)
    assert len(list(tmp_path.glob("partition-*.npz"))) == 1
    np.save(tmp_path / "labels.npy", labels)
    code = (
        "import sys, numpy as np\n"
        "from fedfuse.data.partition import partition_indices\n"
        f"y = np.load({str(tmp_path / 'labels.npy')!r})\n"
        f"parts = partition_indices(y, 'dirichlet', 7, alpha=0.3, seed=5)\n"
        "assert 'flwr_datasets' not in sys.modules and 'datasets' not in sys.modules\n"
        f"np.savez({str(tmp_path / 'read.npz')!r}, *parts)\n"
    )
    env = {**os.environ, "FEDFUSE_PARTITION_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(tmp_path / "read.npz") as read:
        assert all(np.array_equal(read[f"arr_{i}"], p) for i, p in enumerate(first))
    other = partition_indices(labels, "dirichlet", 7, cache_dir=str(tmp_path), alpha=0.3, seed=6)
    assert len(list(tmp_path.glob("partition-*.npz"))) == 2
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    for entry in tmp_path.glob("partition-*.npz"):
        entry.write_bytes(b"garbage")
    _shared_partitions.cache_clear()  # a fresh process: nothing read yet
    again = partition_indices(labels, "dirichlet", 7, cache_dir=str(tmp_path), **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
