"""The influence test (fedfuse.influence): outsized and harmful updates answer to the server's examples, honest
non-IID ones are left alone."""

from __future__ import annotations

import math

import pytest
import torch

from fedfuse.influence import FLOOR, _paired, claim_test, influence_test
from fedfuse.screening import screen_updates

D = 50


def _task(seed: int = 0, n: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear regression: the server's ``n`` examples (x, y = x·w*) and w* (the model starts at 0)."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D, generator=gen, dtype=torch.float64)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    return x, x @ w_star, w_star


def _losses(x: torch.Tensor, y: torch.Tensor):
    return lambda delta: (x @ delta - y) ** 2  # per-example squared error of the model moved from 0 by delta


def _honest(w_star: torch.Tensor, k: int, seed: int = 1, size: float = 1.0) -> list[torch.Tensor]:
    """k updates a third of the way to w*, each with its own noise (non-IID clients)."""
    gen = torch.Generator().manual_seed(seed)
    return [size * (w_star / 3 + 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)) for _ in range(k)]


def _influence(test, deltas) -> list[float]:
    return [w * float(d.norm()) for w, d in zip(test.weights, deltas, strict=True)]


def test_an_outsized_liar_keeps_a_tenth_of_the_median_influence_and_the_honest_their_weights() -> None:
    x, y, w_star = _task()
    gen = torch.Generator().manual_seed(2)
    junk = torch.randn(D, generator=gen, dtype=torch.float64)
    junk *= 3 * float(w_star.norm()) / float(junk.norm())  # coherent junk, 3 × an honest update's size...
    deltas = [*_honest(w_star, 4), junk]
    weights = [10.0, 12.0, 9.0, 11.0, 100.0]  # ... claiming 10 × the median's examples: influence ~30 × the median
    test = influence_test(deltas, weights, _losses(x, y), z=2.0)
    assert test.tested == 1 and test.weights[:4] == weights[:4] and test.cut == 1 and test.floored == 1
    assert list(test.notes) == [4] and "at its claimed size" in test.notes[4]
    med = sorted(w * float(d.norm()) for w, d in zip(weights, deltas, strict=True))[2]  # the round's lower median
    assert math.isclose(_influence(test, deltas)[4], FLOOR * med, rel_tol=1e-9)


def test_an_outsized_honest_client_keeps_its_whole_weight() -> None:
    """Quantity skew: one client holds 20 × the data and trained further, in the direction the examples agree with."""
    x, y, w_star = _task()
    big = _honest(w_star, 1, seed=5, size=2.0)[0]
    deltas = [*_honest(w_star, 4), big]
    weights = [10.0, 12.0, 9.0, 11.0, 200.0]
    test = influence_test(deltas, weights, _losses(x, y), z=2.0)
    assert test.tested == 1 and test.weights == weights and test.cut == 0


def test_an_outsized_update_that_helps_a_little_and_harms_more_keeps_the_median_influence() -> None:
    """A large update that is mostly right but overshoots: at its full weight it raises the loss, at a tenth of the
    median's influence the loss is higher still (it carries the signal): it keeps the median's influence."""
    x, y, w_star = _task()
    deltas = [*_honest(w_star, 4, size=0.2), 4 * w_star]  # honest ones barely move; the big one overshoots w*
    weights = [10.0, 10.0, 10.0, 10.0, 40.0]
    test = influence_test(deltas, weights, _losses(x, y), z=2.0)
    assert test.cut == 1 and test.floored == 0
    assert list(test.trims) == [4] and test.trims[4].endswith("at its claimed size: cut to the median's")
    infl = _influence(test, deltas)
    med = sorted(w * float(d.norm()) for w, d in zip(weights, deltas, strict=True))[2]
    assert math.isclose(infl[4], med, rel_tol=1e-9) and test.weights[:4] == weights[:4]


def test_a_harmful_step_of_median_size_keeps_a_tenth_of_the_median_influence() -> None:
    """Step 4: an update within 2 × the median's influence (not outsized) whose own step raises the loss on the
    server's examples is floored; the honest updates keep their weights."""
    x, y, w_star = _task()
    harmful = -w_star / 3  # against the task, the size of an honest update, an honest claim
    deltas = [*_honest(w_star, 4), harmful]
    weights = [10.0, 12.0, 9.0, 11.0, 12.0]
    test = influence_test(deltas, weights, _losses(x, y), z=2.0)
    assert test.tested == 0 and test.cut == 1 and test.floored == 1 and test.weights[:4] == weights[:4]
    assert list(test.notes) == [4] and "the others not rescaled" in test.notes[4]
    med = sorted(w * float(d.norm()) for w, d in zip(weights, deltas, strict=True))[2]
    assert math.isclose(_influence(test, deltas)[4], FLOOR * med, rel_tol=1e-9)


def test_honest_non_iid_steps_are_never_floored() -> None:
    """Clients that each know a part of the task (here: a few coordinates of w*, as a class-skewed client knows its
    classes) move the loss on the whole of it a little each: none is taken for harmful, though leaving one out and
    rescaling the others may raise the loss. Neither is an honest client whose step barely helps."""
    x, y, w_star = _task()
    parts = torch.arange(D).chunk(5)
    deltas = [torch.zeros(D, dtype=torch.float64).index_copy(0, p, w_star[p] / 2) for p in parts]
    deltas.append(0.01 * w_star)  # a client that hardly trained
    weights = [10.0, 30.0, 5.0, 12.0, 8.0, 11.0]
    losses = _losses(x, y)
    rest = [w if i < 5 else 0.0 for i, w in enumerate(weights)]  # the barely-trained client left out, rest rescaled
    left_out = losses(sum(d * (w / sum(rest)) for d, w in zip(deltas, rest, strict=True)))
    diff, se = _paired(losses(sum(d * (w / sum(weights)) for d, w in zip(deltas, weights, strict=True))), left_out)
    assert diff > 2 * se  # the leave-one-out would take it for harmful
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        noisy = [d + 0.02 * torch.randn(D, generator=gen, dtype=torch.float64) for d in deltas]
        test = influence_test(noisy, weights, _losses(x, y), z=2.0)
        assert test.weights == weights and test.cut == 0


def test_a_free_rider_claiming_ten_times_the_median_keeps_a_tenth_of_the_median_weight() -> None:
    """An update of zero claiming 10 × the median's examples has no influence and no harmful step, yet takes two
    thirds of the round's weight: outsized by claimed weight, it is cut to the median's weight and, since its
    claimed weight raises the loss (it dilutes the rest), kept at a tenth of the median's."""
    x, y, w_star = _task()
    deltas = [*_honest(w_star, 4), torch.zeros(D, dtype=torch.float64)]
    weights = [10.0, 12.0, 9.0, 11.0, 110.0]
    test = influence_test(deltas, weights, _losses(x, y), z=2.0)
    assert test.tested == 1 and test.cut == 1 and test.weights[:4] == weights[:4]
    assert (
        math.isclose(test.weights[4], FLOOR * 11.0) and "its claimed weight (10 × the round's median)" in test.notes[4]
    )


def test_nothing_is_tested_with_z_0() -> None:
    x, y, w_star = _task()
    liar = [*_honest(w_star, 4), -w_star]
    off = influence_test(liar, [10.0, 12.0, 9.0, 11.0, 100.0], _losses(x, y), z=0.0)
    assert off.tested == 0 and off.weights == [10.0, 12.0, 9.0, 11.0, 100.0] and off.cut == 0


def test_non_finite_losses_count_as_harm() -> None:
    x, y, w_star = _task()
    deltas = [*_honest(w_star, 4), 5 * w_star]
    weights = [10.0, 12.0, 9.0, 11.0, 100.0]

    def losses(delta: torch.Tensor) -> torch.Tensor:  # the outsized update's full weight overflows the model
        out = (x @ delta - y) ** 2
        return torch.where(out > 1e3, torch.full_like(out, math.inf), out)

    test = influence_test(deltas, weights, losses, z=2.0)
    assert test.cut == 1 and test.weights[4] < 100.0


def _colluders() -> tuple[list[torch.Tensor], list[float], object]:
    """7 honest updates and 3 identical ones that add to an honest step a big move along a direction ``u`` the
    loss does not see until the model has moved along it beyond about 2.5 of them (a cliff, as BatchNorm's units
    that die under a junk step while the loss stays at chance)."""
    x, _, w_star = _task()
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(D, generator=gen, dtype=torch.float64)
    u /= u.norm()
    x = x - (x @ u)[:, None] * u  # the examples do not see u
    y = x @ w_star
    jitter = 1 + 0.1 * torch.rand(len(x), generator=gen, dtype=torch.float64)
    junk = w_star / 3 + 6 * float(w_star.norm()) * u
    deltas = [*_honest(w_star, 7), junk, junk.clone(), junk.clone()]
    weights = [10.0, 12.0, 9.0, 11.0, 10.0, 8.0, 12.0, 10.0, 10.0, 10.0]
    med = sorted(w * float(d.norm()) for w, d in zip(weights, deltas, strict=True))[4]
    cut = 10.0 * med / (10.0 * float(junk.norm()))

    def along(ws: list[float]) -> float:
        return float(sum(w * d for w, d in zip(ws, deltas, strict=True)) @ u) / sum(ws)

    cliff = (along([*weights[:9], cut]) + along(weights)) / 2  # between two and three of them back at full size

    def losses(delta: torch.Tensor) -> torch.Tensor:
        return (x @ delta - y) ** 2 + 1e3 * torch.relu(delta @ u - cliff) ** 2 * jitter

    return deltas, weights, losses


def test_near_identical_updates_are_put_back_together() -> None:
    """Colluders sending one vector count as one client: put back one at a time, two of three go back at full
    size (each alone is harmless); as one unit, all three keep a tenth of the median's influence."""
    deltas, weights, losses = _colluders()
    apart = influence_test(deltas, weights, losses, z=2.0)
    assert apart.weights[7:9] == [10.0, 10.0] and apart.weights[9] < 1.0  # the weakness the groups close
    test = influence_test(deltas, weights, losses, z=2.0, groups=[[7, 8, 9]])
    assert test.weights[:7] == weights[:7] and test.cut == 3 and all(w < 1.0 for w in test.weights[7:])
    assert "put back with the 2 near-identical update(s)" in test.notes[8]


def test_screening_puts_its_duplicate_groups_back_together() -> None:
    """Through :func:`screen_updates`: the group it finds (three claims of 30 sharing one client's weight: 10 each,
    the unit test's round) reaches the influence test, which puts its members back together."""
    deltas, weights, losses = _colluders()
    states = [{"w": d} for d in deltas]
    sent = [{"w": torch.zeros(D, dtype=torch.float64)}] * len(deltas)
    res = screen_updates(states, sent, [*weights[:7], 30.0, 30.0, 30.0], direction="median", reference={"w": deltas[0]},
                         losses=lambda state: losses(state["w"]), influence_z=2.0, duplicate_cosine=0.99)  # fmt: skip
    assert res.groups == [[7, 8, 9]] and res.shared == 3 and res.cut == 3
    assert res.weights[:7] == weights[:7] and all(w < 1.0 for w in res.weights[7:])
    assert all("put back with the 2 near-identical" in res.notes[i] for i in (7, 8, 9))


@pytest.mark.parametrize("z", [2.0, 0.0])
def test_screening_runs_the_test_only_with_a_trusted_reference_and_losses(z: float) -> None:
    """Through :func:`screen_updates`: the liar is cut (never rejected) with g₀ and the losses; without either, or
    with influence-z 0, its claim stands."""
    x, y, w_star = _task()
    gen = torch.Generator().manual_seed(3)
    junk = torch.randn(D, generator=gen, dtype=torch.float64)
    junk *= 3 * float(w_star.norm()) / float(junk.norm())
    deltas = [*_honest(w_star, 4), junk]
    states = [{"w": d.float()} for d in deltas]
    sent = [{"w": torch.zeros(D)}] * 5
    weights = [10.0, 12.0, 9.0, 11.0, 100.0]

    def losses(state: dict) -> torch.Tensor:
        return (x @ state["w"].double() - y) ** 2

    ref = {"w": (w_star / 3).float()}
    res = screen_updates(states, sent, weights, direction="median", reference=ref, losses=losses, influence_z=z)
    plain = screen_updates(states, sent, weights, direction="median", losses=losses, influence_z=z)
    assert plain.reasons == [None] * 5 and res.reasons == [None] * 5
    assert plain.cut == 0
    if z > 0:
        assert res.cut == 1 and res.weights[4] < 0.05 * plain.weights[4] and res.weights[:4] == plain.weights[:4]
    else:
        assert res.cut == 0 and res.weights == plain.weights


def test_claims_answer_to_any_aggregate_such_as_a_fusion_of_models_trained_apart() -> None:
    """``claim_test`` asks only for the aggregate's losses under given weights: models trained apart (a fusion,
    no update to measure). A junk model claiming 10 × the median keeps a tenth of the median's weight; honest
    models claiming 3 × keep theirs; z = 0 does nothing."""
    x, y, w_star = _task()
    models = [w_star + 0.3 * torch.randn(D, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
              for i in range(5)]  # fmt: skip
    junk = -3 * w_star

    def losses(ws):  # the weighted mean of the models: FedAvg's fusion
        total = sum(ws)
        return _losses(x, y)(sum(m * (w / total) for m, w in zip([*models, junk], ws, strict=True)))

    claims = [10.0, 30.0, 10.0, 12.0, 9.0, 100.0]  # an honest client with 3 x the median's data, a liar at 10 x
    test = claim_test(losses, claims, 2.0)
    assert test.weights[:5] == claims[:5] and test.tested == 2 and test.cut == 1
    assert test.weights[5] == pytest.approx(FLOOR * 10.0) and "claimed weight (10 ×" in test.notes[5]
    assert claim_test(losses, claims, 0.0).weights == claims
