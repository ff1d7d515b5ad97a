"""A trusted reference (fedfuse.trust): colluders capture the round's median, not the server's own update."""

from __future__ import annotations

import math

import pytest
import torch

from fedfuse.errors import ConfigError
from fedfuse.screening import screen_updates


def _colluding_round(seed: int = 0) -> tuple[list[dict], list[dict], torch.Tensor]:
    """3 honest updates (a shared direction c under larger own parts) and 4 identical −2·mean(honest): colluders
    that hold the coordinate median, as three of ten do on real non-IID updates (benchmarks/results/attacks.md)."""
    gen = torch.Generator().manual_seed(seed)
    d = 2000
    c = torch.randn(d, generator=gen)
    honest = [0.5 * c + torch.randn(d, generator=gen) for _ in range(3)]
    bad = -2 * torch.stack(honest).mean(0)
    return [{"w": u} for u in [*honest, bad, bad, bad, bad]], [{"w": torch.zeros(d)}] * 7, c


@pytest.mark.parametrize("seed", [0, 1])
def test_colluders_capture_the_median_reference_but_not_a_trusted_one(seed: int) -> None:
    states, sent, c = _colluding_round(seed)
    by_median = screen_updates(states, sent, [100.0] * 7, direction="median")
    by_trust = screen_updates(states, sent, [100.0] * 7, direction="median", reference={"w": c})
    assert by_median.weights[3:] == [100.0] * 4  # the colluders are the median: nothing against them
    assert max(by_trust.weights[3:]) < 1e-3  # against the server's update they point away: no weight left
    assert by_trust.weights[:3] == [100.0] * 3  # honest updates (cosine > 0 with c) keep theirs

    def cos(s) -> float:
        mean = sum(w * st["w"] for w, st in zip(s.weights, s.states, strict=True)) / sum(s.weights)
        return float(torch.nn.functional.cosine_similarity(mean, c, dim=0))

    assert cos(by_median) < 0 < 0.3 < cos(by_trust)


def _round(cosines: list[float]) -> object:
    """Updates at the given cosines with g₀ = e₀ (unit norm, equal claims), screened against g₀."""
    g = torch.zeros(400)
    g[0] = 1.0

    def update(cos: float) -> dict:
        u = torch.zeros(400)
        u[0], u[1] = cos, (1 - cos**2) ** 0.5
        return {"w": u}

    n = len(cosines)
    return screen_updates([update(c) for c in cosines], [{"w": torch.zeros(400)}] * n, [10.0] * n,
                          direction="median", reference={"w": g})  # fmt: skip


def test_updates_inside_the_band_keep_their_weight_and_their_direction() -> None:
    """Against g₀ an update keeps its whole weight, and everything of it, down to cosine −0.4 (honest non-IID
    updates scatter widely around a 100-example g₀); below, its weight falls linearly to none at −0.65 and only the
    part beyond the band is projected away: what is left sits at cosine −0.4 with g₀."""
    cosines = [0.5, 0.1, 0.0, -0.2, -0.39, -0.525, -0.7]
    res = _round(cosines)
    assert res.weights[:5] == [10.0] * 5 and res.projected == 2
    assert res.weights[5] == pytest.approx(5.0, rel=1e-6) and res.weights[6] < 1e-4
    for cos, st in zip(cosines, res.states, strict=True):
        u = st["w"]
        got = float(u[0]) / float(u.norm())
        assert got == pytest.approx(max(cos, -0.4), abs=1e-6)
        assert float(u[1]) == pytest.approx((1 - cos**2) ** 0.5, abs=1e-6)  # the orthogonal part is untouched


def test_an_update_the_norm_bound_clipped_gets_no_band() -> None:
    """A clipped update (e.g. a boosted label flip near cosine 0 with g₀) loses every part against g₀ and its weight
    falls from cosine 0: being oversized buys no benefit of the doubt."""
    g = torch.zeros(400)
    g[0] = 1.0
    ups = [torch.zeros(400) for _ in range(6)]
    for k, u in enumerate(ups[:5]):
        u[0], u[2 + k] = 0.5, 0.8
    ups[5][0], ups[5][1] = -0.1 * 20, 0.995 * 20  # 20 x the others' norm, at cosine -0.1
    res = screen_updates([{"w": u} for u in ups], [{"w": torch.zeros(400)}] * 6, [10.0] * 6, norm_factor=3.0,
                         direction="median", reference={"w": g})  # fmt: skip
    assert res.clipped == 1 and res.projected == 1
    assert float(res.states[5]["w"][0]) == pytest.approx(0.0, abs=1e-9)  # all of it against g₀ removed
    assert res.weights[5] == pytest.approx(10.0 * (1 - 0.1 / 0.25), rel=1e-3)
    assert res.weights[:5] == [10.0] * 5


def test_the_trusted_reference_is_the_servers_own_seeded_update(tmp_path) -> None:
    from fedfuse.experiment import dataset_for, model_for
    from fedfuse.trust import trusted_reference
    from strategies.registry import validate_config

    cfg = validate_config({"dataset": "digits", "model": "mlp", "trusted-data": 50, "seed": 3, "out": str(tmp_path)})
    model = model_for(cfg, dataset_for(cfg))
    ref = trusted_reference(cfg, model)
    assert ref is not None and len(ref.x) == 50 and trusted_reference({**cfg, "trusted-data": 0}, model) is None
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    a, b, other = ref(sent, 1), ref(sent, 1), ref(sent, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)  # a resumed run computes the same reference
    assert any(not torch.equal(a[k], sent[k]) for k in a)  # it trained
    assert any(not torch.equal(a[k], other[k]) for k in a)  # each round reshuffles (seeded by the round)
    assert all(torch.equal(model.state_dict()[k], sent[k]) for k in sent)  # the caller's model is untouched
    with pytest.raises(ConfigError, match=r"trusted-data=99999 exceeds the .* training samples of 'digits'"):
        trusted_reference({**cfg, "trusted-data": 99999}, model)


def test_trusted_data_needs_the_direction_guard() -> None:
    from strategies.registry import validate_config

    with pytest.raises(ConfigError, match="trusted-data=50 .* needs direction-guard median"):
        validate_config({"trusted-data": 50, "direction-guard": "off"})
    for strategy in ("layerwise", "fedpfn"):  # clients that get part of the model, or keep entries fixed
        with pytest.raises(ConfigError, match=f"trusted-data=50 needs strategy fedavg or .*; got '{strategy}'"):
            validate_config({"strategy": strategy, "trusted-data": 50})


def test_the_default_reference_is_on_where_it_applies_and_silent_elsewhere(tmp_path) -> None:
    """Default ``trusted-data`` (100): the guard's reference for the strategies that own it; unused, without an
    error, where the guard is off or the strategy cannot use it; a split smaller than 100 is taken whole."""
    from types import SimpleNamespace

    from fedfuse.experiment import dataset_for, model_for
    from fedfuse.screening_options import TRUSTED_DATA
    from fedfuse.trust import trusted_examples
    from strategies.registry import build_strategy, validate_config

    cfg = validate_config({"dataset": "digits", "model": "mlp", "seed": 0, "out": str(tmp_path)})
    assert cfg["trusted-data"] == TRUSTED_DATA == 100
    model = model_for(cfg, dataset_for(cfg))
    trusted = build_strategy(cfg, model).trusted
    assert trusted is not None and len(trusted.x) == 100
    assert build_strategy(validate_config({**cfg, "direction-guard": "off"}), model).trusted is None
    assert build_strategy(validate_config({**cfg, "strategy": "fedpfn"}), model).trusted is None
    small = SimpleNamespace(name="tiny", x_train=torch.randn(30, 4), y_train=torch.arange(30) % 3)
    x, y = trusted_examples(cfg, small)
    assert len(x) == 30 and sorted(y.tolist()) == sorted(small.y_train.tolist())
    with pytest.raises(ConfigError, match=r"trusted-data=31 exceeds the 30 training samples of 'tiny'; allowed: 0..30"):
        trusted_examples({**cfg, "trusted-data": 31}, small)


def test_trusted_data_contains_colluding_ipm_that_captures_the_median(tmp_path) -> None:
    """3 of 10 clients send −4·mean(honest) (seed 1, measured in benchmarks/results/attacks.md): the default guard
    is captured (0.106), the trusted reference keeps the run at the 'attackers absent' accuracy (0.390)."""
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    accs = {}
    for n in (0, 100):
        out = tmp_path / str(n)
        cfg = {"dataset": "digits", "model": "mlp", "num-clients": 10, "num-rounds": 3, "partition": "dirichlet",
               "alpha": 0.3, "seed": 1, "attack": "ipm:4", "attackers": 3, "trusted-data": n,
               "out": str(out)}  # fmt: skip
        run_server(InlineGrid(app, 10), validate_config(cfg))
        accs[n] = load_metrics(out)["rounds"][-1]["central_accuracy"]
    assert accs[100] > accs[0] + 0.15, accs


def test_a_reply_with_its_keys_reordered_is_read_in_the_sent_order() -> None:
    """Flat views of the updates (norms, cosines, the trusted projection) line up key by key only if every state
    has the sent model's key order; a reordered reply used to dodge the guard (its dot products mixed tensors)."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from fedfuse.replies import unpack_reply
    from fedfuse.screening import ScreeningConfig, screen_round

    gen = torch.Generator().manual_seed(0)
    sent = {"a": torch.zeros(50), "b": torch.zeros(50)}
    c = {"a": torch.randn(50, generator=gen), "b": torch.randn(50, generator=gen)}
    honest = [{k: c[k] + 0.5 * torch.randn(50, generator=gen) for k in ("a", "b")} for _ in range(3)]
    bad = {"b": -c["b"], "a": -c["a"]}  # −c, keys in the other order

    def reply(state: dict) -> SimpleNamespace:  # what unpack_reply reads of a Message: its content
        return SimpleNamespace(content=RecordDict({"arrays": ArrayRecord(state),
                                                   "metrics": MetricRecord({"num-examples": 10})}))  # fmt: skip

    unpacked = [unpack_reply(reply(s), sent, "num-examples") for s in [*honest, bad]]
    assert all(list(r.state) == ["a", "b"] for r in unpacked)  # type: ignore[union-attr]
    rs = screen_round(1, ["0", "1", "2", "3"], unpacked, [sent] * 4, ScreeningConfig(), reference=c)
    assert rs.weights[3] < 1e-5 and rs.weights[:3] == [10.0] * 3


def test_with_a_trusted_reference_only_agreeing_updates_may_exceed_the_median_norm() -> None:
    """Norm bound k = 3: an update 2.5 × the median norm per step passes without a reference; against the server's
    update g₀ it keeps its size only if it agrees with g₀ (cosine ≥ 0.25), else it is clipped to the median."""
    gen = torch.Generator().manual_seed(0)
    d = 400
    c = torch.randn(d, generator=gen)
    c /= c.norm()
    honest = []
    for _ in range(4):
        u = 0.5 * c + torch.randn(d, generator=gen) / d**0.5  # cosine ~0.45 with c, norm ~1.1
        honest.append(u / u.norm())
    orth = torch.randn(d, generator=gen)
    orth -= orth.dot(c) * c
    boosted_bad = 2.5 * orth / orth.norm()  # boosted, orthogonal to g₀ (a label flip's own-direction part)
    boosted_good = 2.5 * honest[0]  # as large, but along the honest direction
    states = [{"w": u} for u in [*honest, boosted_bad, boosted_good]]
    sent = [{"w": torch.zeros(d)}] * 6
    plain = screen_updates(states, sent, [10.0] * 6, norm_factor=3.0, direction="median")
    trusted = screen_updates(states, sent, [10.0] * 6, norm_factor=3.0, direction="median", reference={"w": c})
    assert plain.clipped == 0  # 2.5 < 3 × the median norm
    assert trusted.clipped == 1
    assert abs(float(trusted.states[4]["w"].norm()) - 1.0) < 1e-4  # clipped to 1 × the median norm (1)
    assert torch.equal(trusted.states[5]["w"], states[5]["w"])  # the agreeing one keeps its 2.5 ×
    assert all(torch.equal(trusted.states[i]["w"], honest[i]) for i in range(4))


def test_trusted_data_contains_a_boosted_label_flip(tmp_path) -> None:
    """2 of 10 clients train on flipped labels and send 4 × their update (seed 1): with the trusted reference the
    run used to end at 0.153 (the attackers clipped only to 3 × the median norm); now within 3 points of the run
    with the attackers' replies rejected (0.571)."""
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    accs = {}
    for attack in ("labelflip:4", "num-examples:nan"):
        out = tmp_path / attack.replace(":", "-")
        cfg = {"dataset": "digits", "model": "mlp", "num-clients": 10, "num-rounds": 3, "partition": "dirichlet",
               "alpha": 0.3, "seed": 1, "attack": attack, "attackers": 2, "trusted-data": 100,
               "out": str(out)}  # fmt: skip
        run_server(InlineGrid(app, 10), validate_config(cfg))
        accs[attack] = load_metrics(out)["rounds"][-1]["central_accuracy"]
    assert accs["labelflip:4"] > accs["num-examples:nan"] - 0.03, accs


def test_lora_strategies_guard_against_the_servers_own_adapter_update(tmp_path) -> None:
    """LoRA runs take the trusted reference too: the server trains its copy of the whole LoRA model (frozen base,
    head) from the global state like a client, and the adapters' updates are measured against that. 2 of 10
    clients send the adaptive attack (−mean of the honest adapter updates, just under every bound): against the
    round's median the run collapses (0.100, seed 0, 4 rounds), against g₀ it ends where the run with the
    attackers' replies rejected does (0.691 both)."""
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    accs = {}
    for attack, n in (("adaptive:0.99", 0), ("adaptive:0.99", 100), ("num-examples:nan", 100)):
        out = tmp_path / f"{attack.replace(':', '-')}-{n}"
        cfg = {"dataset": "digits", "model": "mlp", "strategy": "fedavg-lora", "lora-rank": 4,
               "pretrain": "low-classes", "num-clients": 10, "num-rounds": 4, "partition": "dirichlet", "alpha": 0.3,
               "seed": 0, "attack": attack, "attackers": 2, "trusted-data": n, "out": str(out)}  # fmt: skip
        run_server(InlineGrid(app, 10), validate_config(cfg))
        accs[(attack, n)] = load_metrics(out)["rounds"][-1]["central_accuracy"]
    absent = accs[("num-examples:nan", 100)]
    assert accs[("adaptive:0.99", 100)] > absent - 0.03, accs
    assert accs[("adaptive:0.99", 0)] < absent - 0.2, accs  # the attack is real: the median reference is captured


def test_mixed_rank_lora_updates_are_screened_in_one_space(tmp_path) -> None:
    """Clients of ranks 2 and 4 send adapters of different shapes, which share no coordinates: screened as they
    came, no guard or influence test acted and 2 adaptive attackers of 10 took the run to chance (0.100, seed 0,
    4 rounds). Completed to the global rank against the global adapters (fedfuse.lora.complete_rank), they end where
    the run with their replies rejected does (0.685 both)."""
    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    accs, rows = {}, {}
    for attack in ("adaptive:0.99", "num-examples:nan"):
        out = tmp_path / attack.replace(":", "-")
        cfg = {"dataset": "digits", "model": "mlp", "strategy": "hetlora", "lora-ranks": "2,4",
               "pretrain": "low-classes", "num-clients": 10, "num-rounds": 4, "partition": "dirichlet", "alpha": 0.3,
               "seed": 0, "attack": attack, "attackers": 2, "out": str(out)}  # fmt: skip
        run_server(InlineGrid(app, 10), validate_config(cfg))
        rows[attack] = load_metrics(out)["rounds"][1:]
        accs[attack] = rows[attack][-1]["central_accuracy"]
    assert accs["adaptive:0.99"] > accs["num-examples:nan"] - 0.03, accs
    assert sum(r["projected"] for r in rows["adaptive:0.99"]) > 0  # the guard acts on mixed ranks


def test_the_influence_test_holds_evade_and_lowkey_where_the_claims_alone_do_not(tmp_path, caplog) -> None:
    """One of five clients claims the caps and sends coherent junk orthogonal to the honest mean (``evade:0.4``).
    Its whole weight survives the guard's band; without the influence test (``influence-z 0``) the run ends near
    chance (0.100, seed 0). With it (the default) the server's examples show the harm of its claimed size: it keeps
    a tenth of a median client's influence, is never rejected, and the run ends within a point of the run without
    the attacker (0.716 vs 0.724, seed 0). The same junk claiming 0.2 × the caps (``lowkey:0.2``) stays under the
    outsized line; its own step still raises the loss on the server's examples, so step 4 floors it (0.702 vs 0.646
    without the test). A free rider (``freeride:0.99``: the model it was sent back, claiming the caps) is outsized by
    its claimed weight: kept at a tenth of the median's, within 0.03 of ``absent`` (0.685 without the test)."""
    import logging

    from clients.client_app import app
    from fedfuse.results import load_metrics
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config
    from strategies.server_app import run_server

    caplog.set_level(logging.WARNING, logger="fedfuse")
    accs, rejected, cut = {}, {}, {}
    runs = (
        ("evade:0.4", 2.0),
        ("num-examples:nan", 2.0),
        ("evade:0.4", 0.0),
        ("lowkey:0.2", 2.0),
        ("lowkey:0.2", 0.0),
        ("freeride:0.99", 2.0),
        ("freeride:0.99", 0.0),
    )
    for attack, z in runs:
        out = tmp_path / f"{attack.replace(':', '-')}-{z}"
        cfg = {"dataset": "digits", "model": "mlp", "num-clients": 5, "num-rounds": 3, "partition": "dirichlet",
               "alpha": 0.3, "seed": 0, "attack": attack, "attackers": 1, "influence-z": z,
               "out": str(out)}  # fmt: skip
        run_server(InlineGrid(app, 5), validate_config(cfg))
        rows = load_metrics(out)["rounds"]
        accs[(attack, z)] = rows[-1]["central_accuracy"]
        rejected[(attack, z)] = sum(r.get("rejected", 0) for r in rows[1:])
        cut[(attack, z)] = sum(r.get("cut", 0) for r in rows[1:])
    absent = accs[("num-examples:nan", 2.0)]
    assert accs[("evade:0.4", 2.0)] > absent - 0.03, accs
    assert rejected[("evade:0.4", 2.0)] == 0 and cut[("evade:0.4", 2.0)] == 3, (rejected, cut)  # every round
    assert cut[("num-examples:nan", 2.0)] == 0 and cut[("evade:0.4", 0.0)] == 0, cut
    downs = [r.message for r in caplog.records if "down-weighted update from" in r.message]
    assert len(downs) == 9 and sum("standard errors) at its claimed size" in m for m in downs) == 6, downs
    assert sum("the others not rescaled" in m for m in downs) == 3, downs  # lowkey's, by step 4
    assert accs[("evade:0.4", 0.0)] < 0.2 < 0.5 < absent, accs  # the attack is real
    assert cut[("lowkey:0.2", 2.0)] == 3 and accs[("lowkey:0.2", 2.0)] > absent - 0.03, (accs, cut)
    assert cut[("lowkey:0.2", 0.0)] == 0 and accs[("lowkey:0.2", 0.0)] < absent - 0.05, (accs, cut)  # real too
    # a free rider (an update of zero claiming the caps) is outsized by its claimed weight alone
    assert sum("its claimed weight" in m for m in downs) == 3, downs
    assert cut[("freeride:0.99", 2.0)] == 3 and accs[("freeride:0.99", 2.0)] > absent - 0.03, (accs, cut)
    assert accs[("freeride:0.99", 0.0)] < absent - 0.03, accs  # seed 0 is its mildest (−3.9; seeds 1-2 −28 and −34)


def test_a_junk_aggregates_few_huge_losses_do_not_hide_its_harm() -> None:
    """Per-example losses count logarithmically above LOSS_CAP nats: a junk update that makes a few examples cost
    10³ nats made the paired standard error so wide that its harm was not significant (BN CNN, evade 1 of 5: a mean
    loss of 56 vs 2.3 kept the liar's claim, and the run at chance, 0.103; now it is cut, 0.855 vs 0.872 absent).
    A hard cap lost the order of two junk trials (both at the cap: an adaptive site of 5 trained apart kept its
    claim and took wb to 0.099 on 3 of 3 seeds); the log keeps it."""
    from torch import nn

    from fedfuse.influence import influence_test
    from fedfuse.train import example_losses
    from fedfuse.trust import LOSS_CAP, TrustedReference

    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(3, 8, generator=gen)
    x = torch.randn(100, 8, generator=gen)
    x[3:, 7] = 0.0  # a feature only 3 of the server's examples have
    y = (x @ w_true.T).argmax(1)
    model = nn.Linear(8, 3, bias=False)
    sent = {"weight": torch.zeros(3, 8)}
    ref = TrustedReference(model, x, y, lambda *a: None)
    honest = [(0.3 * w_true + 0.1 * torch.randn(3, 8, generator=gen)).flatten() for _ in range(4)]
    junk = torch.zeros(3, 8)
    junk[:, 7] = torch.tensor([2000.0, -2000.0, 0.0])  # ~10³ nats on those 3 examples; elsewhere it only dilutes
    deltas, weights = [*honest, junk.flatten()], [10.0, 12.0, 9.0, 11.0, 100.0]

    def state(delta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": sent["weight"] + delta.reshape(3, 8)}

    capped = influence_test(deltas, weights, lambda d: ref.losses(state(d)), z=2.0)
    model.load_state_dict(state(junk.flatten()))
    raw = example_losses(model, x, y)
    squeezed = ref.losses(state(junk.flatten()))
    assert float(raw.max()) > 100 * LOSS_CAP
    assert float(squeezed.max()) == pytest.approx(LOSS_CAP + math.log1p(float(raw.max()) - LOSS_CAP))
    assert torch.equal(raw.argsort(stable=True), squeezed.argsort(stable=True))  # the order is kept
    assert torch.equal(raw[raw <= LOSS_CAP], squeezed[raw <= LOSS_CAP])  # and every loss below the cap
    assert float(ref.losses(state(2 * junk.flatten())).mean()) > float(squeezed.mean())  # junk trials keep their order

    def uncapped(d: torch.Tensor) -> torch.Tensor:
        model.load_state_dict(state(d))
        return example_losses(model, x, y)

    assert influence_test(deltas, weights, uncapped, z=2.0).weights[4] == 100.0  # the tail hides the harm
    assert capped.weights[4] < 10.0 and capped.weights[:4] == weights[:4]
