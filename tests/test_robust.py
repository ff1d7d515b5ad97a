"""Poisoning contained: robust reductions, round-level screening, attack injection, straggler accounting."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from fedfuse.align import fuse
from fedfuse.attacks import attacker_ids, parse_attack, poison_state
from fedfuse.errors import ConfigError
from fedfuse.experiment import derive_seed
from fedfuse.robust import coordinate_median, krum_select, multi_krum, reducer, trimmed_mean
from fedfuse.screening import lower_median, screen_updates


def _states(values: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.full((2, 3), v), "n": torch.tensor(i)} for i, v in enumerate(values)]


# ---- robust reductions ----------------------------------------------------------------------------------
def test_coordinate_median_ignores_an_outlier_and_is_weighted() -> None:
    states = _states([1.0, 2.0, 3.0, 4.0, 1e6])
    assert torch.equal(coordinate_median(states)["w"], torch.full((2, 3), 3.0))
    # weight ½ on the first model: the weighted median is its value
    assert torch.equal(coordinate_median(states, [4, 1, 1, 1, 1])["w"], torch.full((2, 3), 1.0))
    # even count: the lower median
    assert torch.equal(coordinate_median(_states([1.0, 2.0, 3.0, 4.0]))["w"], torch.full((2, 3), 2.0))
    # per coordinate, not per model
    a = {"w": torch.tensor([0.0, 9.0])}
    b = {"w": torch.tensor([1.0, 8.0])}
    c = {"w": torch.tensor([2.0, -1e9])}
    assert torch.equal(coordinate_median([a, b, c])["w"], torch.tensor([1.0, 8.0]))


def test_integer_buffers_come_from_the_reference() -> None:
    states = _states([1.0, 2.0, 3.0])
    assert int(coordinate_median(states, ref=2)["n"]) == 2
    assert int(trimmed_mean(states, fraction=0.34, ref=1)["n"]) == 1


def test_trimmed_mean_drops_the_extremes_per_side() -> None:
    states = _states([-1e6, 1.0, 2.0, 3.0, 1e6])
    out = trimmed_mean(states, fraction=0.2)["w"]  # k = 1 per side
    assert torch.allclose(out, torch.full((2, 3), 2.0))
    out = trimmed_mean(states, [1, 1, 1, 2, 1], fraction=0.2)["w"]  # weighted mean of 1, 2, 3 (weights 1, 1, 2)
    assert torch.allclose(out, torch.full((2, 3), 9.0 / 4))
    assert torch.allclose(trimmed_mean(states, fraction=0.0)["w"], torch.full((2, 3), 6.0 / 5))
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        trimmed_mean(states, fraction=0.5)


def test_multi_krum_drops_the_far_models() -> None:
    torch.manual_seed(0)
    honest = [{"w": torch.randn(10) * 0.1} for _ in range(8)]
    bad = [{"w": torch.full((10,), 50.0)}, {"w": torch.full((10,), -50.0)}]
    states = honest[:3] + bad[:1] + honest[3:] + bad[1:]
    keep = krum_select(states, f=2)
    assert keep == [0, 1, 2, 4, 5, 6, 7, 8]
    out = multi_krum(states, fraction=0.2)["w"]
    assert out.abs().max() < 0.2
    assert krum_select(states, f=0) == list(range(10))  # f = 0: everyone


def test_reducer_validates_its_arguments() -> None:
    assert reducer("none") is None
    with pytest.raises(ConfigError, match="robust='mean'"):
        reducer("mean")
    with pytest.raises(ConfigError, match="fraction"):
        reducer("krum", 0.7)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("method", ["average", "match", "wb"])
def test_fuse_with_a_robust_reduce_resists_a_poisoned_model(method: str) -> None:
    """Robust reduction in the aligned space: permuted honest models + one ×1e6 model; the median of the aligned
    models is the honest model, the plain average is not."""
    torch.manual_seed(0)
    base = _MLP()
    honest = []
    for i in range(4):
        m = _MLP()
        m.load_state_dict(base.state_dict())
        perm = torch.randperm(8) if method != "average" else torch.arange(8)
        with torch.no_grad():  # a hidden-unit permutation: the same function
            m.fc1.weight.copy_(base.fc1.weight[perm] + 1e-3 * i)
            m.fc1.bias.copy_(base.fc1.bias[perm])
            m.fc2.weight.copy_(base.fc2.weight[:, perm])
        honest.append(m.state_dict())
    bad = {k: v * 1e6 for k, v in base.state_dict().items()}
    states = [*honest[:2], bad, *honest[2:]]
    x = torch.randn(16, 4)
    kw = {"method": method, "template": base, "example_input": x, "bn_repair": None}
    robust = fuse(states, reduce=reducer("median"), **kw)
    plain = fuse(states, **kw)
    model = _MLP()
    model.load_state_dict(robust)
    assert torch.allclose(model(x), base(x), atol=1e-2)
    model.load_state_dict(plain)
    assert not torch.allclose(model(x), base(x), atol=1.0)


# ---- round-level screening ------------------------------------------------------------------------------
def test_screening_rejects_big_updates_and_examples_relative_to_the_round() -> None:
    sent = [{"w": torch.zeros(4), "n": torch.tensor(0)}] * 5
    states = [{"w": torch.full((4,), v), "n": torch.tensor(0)} for v in (1.0, 1.2, 0.8, 1e6, -10.0)]
    weights = [100.0, 120.0, 90.0, 110.0, 1e12]
    s = screen_updates(states, sent, weights, norm_factor=5.0, examples_factor=10.0, norm_action="reject")
    assert s.reasons[:3] == [None, None, None]
    assert "update norm" in s.reasons[3] and "num-examples=1e+12" in s.reasons[4]
    assert s.ratios["update_norm_ratio"] > 1e5
    off = screen_updates(states, sent, weights)  # factors 0: off
    assert off.reasons == [None] * 5
    clipped = screen_updates(states, sent, weights, norm_factor=5.0, norm_action="clip")
    assert clipped.clipped == 2 and clipped.reasons == [None] * 5
    # norms 2, 2.4, 1.6, 2e6, 20: median 2.4, bound 12
    assert torch.allclose(clipped.states[3]["w"].norm(), torch.tensor(12.0))
    assert torch.allclose(clipped.states[4]["w"], torch.full((4,), -6.0))
    with pytest.raises(ConfigError, match="update-norm-action"):
        screen_updates(states, sent, weights, norm_action="drop")


def test_two_clients_one_bad_the_lower_median_keeps_the_honest_scale() -> None:
    sent = [{"w": torch.zeros(3)}] * 2
    s = screen_updates(
        [{"w": torch.ones(3)}, {"w": torch.full((3,), 1e6)}], sent, [10, 10], norm_factor=5.0, norm_action="reject"
    )
    assert s.reasons[0] is None and s.reasons[1] is not None
    assert lower_median([3.0, 1.0]) == 1.0 and lower_median([2.0, 1.0, 3.0]) == 2.0


# ---- attack injection -----------------------------------------------------------------------------------
def test_attack_parsing_and_poisoning() -> None:
    assert parse_attack("") is None
    assert parse_attack("scale:1e6") == ("scale", 1e6)
    kind, value = parse_attack("num-examples:nan")
    assert kind == "num-examples" and value != value
    for bad in ("scale", "boost:3", "scale:x", "signflip:inf", "extra-bytes:0", "noise:0", "noise:-1"):
        with pytest.raises(ValueError):
            parse_attack(bad)
    sent = {"w": torch.ones(3), "n": torch.tensor(2)}
    trained = {"w": torch.full((3,), 1.5), "n": torch.tensor(3)}
    assert torch.equal(poison_state("scale", 10, trained, sent)["w"], torch.full((3,), 6.0))
    assert torch.equal(poison_state("signflip", 2, trained, sent)["w"], torch.full((3,), 0.0))
    assert int(poison_state("signflip", 2, trained, sent)["n"]) == 3
    assert poison_state("extra-bytes", 4000, trained, sent)["w"].numel() == 1000
    # noise:s replaces the update by Gaussian noise of s × its norm, each seed its own (near-orthogonal) draw
    sent = {"w": torch.zeros(4000), "bn.running_var": torch.ones(8), "n": torch.tensor(2)}
    trained = {"w": torch.full((4000,), 0.01), "bn.running_var": torch.ones(8), "n": torch.tensor(3)}
    a, b = (poison_state("noise", 4, trained, sent, seed=s) for s in (1, 2))
    delta = torch.cat([a["w"], a["bn.running_var"] - 1])
    assert float(delta.norm()) == pytest.approx(4 * 0.01 * 4000**0.5, rel=0.02)  # variances clamped at 0: ≈
    assert abs(float(torch.nn.functional.cosine_similarity(a["w"], b["w"], dim=0))) < 0.1
    assert torch.equal(a["w"], poison_state("noise", 4, trained, sent, seed=1)["w"])  # seeded
    assert float(a["bn.running_var"].min()) >= 0 and int(a["n"]) == 3
    ids = attacker_ids(0, 10, 2)
    assert len(set(ids)) == 2 and ids == sorted(ids) and ids == attacker_ids(0, 10, 2)
    assert attacker_ids(0, 3, 5) == [0, 1, 2]


def test_attack_option_is_validated_in_one_line() -> None:
    from strategies.registry import validate_config

    with pytest.raises(ConfigError, match=r"^attack='boost:3' is not KIND:VALUE"):
        validate_config({"attack": "boost:3"})
    with pytest.raises(ConfigError, match="update-norm-action"):
        validate_config({"update-norm-action": "drop"})
    cfg = validate_config({"strategy": "match", "robust": "krum"})
    assert cfg["robust"] == "krum" and cfg["update-norm-bound"] > 0  # on by default


def _run(cfg: dict, n: int):
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    run_server(InlineGrid(app, n), validate_config(cfg))
    return load_metrics(cfg["out"])["rounds"]


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("num-examples:nan", "is not finite"),
        ("extra-bytes:2e6", "exceeds 2 × the sent model"),
        ("scale:1e6", "clipped"),
        ("num-examples:1e8", "capped"),
    ],
)
def test_attacker_is_rejected_or_contained_and_no_honest_client_is_blamed(tmp_path, caplog, attack, reason) -> None:
    """Defaults on, 1 attacker of 4: a malformed reply (NaN claim, 2 MB of arrays for a ~10 KB model: refused
    by size before decoding) is rejected every round, naming the attacker; a well-formed outlier is clipped
    (norm) or capped (claim) instead, so the server runs every round with every reply and no one is rejected."""
    caplog.set_level(logging.WARNING, logger="fedfuse")
    cfg = {"dataset": "mnist1d", "num-clients": 4, "num-rounds": 2, "seed": 0, "out": str(tmp_path),
           "attack": attack, "attackers": 1}  # fmt: skip
    rows = _run(cfg, 4)
    (bad,) = attacker_ids(0, 4, 1)
    rejected = [r.message for r in caplog.records if "rejected update" in r.message]
    if reason in ("clipped", "capped"):
        assert [r["rejected"] for r in rows[1:]] == [0.0, 0.0] and rejected == []
        assert [r["replies"] for r in rows[1:]] == [4.0, 4.0]
        assert [r[reason] for r in rows[1:]] == [1.0, 1.0]  # the attacker, and only it
        assert rows[-1]["central_accuracy"] > rows[0]["central_accuracy"]
        return
    assert [r["rejected"] for r in rows[1:]] == [1.0, 1.0]
    assert [r["replies"] for r in rows[1:]] == [3.0, 3.0]
    assert len(rejected) == 2 and all(f"(partition {bad})" in m and reason in m for m in rejected), rejected


def test_injected_stragglers_are_counted_late_exactly_and_never_sleep(tmp_path) -> None:
    """straggle-prob: the injected stragglers, and only they, count as late (no actor is held: no sleep)."""
    n, rounds, p = 6, 3, 0.3
    cfg = {"dataset": "mnist1d", "num-clients": n, "num-rounds": rounds, "seed": 0, "out": str(tmp_path),
           "straggle-prob": p, "round-timeout": 30.0}  # fmt: skip
    t0 = time.perf_counter()
    rows = _run(cfg, n)
    assert time.perf_counter() - t0 < 30.0  # a sleeping straggler would take round-timeout + 1 s
    expected = []
    for rnd in range(1, rounds + 1):  # the draw inject_faults makes: (fail, straggle) from (seed, client, round)
        draws = [np.random.default_rng(derive_seed(0, pid, rnd, 5)).random(2)[1] for pid in range(n)]
        expected.append(float(sum(d < p for d in draws)))
    assert [r["timeouts"] for r in rows[1:]] == expected and sum(expected) > 0
    assert [r["replies"] for r in rows[1:]] == [n - e for e in expected]


def test_a_non_finite_aggregate_is_never_installed_and_blames_no_client(caplog) -> None:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedfuse.runners.inline import InlineGrid
    from strategies.base import FedFuseStrategy
    from strategies.observed import ObservedStrategy

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        state = {k: v + 1.0 for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)

    class Overflowing(FedFuseStrategy):
        def aggregate_arrays(self, server_round, states, weights):
            return {k: v * float("inf") for k, v in super().aggregate_arrays(server_round, states, weights).items()}

    caplog.set_level(logging.WARNING, logger="fedfuse")
    observed = ObservedStrategy(Overflowing(min_available_nodes=3, min_train_nodes=2))
    start = {"w": torch.zeros(2, 2)}
    result = observed.start(InlineGrid(app, 3), ArrayRecord(start), num_rounds=1)
    assert "w" not in result.arrays.to_torch_state_dict()  # Flower's Result holds only aggregates it installed
    stats = observed.round_metrics()
    assert stats["skipped"] == 1 and stats["rejected"] == 0
    assert "aggregate is not finite" in caplog.text and "rejected update" not in caplog.text


def test_with_defences_off_a_poisoned_global_is_blamed_not_the_honest_clients(tmp_path, caplog) -> None:
    """The old bug: after a ×1e6 update was accepted, honest clients were rejected as "non-finite". Now their
    diverged updates are counted as ``diverged`` with one line naming the global model as the cause."""
    caplog.set_level(logging.WARNING, logger="fedfuse")
    off = {"update-norm-bound": 0.0, "examples-bound": 0.0, "influence-z": 0.0}
    cfg = {"dataset": "digits", "num-clients": 4, "num-rounds": 3, "seed": 0, "out": str(tmp_path),
           "attack": "scale:1e6", "attackers": 1, **off}  # fmt: skip
    rows = _run(cfg, 4)
    assert sum(r.get("diverged", 0) for r in rows[1:]) >= 2
    assert sum(r.get("rejected", 0) for r in rows[1:]) == 0
    assert "rejected update" not in caplog.text
    assert "the global model is the likely cause" in caplog.text


@pytest.mark.parametrize("attack", ["num-examples:nan", "extra-bytes:2e6"])
def test_a_flower_strategy_gets_the_same_reply_checks(tmp_path, caplog, attack) -> None:
    """Flower's own FedMedian has no update checks; run by fedfuse's ServerApp it sees only the replies that pass
    fedfuse's (the ObservedStrategy's ReplyGuard): the attacker is rejected each round, the model stays finite."""
    caplog.set_level(logging.WARNING, logger="fedfuse")
    cfg = {"strategy": "flwr.serverapp.strategy:FedMedian", "dataset": "mnist1d", "num-clients": 4,
           "num-rounds": 2, "seed": 0, "out": str(tmp_path), "attack": attack, "attackers": 1}  # fmt: skip
    rows = _run(cfg, 4)
    assert [r["rejected"] for r in rows[1:]] == [1.0, 1.0]
    assert [r["replies"] for r in rows[1:]] == [3.0, 3.0]
    assert all(math.isfinite(r["central_loss"]) for r in rows)
    assert rows[-1]["central_accuracy"] > rows[0]["central_accuracy"]
    assert sum("rejected update from node" in r.message for r in caplog.records) == 2
