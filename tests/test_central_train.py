"""benchmarks/central_train.py: central training from scratch, one row per (model, optimiser), files under --out."""

from __future__ import annotations

import json
import sys

import pytest


def test_central_train_reports_each_epoch_and_refuses_an_unknown_optimiser(tmp_path, monkeypatch, capsys) -> None:
    from benchmarks import central_train

    argv = ["central_train", "--runs", "mlp:sgd:0.05:2,mlp:adam:0.001:1", "--tag", "t", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    central_train.main()
    record = json.loads((tmp_path / "central-digits-t.json").read_text())
    sgd, adam = record["runs"]["mlp sgd lr 0.05"], record["runs"]["mlp adam lr 0.001"]
    assert len(sgd) == 2 and len(adam) == 1 and sgd[-1] > 0.5  # an MLP learns digits in 2 epochs (measured 0.9+)
    text = (tmp_path / "central-digits-t.md").read_text()
    assert f"| mlp sgd lr 0.05 | 2 | {sgd[-1]:.3f} | {sgd[0]:.2f} {sgd[1]:.2f} |" in text
    assert "Machine and load at start" in text
    monkeypatch.setattr(sys, "argv", ["central_train", "--runs", "mlp:rmsprop:0.1:1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        central_train.main()
    assert exc.value.code == 2 and "optimizer 'rmsprop' in 'mlp:rmsprop:0.1:1' is unknown" in capsys.readouterr().err
