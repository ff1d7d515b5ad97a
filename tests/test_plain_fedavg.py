"""benchmarks/plain_fedavg.py, the baseline of the inline-overhead benchmark, imports no fedfuse yet makes every
random choice as fedfuse does: each piece equals fedfuse's own function, and a short run equals the inline run."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import plain_fedavg as plain
from fedfuse.data.partition import partition_indices
from fedfuse.experiment import dataset_for, derive_seed, model_for, sample_clients

CFG = {"dataset": "digits", "model": "mlp", "seed": 3}


def test_pieces_equal_fedfuse() -> None:
    # Prepare
    ds = dataset_for(CFG)
    # Execute
    x_train, y_train, x_test, y_test = plain.load_digits(3)
    parts = plain.iid_parts(len(x_train), 7, 3)
    model = plain.make_mlp(64, 10, 128, 2, 3)
    # Assert
    for a, b in ((x_train, ds.x_train), (y_train, ds.y_train), (x_test, ds.x_test), (y_test, ds.y_test)):
        assert torch.equal(a, b)
    want = partition_indices(ds.y_train.numpy(), "iid", 7, alpha=0.3, classes_per_client=2, seed=3)
    assert all(np.array_equal(p, w) for p, w in zip(parts, want, strict=True))
    ref = model_for(CFG, ds).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert plain.derive_seed(3, 4, 5, 3) == derive_seed(3, 4, 5, 3)
    assert plain.sample(3, 2, 10, 0.3) == sample_clients(3, 2, 10, 0.3, 2)


def test_run_equals_inline(tmp_path) -> None:
    # Prepare
    from fedfuse.runners.inline import run_inline

    cfg = {**CFG, "num-clients": 4, "num-rounds": 2, "fraction-train": 0.5, "partition": "iid",
           "update-norm-bound": 0.0, "examples-cap": 0.0, "direction-guard": "off"}  # fmt: skip
    # Execute
    plain.main(cfg, str(tmp_path / "plain"))
    run_inline({**cfg, "out": str(tmp_path / "inline")})
    # Assert: bit for bit
    a, b = torch.load(tmp_path / "plain" / "model.pt"), torch.load(tmp_path / "inline" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
