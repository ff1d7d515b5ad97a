"""Screening that is fair to honest heterogeneity (fedfuse.screening) and the omniscient attacks (fedfuse.attacks)."""

from __future__ import annotations

import pytest
import torch

from fedfuse.attacks import flip_labels, parse_attack
from fedfuse.errors import ConfigError
from fedfuse.robust import robust_reduce
from fedfuse.screening import ScreeningConfig, screen_updates
from fedfuse.state import weighted_average

SENT = {"w": torch.zeros(4), "n": torch.tensor(0)}


def _state(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "n": torch.tensor(0)}


def test_a_capped_claim_cannot_dominate_the_mean() -> None:
    states = [_state(1, 0, 0, 0), _state(1, 0, 0, 0), _state(1, 0, 0, 0), _state(-1, 0, 0, 0)]
    s = screen_updates(states, [SENT] * 4, [100, 120, 90, 1e8], examples_cap=3.0)
    assert s.weights == [100, 120, 90, 300] and s.capped == 1  # 3 × the lower median (100)
    mean = weighted_average(s.states, s.weights)["w"][0]
    assert mean > 0  # without the cap the liar's 1e8 would set the sign: -1 + 2·310/(1e8 + 310) < 0
    assert weighted_average(states, [100, 120, 90, 1e8])["w"][0] < 0


def test_robust_reductions_ignore_the_claimed_num_examples() -> None:
    states = [_state(v, v, v, v) for v in (1.0, 2.0, 3.0, 100.0, 200.0)]
    weights = [1, 1, 1, 1e6, 1e6]  # the two outliers claim almost all the data
    for method in ("median", "trimmed-mean", "krum"):
        out = robust_reduce(states, weights, method=method, fraction=0.4)["w"]
        assert float(out[0]) <= 3.0, method  # weighted by the claims, the median would be 100


def test_the_norm_bound_allows_for_the_work_done() -> None:
    """A client that trained 40 × longer moves ~40 × further: per local step it is not an outlier."""
    states = [_state(1, 0, 0, 0), _state(0, 1.1, 0, 0), _state(0, 0, 0.9, 0), _state(0, 0, 0, 40)]
    per_step = screen_updates(states, [SENT] * 4, [10] * 4, [10, 10, 10, 400], norm_factor=3.0)
    assert per_step.clipped == 0 and per_step.reasons == [None] * 4
    raw = screen_updates(states, [SENT] * 4, [10] * 4, norm_factor=3.0)  # no work reported: the raw norm
    assert raw.clipped == 1 and raw.reasons == [None] * 4  # clipped by default, never rejected
    assert torch.allclose(raw.states[3]["w"].norm(), torch.tensor(3.0))  # 3 × the lower median norm (1)


def test_direction_guard_removes_only_the_part_against_the_round() -> None:
    honest = [_state(1, 0.5, 0, 0), _state(1, -0.5, 0.2, 0), _state(1, 0, -0.3, 0.1)]
    bad = _state(-3, 0, 0, 0)
    s = screen_updates([*honest, bad], [SENT] * 4, [10] * 4, direction="median")
    assert s.projected == 1 and s.reasons == [None] * 4
    assert all(torch.equal(s.states[i]["w"], honest[i]["w"]) for i in range(3))  # honest untouched
    assert torch.allclose(s.states[3]["w"], torch.zeros(4), atol=1e-6)  # -3·e1 against a median of e1: removed
    assert s.weights[:3] == [10] * 3 and s.weights[3] < 1e-4  # and it keeps no weight to dilute the others


def test_a_screened_update_never_leaves_a_negative_running_variance() -> None:
    """Projecting an update removes a part of it, which can take a BatchNorm variance below 0 (NaN outputs for every
    example: a shared-init BN CNN round with 3 evade attackers of 10 ended at 0.100, loss nan); it stays at 0."""
    sent = {"w": torch.zeros(2), "bn.running_var": torch.ones(2)}
    honest = [{"w": torch.tensor([1.0, 0.2 * i]), "bn.running_var": torch.tensor([0.5, 1.0])} for i in range(3)]
    bad = {"w": torch.tensor([-3.0, 0.0]), "bn.running_var": torch.tensor([0.1, 0.9])}  # valid as sent
    s = screen_updates([*honest, bad], [sent] * 4, [10] * 4, direction="median")
    assert s.projected == 1 and s.reasons == [None] * 4
    assert float(s.states[3]["bn.running_var"].min()) == 0.0  # the projection alone: 1 − 0.9 − 2·0.5 < 0
    assert all(torch.equal(s.states[i]["bn.running_var"], honest[i]["bn.running_var"]) for i in range(3))


def test_boosted_attacks_send_valid_variances() -> None:
    """A boosted update (scale, sign flip, boosted label flip) would take a BatchNorm variance below 0 and be
    rejected as malformed; the simulated attacker stays valid, as one that means to get through would."""
    from fedfuse.attacks import poison_state

    sent = {"w": torch.zeros(2), "bn.running_var": torch.ones(2)}
    trained = {"w": torch.ones(2), "bn.running_var": torch.tensor([0.5, 1.5])}
    for kind, value in (("scale", 4.0), ("signflip", 4.0), ("labelflip", 4.0)):
        out = poison_state(kind, value, trained, sent)
        assert float(out["bn.running_var"].min()) >= 0.0 and not torch.equal(out["w"], trained["w"]), kind
    assert poison_state("scale", 4.0, trained, sent)["bn.running_var"].tolist() == [0.0, 3.0]


def test_screening_config_validates_in_one_line() -> None:
    assert ScreeningConfig().update_norm_action == "clip"
    with pytest.raises(ConfigError, match="direction-guard='mean'"):
        ScreeningConfig(direction_guard="mean")
    with pytest.raises(ConfigError, match="examples_cap=-1"):
        ScreeningConfig(examples_cap=-1)


def test_new_attacks_parse_and_labelflip_flips() -> None:
    assert parse_attack("labelflip") == ("labelflip", 1.0)
    assert parse_attack("labelflip:4") == ("labelflip", 4.0)
    assert parse_attack("alie:1.5") == ("alie", 1.5) and parse_attack("ipm:4") == ("ipm", 4.0)
    assert parse_attack("adaptive:0.99") == ("adaptive", 0.99)
    with pytest.raises(ValueError, match="ratio"):
        parse_attack("adaptive:2")
    assert parse_attack("evade:0.4") == ("evade", 0.4)
    with pytest.raises(ValueError, match="cosine in"):
        parse_attack("evade:1")
    assert parse_attack("lowkey:0.2") == ("lowkey", 0.2)
    assert parse_attack("freeride:0.99") == ("freeride", 0.99)
    with pytest.raises(ValueError, match="ratio"):
        parse_attack("lowkey:0")
    with pytest.raises(ConfigError, match="influence_z=-1"):
        ScreeningConfig(influence_z=-1)
    assert flip_labels("labelflip", torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]
    assert flip_labels("scale", torch.tensor([0, 3]), 10).tolist() == [0, 3]


def test_quantity_skew_rejects_no_honest_client(tmp_path) -> None:
    """The issue's run (quantity skew α 0.3, 5 clients, seed 2): it was 0.075 with two honest clients rejected
    every round; now no one is rejected and the model learns."""
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    cfg = {"dataset": "digits", "model": "mlp", "num-clients": 5, "num-rounds": 3, "partition": "quantity",
           "alpha": 0.3, "seed": 2, "out": str(tmp_path)}  # fmt: skip
    run_server(InlineGrid(app, 5), validate_config(cfg))
    rows = load_metrics(tmp_path)["rounds"]
    assert [r["rejected"] for r in rows[1:]] == [0.0] * 3 and [r["replies"] for r in rows[1:]] == [5.0] * 3
    assert rows[-1]["central_accuracy"] > 0.5


def test_the_steps_cap_scale_follows_the_upper_clients_but_not_three_liars_of_ten() -> None:
    from fedfuse.screening import cap_scale

    assert cap_scale([5.0, 1.0]) == 1.0 and cap_scale([3.0, 1.0, 2.0]) == 2.0  # the lower median with few clients
    honest = [2.0, 2.0, 3.0, 3.0, 4.0, 5.0, 25.0]
    assert cap_scale([*honest, 30.0, 40.0, 200.0]) == 25.0  # the 7th smallest of 10, not the median (4)
    assert cap_scale([*honest, 1e9, 1e9, 1e9]) == 25.0  # three liars cannot raise it beyond an honest claim


def test_an_honest_client_that_trained_50x_the_median_is_not_clipped_under_quantity_skew() -> None:
    """Quantity skew: steps 2…200 (the largest 50 × the median), every client moving 1 per step. Capped at 10 ×
    the median's steps the largest would be clipped to 120 of its 200; capped at 10 × the 70th percentile it is
    not, while three liars of ten claiming 1e9 steps still get a bound from an honest client's steps."""
    steps = [2.0, 2.0, 3.0, 3.0, 4.0, 5.0, 25.0, 30.0, 40.0, 200.0]
    states = [{"w": torch.nn.functional.one_hot(torch.tensor(i), 10).float() * s} for i, s in enumerate(steps)]
    sent = [{"w": torch.zeros(10)}] * 10
    s = screen_updates(states, sent, steps, steps, norm_factor=3.0, examples_cap=10.0)
    assert s.clipped == 0 and torch.equal(s.states[9]["w"], states[9]["w"])
    assert s.weights[9] == 40.0 and s.capped == 1  # its aggregation weight is still capped at 10 × the median
    liars = [*steps[:7], 1e9, 1e9, 1e9]
    lying = [{"w": torch.full((10,), 1e6)}] * 3
    s = screen_updates([*states[:7], *lying], sent, liars, liars, norm_factor=3.0, examples_cap=10.0)
    bound = 3.0 * 1.0 * 10 * 25.0  # k × median norm per step × 10 × the 7th smallest claim (honest: 25)
    assert s.clipped == 3 and all(abs(float(st["w"].norm()) - bound) < 1e-3 for st in s.states[7:])


def test_evade_direction_has_the_chosen_cosine_per_tensor_and_the_norm() -> None:
    """``evade:c``: per tensor cosine −c with the honest mean, the rest along −σ made orthogonal to it; the
    tensors share the norm as a typical honest update does."""
    from fedfuse.attacks import _against

    g = torch.Generator().manual_seed(0)
    mean = {"a": torch.randn(20, 5, generator=g, dtype=torch.float64), "b": 3 * torch.randn(7, generator=g).double()}
    std = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in mean.items()}
    typical = {"a": 4.0, "b": 3.0}
    for c in (0.0, 0.05, 0.4, 0.9):
        out = _against(mean, std, c, 2.5, typical)
        for k in mean:
            cos = float(torch.nn.functional.cosine_similarity(out[k].flatten(), mean[k].flatten(), dim=0))
            assert cos == pytest.approx(-c, abs=1e-9)
        assert float(out["a"].norm()) == pytest.approx(2.0) and float(out["b"].norm()) == pytest.approx(1.5)


def test_near_identical_updates_share_one_clients_weight() -> None:
    """Colluders sending one vector (alie, ipm, evade, lowkey) buy no more say by their number: a group at cosine
    >= 0.99 weighs the mean of its claims; honest updates at 0.95 with each other, and the rule off, keep theirs."""
    from fedfuse.screening import duplicate_groups

    gen = torch.Generator().manual_seed(0)
    honest = [torch.randn(64, generator=gen) for _ in range(4)]
    close = honest[0] + 0.33 * torch.randn(64, generator=gen) * honest[0].norm() / 8  # cosine ~0.95 with honest[0]
    cos = float(torch.nn.functional.cosine_similarity(close, honest[0], dim=0))
    assert 0.9 < cos < 0.99, cos
    bad = -2 * torch.stack(honest).mean(0)
    deltas = [*honest, close, bad, bad * 1.5, bad + 1e-4 * torch.randn(64, generator=gen)]
    assert duplicate_groups(deltas, 0.99) == [[5, 6, 7]]  # scaled or jittered copies still point one way
    assert duplicate_groups([*deltas, torch.zeros(64), torch.zeros(64)], 0.99) == [[5, 6, 7], [8, 9]]
    assert duplicate_groups(deltas, 0.9) == [[0, 4], [5, 6, 7]]  # a lower threshold takes the close pair too

    sent = {"w": torch.zeros(64)}
    states = [{"w": d} for d in deltas]
    weights = [10.0, 20.0, 10.0, 10.0, 10.0, 30.0, 30.0, 30.0]
    s = screen_updates(states, [sent] * 8, weights, duplicate_cosine=0.99)
    assert s.weights == [10.0, 20.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0] and s.shared == 3 and s.groups == [[5, 6, 7]]
    many = screen_updates([*states[:4], *states[5:], {"w": bad * 2}], [sent] * 8, weights, duplicate_cosine=0.99)
    assert many.weights == weights and many.shared == 0  # 4 of 8: the round's consensus, not a minority of Sybils
    off = screen_updates(states, [sent] * 8, weights)  # 0: off (the function's default; the config's is 0.99)
    assert off.weights == weights and off.shared == 0
    assert ScreeningConfig().duplicate_cosine == 0.99
    with pytest.raises(ConfigError, match="duplicate_cosine=1.5"):
        ScreeningConfig(duplicate_cosine=1.5)


def test_colluders_are_grouped_and_honest_clients_never(tmp_path, caplog) -> None:
    """Through the ServerApp: ipm:4 from 3 of 10 clients (one vector) is logged as one group each round, and no honest
    client of a Dirichlet-0.1 run is ever grouped (their updates reached cosine 0.95 at most, screening_options)."""
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    def run(name: str, **extra: object) -> list[dict]:
        cfg = {"dataset": "digits", "model": "mlp", "num-clients": 10, "num-rounds": 3, "partition": "dirichlet",
               "alpha": 0.3, "seed": 1, "out": str(tmp_path / name), **extra}  # fmt: skip
        run_server(InlineGrid(app, 10), validate_config(cfg))
        return load_metrics(tmp_path / name)["rounds"][1:]

    with caplog.at_level("WARNING", logger="fedfuse"):
        rows = run("ipm", attack="ipm:4", attackers=3)
    assert [r["shared"] for r in rows] == [3.0, 3.0, 3.0]
    lines = [r.getMessage() for r in caplog.records if "near-identical updates" in r.getMessage()]
    assert len(lines) == 3 and all(line.count("partition") == 3 for line in lines), lines
    clean = run("clean", alpha=0.1)
    assert [r["shared"] for r in clean] == [0.0, 0.0, 0.0]
