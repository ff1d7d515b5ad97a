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


def test_the_round_update_error_is_relative_to_what_moved_this_round() -> None:
    """Round 1 starts from B = 0 (no product): the error / round update equals the error / ‖M‖; later rounds
    divide by the round's move only, so it is at least the cumulative ratio; FLoRA's stacking is exact (0)."""
    from benchmarks.lora import run
    from strategies.registry import validate_config

    base = {"dataset": "digits", "num-clients": 3, "alpha": 0.3, "seed": 0, "pretrain": "low-classes",
            "pretrain-epochs": 1, "lora-ranks": "2,4", "local-epochs": 2, "lr": 0.02}  # fmt: skip
    rows = run(validate_config({**base, "strategy": "hetlora"}), 4)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.2  # learning, not diverging
    assert rows[1]["rel_error"] > 0.01 and abs(rows[1]["step_error"] - rows[1]["rel_error"]) < 1e-9
    assert all(r["step_error"] > r["rel_error"] for r in rows[2:])  # measured: 0.10/0.07, 0.14/0.04, 0.16/0.04
    assert rows[-1]["step_error"] > 2 * rows[-1]["rel_error"]
    flora = run(validate_config({**base, "strategy": "flora"}), 2)
    assert all(r["step_error"] < 1e-6 for r in flora)  # float32 round-off


def test_lora_scale_reaches_the_runs_and_the_report_pairs_gains(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--lora-scale rslora: the runs' clients use alpha/√r (other accuracies than alpha/r on the same seed), the
    report names the scale and lists each rule's per-seed gain over HetLoRA."""
    from benchmarks import lora as bench

    argv = ["lora", "--dataset", "digits", "--rounds", "2", "--num-clients", "3", "--seeds", "0,1", "--alphas", "0.5",
            "--settings", "mixed", "--only", "HetLoRA (pad),SVD-LoRA", "--mixed-ranks", "2,8", "--pretrain-epochs",
            "1", "--lora-lr", "0.05", "--lora-scale", "rslora", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    monkeypatch.setattr(sys, "argv", [*argv[:-4], "--tag", "std", "--out", str(tmp_path)])
    bench.main()
    rs = json.loads((tmp_path / "lora-digits-mlp.json").read_text())
    std = json.loads((tmp_path / "lora-digits-mlp-std.json").read_text())
    assert rs["args"]["lora_scale"] == "rslora" and std["args"]["lora_scale"] == "standard"
    key = "α=0.5 mixed: SVD-LoRA"
    assert [r[-1]["accuracy"] for r in rs["runs"][key]] != [r[-1]["accuracy"] for r in std["runs"][key]]
    text = (tmp_path / "lora-digits-mlp.md").read_text()
    assert "--lora-scale rslora" in text and "scale alpha/√r (rslora)" in text
    gains = [100 * (s[-1]["accuracy"] - h[-1]["accuracy"])
             for s, h in zip(rs["runs"][key], rs["runs"]["α=0.5 mixed: HetLoRA (pad)"], strict=True)]  # fmt: skip
    row = next(line for line in text.splitlines() if line.startswith("| α=0.5 mixed | SVD-LoRA | HetLoRA (pad) |"))
    assert row.endswith(f"| {gains[0]:+.1f}, {gains[1]:+.1f} |")
    curve = [100 * (sum(x["accuracy"] for x in s[1:]) - sum(x["accuracy"] for x in h[1:])) / 2
             for s, h in zip(rs["runs"][key], rs["runs"]["α=0.5 mixed: HetLoRA (pad)"], strict=True)]  # fmt: skip
    assert row.split(" | ")[4] == f"{sum(curve) / 2:+.1f} ± {abs(curve[0] - curve[1]) / 2:.1f}"
    assert "--lora-scale" not in (tmp_path / "lora-digits-mlp-std.md").read_text()


@pytest.mark.parametrize("ranks", ["4", "2,4"])
def test_screening_clips_a_blown_up_client_as_the_flower_path_does(monkeypatch: pytest.MonkeyPatch, ranks: str) -> None:
    """--screening default: a client whose adapters come back 100× too large is clipped to the norm bound (the run
    stays where the honest ones take it); --screening off aggregates it as it is. Mixed ranks are screened completed
    to the global rank and truncated back, as LoRAStrategy does."""
    from benchmarks import lora as bench
    from strategies.registry import validate_config

    real, calls = bench.local_train, []

    def blow_up_client_0(cfg, model, x, y, plan):  # type: ignore[no-untyped-def]
        result = real(cfg, model, x, y, plan)
        if len(calls) % 3 == 0:
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.data.mul_(100.0)
        calls.append(1)
        return result

    monkeypatch.setattr(bench, "local_train", blow_up_client_0)
    cfg = validate_config({"dataset": "digits", "num-clients": 3, "alpha": 1.0, "seed": 0, "pretrain": "low-classes",
                           "pretrain-epochs": 2, "lora-ranks": ranks, "local-epochs": 2, "lr": 0.05,
                           "strategy": "fedex-lora"})  # fmt: skip
    screened = bench.run(cfg, 2, screening=True)
    plain = bench.run(cfg, 2, screening=False)
    assert [r["clipped"] for r in screened[1:]] == [1.0, 1.0] and all(r["clipped"] == 0 for r in plain)
    assert screened[-1]["accuracy"] > plain[-1]["accuracy"] + 0.1, (screened[-1], plain[-1])
