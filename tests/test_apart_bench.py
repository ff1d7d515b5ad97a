"""benchmarks/apart.py: the plan covers every (start, method) cell, rounds-to-target reads the curve, and the
report's identity line compares shared-init FedWB with FedAvg run for run."""

from __future__ import annotations

from benchmarks import apart


def test_plan_and_rounds_to_target() -> None:
    args = apart.parse(["--seeds", "3"])
    todo = apart.plan(args)
    per_seed_alpha = len(apart.SHARED_METHODS) + 2 * len(apart.METHODS)  # shared: FedAvg, FedWB; own, ckpt: all
    assert len(todo) == 3 * 2 * per_seed_alpha and len(set(todo)) == len(todo)
    assert [t[3] for t in todo[: per_seed_alpha * 2]] == [0] * (per_seed_alpha * 2)  # seeds outermost
    assert apart.rounds_to([0.95, 0.4, 0.86, 0.9], 0.85) == 2  # round 0 (the global init) never counts
    assert apart.rounds_to([0.1, 0.4, 0.6], 0.85) is None


def test_identity_line_counts_exact_matches_only() -> None:
    args = apart.parse(["--seeds", "2", "--alphas", "0.5"])
    runs = {
        apart.run_key("shared", 0.5, "FedAvg", 0): {"accuracy": [0.1, 0.5, 0.7]},
        apart.run_key("shared", 0.5, "FedWB", 0): {"accuracy": [0.1, 0.5, 0.7]},
        apart.run_key("shared", 0.5, "FedAvg", 1): {"accuracy": [0.1, 0.5, 0.7]},
        apart.run_key("shared", 0.5, "FedWB", 1): {"accuracy": [0.1, 0.5, 0.71]},
    }
    (line, _) = apart.identity_lines(args, runs)
    assert "exactly in 1 of 2 paired runs (largest per-round gap 1.00 pts)" in line
