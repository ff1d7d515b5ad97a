"""Solvers: exact recovery of hidden permutations, OT limits, rectangular transports."""

from __future__ import annotations

import pytest
import torch

from fedfuse import state as state_mod
from fedfuse.align import (
    activation_matching,
    align,
    apply_transport,
    derive_spec,
    fuse,
    ot_coupling,
    ot_transport,
    permute_model,
    solvers,
    terms,
    weight_matching,
)
from fedfuse.align.fusion import init_barycenter
from fedfuse.errors import ConfigError
from fedfuse.models import MLP, VGG
from fedfuse.state import torch_threads, weighted_average
from tests.test_align_cases import CASES, make_case, max_state_diff, outputs


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("solver", ["weight_matching", "ot_emd"])
def test_solver_recovers_identity_from_permuted_copy(name: str, solver: str) -> None:
    # Prepare
    model, x = make_case(name)
    spec = derive_spec(model, x[:2])
    permuted, _ = permute_model(model, spec, seed=5)
    # Execute
    if solver == "weight_matching":
        transports = weight_matching(model, permuted, spec)
    else:
        transports = ot_transport(model, permuted, spec, solver="emd")
    restored = apply_transport(permuted, spec, transports)
    # Assert
    assert max_state_diff(restored, model.state_dict()) < 1e-6


def test_activation_matching_recovers_mlp_permutation() -> None:
    model, _ = make_case("mlp")
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    spec = derive_spec(model, x[:2])
    permuted, _ = permute_model(model, spec, seed=2)
    restored = apply_transport(permuted, spec, activation_matching(model, permuted, spec, x))
    assert max_state_diff(restored, model.state_dict()) < 1e-6


def test_activation_matching_falls_back_to_weights_for_hidden_rnn_layers() -> None:
    model, x = make_case("lstm2")
    spec = derive_spec(model, x[:2])
    assert not spec["rnn.l0"].sites  # inner LSTM layer: not observable in the fx graph
    permuted, _ = permute_model(model, spec, seed=2)
    restored = apply_transport(permuted, spec, activation_matching(model, permuted, spec, torch.randn(64, 1, 8, 8)))
    assert max_state_diff(restored, model.state_dict()) < 1e-6


def test_align_returns_module_with_b_function_in_a_order() -> None:
    model, x = make_case("vgg_bn")
    other, _ = make_case("vgg_bn", seed=1)
    aligned = align(model, other, method="ot", example_input=x, as_module=True)
    torch.testing.assert_close(outputs(aligned, None, x), outputs(other, None, x), atol=1e-5, rtol=1e-5)
    assert max_state_diff(aligned.state_dict(), other.state_dict()) > 1e-3  # re-ordered, not a copy


def test_sinkhorn_coupling_tends_to_exact_as_epsilon_vanishes() -> None:
    # Prepare: a cost whose optimal assignment (a planted permutation) wins by a margin
    gen = torch.Generator().manual_seed(0)
    planted = torch.eye(12, dtype=torch.float64)[torch.randperm(12, generator=gen)]
    cost = 0.5 * torch.rand(12, 12, generator=gen, dtype=torch.float64) + (1 - planted)
    exact = ot_coupling(cost, "emd")
    torch.testing.assert_close(exact, planted.float())
    # Execute
    dists = [float((ot_coupling(cost, "sinkhorn", eps) - exact).abs().sum()) for eps in (1.0, 0.1, 0.01, 0.001)]
    # Assert: monotone convergence to the exact permutation
    assert all(a >= b - 1e-9 for a, b in zip(dists, dists[1:], strict=False)), dists
    assert dists[0] > 1.0 and dists[-1] < 1e-3, dists


def test_sinkhorn_layerwise_transport_approaches_emd() -> None:
    a, x = make_case("mlp")
    spec = derive_spec(a, x[:2])
    b, _ = permute_model(a, spec, seed=4)
    with torch.no_grad():  # a noisy permuted copy: a unique optimum with a margin
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    exact = ot_transport(a, b, spec, solver="emd")
    gaps = []
    for eps in (0.5, 0.05, 0.0005):
        soft = ot_transport(a, b, spec, solver="sinkhorn", epsilon=eps)
        gaps.append(sum(float((soft[g] - exact[g]).abs().sum()) for g in exact))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2, gaps


def test_rectangular_transport_maps_onto_target_width() -> None:
    a, b = MLP((1, 8, 8), 10, (12, 8)), MLP((1, 8, 8), 10, (20, 6))
    spec = derive_spec(a, torch.randn(2, 1, 8, 8))
    t = ot_transport(a, b, spec)
    assert t["net.1"].shape == (12, 20) and t["net.3"].shape == (8, 6)
    for m in t.values():
        torch.testing.assert_close(m.sum(1), torch.ones(m.shape[0]))
    state = apply_transport(b, spec, t)
    a.load_state_dict(state)  # loads into the target width


@pytest.mark.parametrize("name", ["mlp", "vgg_bn"])
def test_growing_a_model_by_splitting_neurons_keeps_the_function(name: str) -> None:
    # Prepare
    model, x = make_case(name)
    spec = derive_spec(model, x[:2])
    wider = {g: int(n * 1.5) + 1 for g, n in spec.sizes.items()}
    # Execute
    state, transports = init_barycenter(model.state_dict(), spec, wider)
    # Assert
    if name == "mlp":
        big = MLP((1, 8, 8), 10, (wider["net.1"], wider["net.3"]))
    else:
        big = VGG(
            (1, 8, 8),
            10,
            (wider["features.0"], "M", wider["features.4"], "M"),
            batch_norm=True,
            hidden=wider["classifier.1"],
        )
    assert all(transports[g].shape == (wider[g], n) for g, n in spec.sizes.items())
    torch.testing.assert_close(outputs(big, state, x), outputs(model, None, x), atol=1e-5, rtol=1e-5)


def test_weight_matching_rejects_unequal_widths() -> None:
    a, b = MLP((4,), 2, (5,)), MLP((4,), 2, (6,))
    with pytest.raises(ConfigError, match="equal widths"):
        weight_matching(a, b, example_input=torch.randn(2, 4))


@pytest.mark.parametrize("path", ["identity", "greedy", "low_rank_always", "float32_rows", "nothing_cached"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_weight_matching_equals_plain_coordinate_descent(
    name: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two independently initialised models (no planted permutation: many sweeps, many moves)
    if path == "low_rank_always":  # every term update after the first build is a low-rank correction
        monkeypatch.setattr(terms, "_LOW_RANK_MIN_MACS", 0)
        monkeypatch.setattr(terms, "_LOW_RANK_FRACTION", 1.0)
    elif path == "float32_rows":  # rows kept in float32 and converted when used (the large-model path)
        monkeypatch.setattr(terms, "_ROWS_DOUBLE_BYTES_MAX", 0)
    elif path == "nothing_cached":  # over the cache budget: every term rebuilt when used (the huge-model path)
        monkeypatch.setattr(terms, "_CACHE_BYTES_MAX", 0)
    a, x = make_case(name, seed=0)
    b, _ = make_case(name, seed=1)
    spec = derive_spec(a, x[:2])
    spec_a = spec.for_state(a.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    start = "identity" if path == "identity" else "greedy"
    init = None if start == "identity" else weight_matching(a, b, spec, max_iter=0)  # the greedy start alone
    # Execute
    fast, fast_sweeps = weight_matching(a, b, spec, max_iter=30, seed=3, return_iterations=True, start=start)
    plain, plain_sweeps = solvers._weight_matching_reference(sa, sb, spec_a, spec_a, 30, 3, init, (), True)
    # Assert
    assert fast_sweeps == plain_sweeps
    assert fast.keys() == plain.keys()
    for g in plain:
        assert torch.equal(fast[g], plain[g]), g
    assert any(not torch.equal(p, torch.eye(p.shape[0])) for p in fast.values())  # something was matched


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_start_alone_recovers_a_permuted_copy(name: str) -> None:
    model, x = make_case(name)
    spec = derive_spec(model, x[:2])
    permuted, _ = permute_model(model, spec, seed=5)
    perms, sweeps = weight_matching(model, permuted, spec, return_iterations=True)
    assert sweeps == 1  # the start is already a fixed point
    assert max_state_diff(apply_transport(permuted, spec, perms), model.state_dict()) < 1e-6


def test_weight_matching_rejects_unknown_start() -> None:
    model, x = make_case("mlp")
    with pytest.raises(ConfigError, match="start='random'"):
        weight_matching(model, model, example_input=x, start="random")  # type: ignore[arg-type]


def test_match_fusion_equals_the_average_of_plainly_matched_models() -> None:
    # Prepare
    models = [make_case("resnet20_bn", seed=s)[0] for s in range(3)]
    spec = derive_spec(models[0], make_case("resnet20_bn")[1][:2])
    sa = models[0].state_dict()
    spec_a = spec.for_state(sa)
    # Execute
    fused = fuse(models, method="match", spec=spec)
    # Assert: model 0 is the reference; the others matched by the plain loop from the same (greedy) start
    aligned = [sa]
    for m in models[1:]:
        init = weight_matching(models[0], m, spec, max_iter=0)
        perms = solvers._weight_matching_reference(sa, m.state_dict(), spec_a, spec_a, 100, 0, init, (), False)
        aligned.append(apply_transport(m, spec, perms))
    plain = weighted_average(aligned)
    assert all(torch.equal(fused[k], plain[k]) for k in plain)


@pytest.mark.parametrize("name", ["vgg_bn", "resnet20_bn"])
def test_wb_fusion_equals_the_plain_loop_of_pairwise_ot_transports(name: str) -> None:
    # Prepare: three independent models; the plain WB loop written with the public per-pair ot_transport
    models = [make_case(name, seed=s)[0] for s in range(3)]
    spec = derive_spec(models[0], make_case(name)[1][:2])
    states = [m.state_dict() for m in models]
    bary, transports = {k: v.clone() for k, v in states[0].items()}, [None] * 3
    for _ in range(10):
        aligned = []
        for i, s in enumerate(states):
            transports[i] = ot_transport(bary, s, spec, init=transports[i], sweeps=1)
            aligned.append(apply_transport(s, spec, transports[i]))
        new = weighted_average(aligned)
        num = sum(float(((new[k].double() - bary[k].double()) ** 2).sum()) for k in new if new[k].is_floating_point())
        den = sum(float((bary[k].double() ** 2).sum()) for k in new if new[k].is_floating_point())
        bary = new
        if (num / den) ** 0.5 < 1e-4:
            break
    # Execute
    fused = fuse(models, method="wb", spec=spec)
    # Assert: bit for bit (the fused loop shares the barycenter's rows across models, nothing else)
    assert fused.keys() == bary.keys()
    assert all(torch.equal(fused[k], bary[k]) for k in bary)
    assert max_state_diff(fused, states[0]) > 1e-3  # an actual fusion, not the reference copy


@pytest.mark.parametrize("method", ["match", "wb"])
def test_fusion_on_the_callers_threads_equals_one_thread(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: three independent models; every cost product large enough for the caller's threads
    models = [make_case("resnet20_bn", seed=s)[0] for s in range(3)]
    spec = derive_spec(models[0], make_case("resnet20_bn")[1][:2])
    monkeypatch.setattr(state_mod, "GEMM_THREADS_MIN_MACS", 1)
    # Execute
    with torch_threads(1):
        one = fuse(models, method=method, spec=spec)
    with torch_threads(2):
        two = fuse(models, method=method, spec=spec)
    # Assert: the thread count of the products changes no assignment (and, for these shapes, no bit)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert max_state_diff(one, models[0].state_dict()) > 1e-3


def test_a_model_scaled_beyond_float32_still_aligns_and_a_non_finite_cost_is_one_error() -> None:
    """Squared distances of features near 1e30 overflow float32 (the cost used to turn inf − inf = NaN, and POT only
    warned "problem infeasible" and returned a plan of zeros): they are recomputed in float64, where a ×1e30 copy of
    a model's shuffled units is matched back to the permutation. A cost that is non-finite anyway is one ConfigError
    naming the count of bad entries."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen)
    perm = torch.randperm(6, generator=gen)
    cost = solvers.pairwise_sq_dist(x * 1e30, x[perm] * 1e30)
    assert bool(torch.isfinite(cost).all())
    plan = solvers.ot_plan(cost)
    assert [int(j) for j in plan.argmax(1)] == [int((perm == i).nonzero()) for i in range(6)]
    bad = cost.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="the alignment cost has 1 non-finite entries of 36"):
        solvers.ot_plan(bad)
