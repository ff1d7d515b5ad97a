"""FedPFN / FedPNU through a real 3-client Ray simulation."""

import json
import subprocess
import sys

import pytest
import torch

from fedfuse.experiment import dataset_for, derive_seed, model_for, round_mask
from fedfuse.subspace import pfn_mask, pnu_mask
from strategies.registry import validate_config

pytestmark = pytest.mark.ray


def test_fedpfn_keeps_fixed_entries_at_their_initial_values(tmp_path) -> None:
    out = tmp_path / "pfn"
    args = ["--strategy", "fedpfn", "--pfn-ratio", "0.4", "--num-clients", "3", "--rounds", "2", "--seed", "4"]
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cfg = validate_config({"strategy": "fedpfn", "pfn-ratio": 0.4, "num-clients": 3, "seed": 4})
    init = model_for(cfg, dataset_for(cfg))
    # the server's seed draw, rebuilt here independently of the strategy object
    masks = pfn_mask(init, 0.4, derive_seed(4, 11))
    final = torch.load(out / "model.pt")
    moved_free = 0.0
    for name, p in init.named_parameters():
        fixed = masks[name].bool()
        assert torch.equal(final[name][fixed], p.detach()[fixed]), name  # bit for bit
        moved_free += float((final[name][~fixed] - p.detach()[~fixed]).abs().sum())
    assert moved_free > 1.0  # the free entries did train

    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert rows[2]["central_accuracy"] > rows[0]["central_accuracy"]
    assert all(r["pfn_fixed_distance"] == 0.0 for r in rows[1:])
    assert all(abs(r["pfn_mask_ratio"] - 0.4) < 0.01 for r in rows[1:])


def test_round_mask_is_shared_by_server_and_clients_and_pnu_changes_per_round() -> None:
    cfg = validate_config({})
    server_model = model_for(cfg, dataset_for(cfg), seed=0)
    client_model = model_for(cfg, dataset_for(cfg), seed=99)  # a client's own copy, other values
    pfn = {"pfn-mode": "pfn", "pfn-ratio": 0.4, "pfn-seed": 7}
    pnu = {**pfn, "pfn-mode": "pnu"}
    a, b = round_mask(pfn, server_model, 1), round_mask(pfn, client_model, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same on server and client, every round
    r1, r2 = round_mask(pnu, server_model, 1), round_mask(pnu, client_model, 2)
    assert all(torch.equal(r1[k], pnu_mask(client_model, 0.4, 7, 1)[k]) for k in r1)
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)
    assert round_mask({}, server_model, 1) is None
