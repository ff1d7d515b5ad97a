"""benchmarks/lora.py's model and rank options reach the runs: --width/--depth size the model (full FedAvg's
bytes are the whole widened model, no adapters), --mixed-ranks gives the mixed setting's clients their ranks."""

from __future__ import annotations

import json
import sys

import pytest


def _nbytes(state):  # type: ignore[no-untyped-def]
    return sum(v.numel() * v.element_size() for v in state.values())


def test_width_depth_and_mixed_ranks_reach_the_runs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import lora as bench
    from fedfuse.experiment import dataset_for, model_for
    from fedfuse.lora.run import adapter_state
    from strategies.registry import validate_config

    argv = ["lora", "--dataset", "digits", "--rounds", "1", "--num-clients", "3", "--seeds", "0", "--alphas", "1.0",
            "--settings", "equal,mixed", "--only", "full FedAvg,HetLoRA (pad)", "--width", "24", "--depth", "3",
            "--mixed-ranks", "3,5", "--pretrain-epochs", "1", "--lora-alpha", "6", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    record = json.loads((tmp_path / "lora-digits-mlp.json").read_text())
    runs = record["runs"]
    assert set(runs) == {"α=1 equal: full FedAvg", "α=1 mixed: HetLoRA (pad)"}
    base = {"dataset": "digits", "seed": 0, "width": 24, "depth": 3, "pretrain": "low-classes", "pretrain-epochs": 1}
    cfg = validate_config({**base, "strategy": "fedavg"})
    ds = dataset_for(cfg)
    full = model_for(cfg, ds).state_dict()
    assert sum(v.numel() for k, v in full.items() if k.endswith("weight")) == 64 * 24 + 2 * 24 * 24 + 24 * 10
    assert runs["α=1 equal: full FedAvg"][0][1]["bytes"] == 2 * 3 * _nbytes(full)  # whole model both ways
    lcfg = validate_config({**base, "strategy": "hetlora", "lora-ranks": "3,5", "lora-alpha": 6.0})
    per_client = [_nbytes(adapter_state(model_for(lcfg, ds, lora_rank=r))) for r in (3, 5, 3)]
    assert runs["α=1 mixed: HetLoRA (pad)"][0][1]["bytes"] == 2 * sum(per_client)  # ranks 3, 5, 3 both ways
    assert per_client[0] < per_client[1] < _nbytes(full)
    text = (tmp_path / "lora-digits-mlp.md").read_text()
    assert "--width 24 --depth 3" in text and "--mixed-ranks 3,5" in text and "(alpha 6, scale alpha/r)" in text
