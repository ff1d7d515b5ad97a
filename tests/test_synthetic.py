"""FedProx's Synthetic(α, β), generated per client, and runs whose cost does not grow with the number of clients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clients.client_app as client_app
from fedfuse.config import OPTIONS
from fedfuse.data import load_dataset
from fedfuse.data.synthetic import DIM, NUM_CLASSES, TEST_CLIENTS, Synthetic
from fedfuse.errors import ConfigError
from fedfuse.experiment import client_data
from fedfuse.runners.inline import InlineGrid
from strategies.registry import validate_config
from strategies.server_app import run_server


def test_client_data_is_a_function_of_seed_and_client_only() -> None:
    cfg = validate_config({"dataset": "synthetic:0.5,0.5", "seed": 3})
    x10, y10 = client_data(cfg, 7, 10)
    xbig, ybig = client_data(cfg, 7, 100_000)  # the number of clients changes nothing
    assert torch.equal(x10, xbig) and torch.equal(y10, ybig)
    x, y = Synthetic(0.5, 0.5, seed=3).client(7)  # a fresh generator: the same data
    assert torch.equal(x, x10) and torch.equal(y, y10)
    assert x.dtype == torch.float32 and x.shape[1] == DIM and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < NUM_CLASSES
    xo, _ = Synthetic(0.5, 0.5, seed=4).client(7)  # another seed, other data
    assert xo.shape != x.shape or not torch.equal(xo, x)
    xt, _ = Synthetic(0.5, 0.5, seed=3).client(7, "test")  # 90/10 split of the client's own samples
    assert len(x) == int(0.9 * (len(x) + len(xt)))


def test_alpha_and_beta_set_how_much_clients_differ() -> None:
    """α = β = 0: one labelling function and one input mean for all (up to per-client W noise); larger α, β
    spread the clients' input means (β) and label marginals (α), as in FedProx §5.1."""

    def spread(alpha: float, beta: float) -> float:
        fed = Synthetic(alpha, beta, seed=0)
        means = torch.stack([fed.client(k)[0].mean(0) for k in range(30)])
        return float(means.mean(1).std())

    assert spread(0.0, 0.0) < spread(0.0, 2.0) / 3


def test_synthetic_names_and_the_server_test_set() -> None:
    ds = load_dataset("synthetic", seed=0)
    assert ds.federation is not None and (ds.federation.alpha, ds.federation.beta) == (1.0, 1.0)
    fed = ds.federation
    assert len(ds.x_test) == sum(len(fed.client(k, "test")[0]) for k in range(TEST_CLIENTS))
    assert ds.input_shape == (DIM,) and ds.num_classes == NUM_CLASSES
    assert OPTIONS["dataset"].check("synthetic:0,2.5") == "synthetic:0,2.5"
    for bad in ("synthetic:1", "synthetic:a,b", "synthetic:-1,1", "synthetic:nan,1", "synth:1,1"):
        with pytest.raises(ConfigError, match=rf"dataset={bad!r} .*allowed"):
            OPTIONS["dataset"].check(bad)
    with pytest.raises(ConfigError, match="synthetic:ALPHA,BETA"):
        load_dataset("synthetic:1,x")


def test_a_run_with_many_clients_touches_only_the_sampled_ones(tmp_path) -> None:
    """20,000 clients, 4 a round: the inline grid makes a node's context only when it is sampled and asks no
    node for its partition id, so the run costs what 4 clients a round cost."""
    cfg = validate_config(
        {
            "dataset": "synthetic:0.5,0.5",
            "model": "mlp",
            "width": 8,
            "num-clients": 20_000,
            "fraction-train": 4 / 20_000,
            "num-rounds": 2,
            "local-epochs": 1,
            "batch-size": 256,
            "seed": 0,
            "out": str(tmp_path),
        }
    )
    grid = InlineGrid(client_app.app, 20_000)
    run_server(grid, cfg)
    assert 4 <= len(grid.contexts) <= 8  # two rounds of 4 sampled nodes, no other node ever made
    assert all(ctx.node_config["partition-id"] == node - 1 for node, ctx in grid.contexts.items())
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    # every sampled client answered; the default examples-bound (10 × the round's median) may reject one of
    # FedProx's power-law clients with many samples
    assert [r["replies"] + r["rejected"] for r in rows[1:]] == [4, 4]
    assert np.isfinite(rows[-1]["central_loss"])
