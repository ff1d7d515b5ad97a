import gzip
import struct

import numpy as np
import pytest
import torch

from fedfuse.data import DATASETS, load_dataset
from fedfuse.errors import ConfigError, DataUnavailableError


def test_digits_and_mnist1d_load_offline() -> None:
    digits = load_dataset("digits")
    assert digits.input_shape == (1, 8, 8) and len(digits.y_train) + len(digits.y_test) == 1797
    m1d = load_dataset("mnist1d")
    assert m1d.input_shape == (1, 40) and len(m1d.y_train) == 4000 and len(m1d.y_test) == 1000
    for ds in (digits, m1d):
        assert set(ds.y_train.unique().tolist()) == set(range(10))
        assert torch.isfinite(ds.x_train).all()


def _write_idx(path, magic: int, arr: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_mnist10k_reads_the_idx_files_under_data_root(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDFUSE_DATA", str(tmp_path / "cache"))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50)
    images = rng.integers(0, 255, size=(500, 28, 28))
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", 0x00000803, images)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", 0x00000801, labels)
    ds = load_dataset("mnist10k", tmp_path, seed=0)
    assert ds.input_shape == (1, 28, 28)
    assert len(ds.y_train) == 400 and len(ds.y_test) == 100  # stratified 80/20
    assert torch.bincount(ds.y_test).tolist() == [10] * 10
    again = load_dataset("mnist10k", tmp_path, seed=1)
    assert not torch.equal(ds.y_train, again.y_train) or not torch.equal(ds.x_train, again.x_train)


def test_mnist10k_without_files_names_the_missing_path(tmp_path) -> None:
    with pytest.raises(DataUnavailableError, match="t10k-images-idx3-ubyte.gz not found"):
        load_dataset("mnist10k", tmp_path)
    with pytest.raises(DataUnavailableError, match="needs --data-root"):
        load_dataset("mnist10k")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_torchvision_sets_offline_and_absent_give_a_clear_error(name, tmp_path, monkeypatch) -> None:
    import torchvision

    def offline(*args, **kwargs):  # what torchvision raises when it cannot reach the mirror
        raise RuntimeError("Error downloading")

    for cls in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, cls, offline)
    with pytest.raises(DataUnavailableError, match=f"dataset '{name}' is not under .* could not be downloaded"):
        load_dataset(name, tmp_path)


def test_unknown_data_set() -> None:
    with pytest.raises(ConfigError, match="dataset='imagenet' is unknown; allowed: " + ", ".join(DATASETS)):
        load_dataset("imagenet")
