"""Tests for fedfuse.lmc: barriers along linear paths, layer-wise/cumulative barriers, BN reset, plots."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict

import pytest
import torch
from torch import nn

from fedfuse import lmc
from fedfuse.align.bn import reset_bn_stats
from fedfuse.data import load_dataset
from fedfuse.errors import ConfigError
from fedfuse.models import VGG, build_model
from fedfuse.train import evaluate, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _trained_mlp(ds, seed: int, epochs: int = 3) -> nn.Module:
    model = build_model("mlp", ds.input_shape, ds.num_classes, width=64, depth=2, seed=seed)
    train(model, ds.x_train, ds.y_train, epochs=epochs, lr=0.05, momentum=0.9, seed=seed)
    return model


@pytest.fixture(scope="module")
def mlp_pair(digits):
    """Two MLPs trained on digits from different seeds (distinct basins: a positive full barrier)."""
    return _trained_mlp(digits, 0), _trained_mlp(digits, 1)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _permute_hidden(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Permute both hidden layers of MLP(widths=(64, 64)): same function, different weights."""
    g = torch.Generator().manual_seed(seed)
    s = {k: v.clone() for k, v in state.items()}
    for layer, nxt in (("net.1", "net.3"), ("net.3", "net.5")):
        p = torch.randperm(s[f"{layer}.bias"].numel(), generator=g)
        s[f"{layer}.weight"], s[f"{layer}.bias"] = s[f"{layer}.weight"][p], s[f"{layer}.bias"][p]
        s[f"{nxt}.weight"] = s[f"{nxt}.weight"][:, p]
    return s


# ----------------------------------------------------------------------------- interpolate / curve


def test_interpolate_endpoints_subset_and_integer_buffers():
    a = {"w": torch.zeros(3), "v": torch.ones(2), "n": torch.tensor(5)}
    b = {"w": torch.full((3,), 2.0), "v": torch.full((2,), 3.0), "n": torch.tensor(9)}
    mid = lmc.interpolate(a, b, 0.25)
    assert torch.equal(mid["w"], torch.full((3,), 0.5)) and torch.equal(mid["v"], torch.full((2,), 1.5))
    assert int(mid["n"]) == 5  # integer buffers come from A
    only_w = lmc.interpolate(a, b, 1.0, keys=["w"])
    assert torch.equal(only_w["w"], b["w"]) and torch.equal(only_w["v"], a["v"])
    with pytest.raises(ConfigError):
        lmc.interpolate(a, {"w": torch.zeros(3)}, 0.5)
    with pytest.raises(ConfigError):
        lmc.interpolate(a, b, 0.5, keys=["nope"])


def test_model_against_itself_has_zero_barrier(digits, mlp_pair):
    model = mlp_pair[0]
    state = _state(model)
    curve = lmc.interpolation_curve(model, state, state, digits.x_test, digits.y_test, num_points=6)
    assert 0.5 in curve.alphas and curve.alphas[0] == 0.0 and curve.alphas[-1] == 1.0  # ½ added to an even grid
    loss, acc = evaluate(model, digits.x_test, digits.y_test)
    assert curve.losses == pytest.approx([loss] * len(curve.alphas), abs=1e-7)
    assert curve.accuracies == pytest.approx([acc] * len(curve.alphas), abs=1e-12)
    for metric in ("loss", "error"):
        assert lmc.max_barrier(curve, metric) == pytest.approx(0.0, abs=1e-7)
        assert lmc.midpoint_barrier(curve, metric) == pytest.approx(0.0, abs=1e-7)


def test_barrier_formulas_on_a_handmade_curve():
    curve = lmc.Curve(alphas=[0.0, 0.25, 0.5, 1.0], losses=[1.0, 3.0, 2.5, 2.0], accuracies=[0.9, 0.5, 0.6, 0.7])
    # linear reference at 0.25: 1.25 -> excess 1.75; at 0.5: 1.5 -> 1.0
    assert lmc.max_barrier(curve, "loss") == pytest.approx(1.75)
    assert lmc.midpoint_barrier(curve, "loss") == pytest.approx(1.0)
    # errors 0.1, 0.5, 0.4, 0.3: reference 0.15 at 0.25 -> 0.35; at 0.5: 0.2 -> 0.2
    assert lmc.max_barrier(curve, "error") == pytest.approx(0.35)
    assert lmc.midpoint_barrier(curve, "error") == pytest.approx(0.2)
    with pytest.raises(ConfigError):
        lmc.midpoint_barrier(lmc.Curve([0.0, 1.0], [1.0, 1.0], [1.0, 1.0]))
    with pytest.raises(ConfigError):
        lmc.max_barrier(curve, "accuracy")  # type: ignore[arg-type]


def test_convex_logistic_regression_has_no_loss_barrier():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = torch.arange(3).repeat_interleave(100)
    x = centres[y] + 0.5 * torch.randn(len(y), 2, generator=g)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Linear(2, 3)
        with torch.no_grad():
            model.weight.mul_(10.0)  # far-apart initialisations -> two genuinely different solutions
        train(model, x, y, epochs=5, lr=0.1, seed=seed)
        states.append(_state(model))
    assert (states[0]["weight"] - states[1]["weight"]).norm() > 1.0
    curve = lmc.interpolation_curve(nn.Linear(2, 3), states[0], states[1], x, y, num_points=21)
    # cross-entropy is convex in the weights: the loss never rises above the chord
    assert lmc.max_barrier(curve, "loss") <= 1e-6
    assert lmc.midpoint_barrier(curve, "loss") <= 1e-6
    assert max(curve.losses) > min(curve.losses) + 1e-4  # the path is not trivially flat


# ----------------------------------------------------------------------------- permutations and alignment


def test_permuted_copy_has_a_barrier_that_alignment_removes(digits, mlp_pair):
    model = mlp_pair[0]
    state_a = _state(model)
    state_b = _permute_hidden(state_a, seed=3)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(state_b)
    assert evaluate(permuted, digits.x_test, digits.y_test) == pytest.approx(
        evaluate(model, digits.x_test, digits.y_test), abs=1e-5
    )  # same function
    result = lmc.barrier(model, state_a, state_b, digits.x_test, digits.y_test)
    assert result["after"] is None and result["align_method"] is None
    assert result["before"]["max_loss"] > 0.3
    assert result["before"]["max_loss"] >= result["before"]["mid_loss"] - 1e-12
    json.dumps(result)

    engine = pytest.importorskip("fedfuse.align")
    if not hasattr(engine, "align"):
        pytest.skip("fedfuse.align has no align() yet")
    aligned = lmc.barrier(model, state_a, state_b, digits.x_test, digits.y_test, align=True, align_method="weight")
    assert aligned["before"]["max_loss"] == pytest.approx(result["before"]["max_loss"])
    assert aligned["align_method"] == "weight"
    assert abs(aligned["after"]["max_loss"]) < 1e-3
    assert abs(aligned["after"]["mid_error"]) < 1e-3
    json.dumps(aligned)


# ----------------------------------------------------------------------------- layer groups


def test_layer_groups_default_pairs_batchnorm_with_preceding_conv():
    model = VGG((1, 8, 8), 10, cfg=(4, "M", 8), batch_norm=True, hidden=16)
    groups = lmc.layer_groups(model)
    assert list(groups) == ["features.0", "features.4", "classifier.1", "classifier.3"]
    assert groups["features.0"] == [
        "features.0.weight",
        "features.1.weight",
        "features.1.bias",
        "features.1.running_mean",
        "features.1.running_var",
        "features.1.num_batches_tracked",
    ]
    assert sorted(k for ks in groups.values() for k in ks) == sorted(model.state_dict())


def test_layer_groups_from_patterns():
    model = build_model("mlp", (1, 8, 8), 10, width=8, depth=2)
    groups = lmc.layer_groups(model, {"hidden": ["net.1.*", "net.3.*"], "head": "net.5.*"})
    assert groups == {
        "hidden": ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"],
        "head": ["net.5.weight", "net.5.bias"],
    }
    assert lmc.layer_groups(model, ["*.bias"]) == {"*.bias": ["net.1.bias", "net.3.bias", "net.5.bias"]}
    with pytest.raises(ConfigError):
        lmc.layer_groups(model, ["conv*"])


def test_layerwise_barrier_matches_hand_computation(digits, mlp_pair):
    model_a, model_b = mlp_pair
    sa, sb = _state(model_a), _state(model_b)
    x, y = digits.x_test, digits.y_test
    result = lmc.layerwise_barriers(model_a, sa, sb, x, y, num_points=5)
    assert [g.group for g in result.groups] == ["net.1", "net.3", "net.5"]
    row = next(g for g in result.groups if g.group == "net.3")
    assert row.keys == ["net.3.weight", "net.3.bias"]

    loss_a, acc_a = evaluate(model_a, x, y)
    loss_b, acc_b = evaluate(model_b, x, y)

    def hand(base: dict[str, torch.Tensor]) -> tuple[float, float, float, float]:
        """Interpolate net.3 only, the rest from ``base``; reference line between the full models A and B."""
        alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
        losses, errors = [], []
        probe = copy.deepcopy(model_a)
        for a in alphas:
            s = {k: v.clone() for k, v in base.items()}
            for k in ("net.3.weight", "net.3.bias"):
                s[k] = (1 - a) * sa[k] + a * sb[k]
            probe.load_state_dict(s)
            loss, acc = evaluate(probe, x, y)
            losses.append(loss)
            errors.append(1 - acc)

        def maxb(v: list[float], va: float, vb: float) -> float:
            return max(v[i] - ((1 - a) * va + a * vb) for i, a in enumerate(alphas))

        def midb(v: list[float], va: float, vb: float) -> float:
            return v[2] - 0.5 * (va + vb)

        ea, eb = 1 - acc_a, 1 - acc_b
        return maxb(losses, loss_a, loss_b), maxb(errors, ea, eb), midb(losses, loss_a, loss_b), midb(errors, ea, eb)

    for stats, base in ((row.base_a, sa), (row.base_b, sb)):
        ml, me, dl, de = hand(base)
        assert stats.max_loss == pytest.approx(ml, abs=1e-5)
        assert stats.max_error == pytest.approx(me, abs=1e-9)
        assert stats.mid_loss == pytest.approx(dl, abs=1e-5)
        assert stats.mid_error == pytest.approx(de, abs=1e-9)
    assert row.base_a != row.base_b  # the two bases are genuinely different paths
    # the public curve of a partial path carries the full models' values as its reference line
    curve = lmc.interpolation_curve(model_a, sa, sb, x, y, num_points=5, keys=row.keys)
    assert (curve.loss_a, curve.loss_b) == pytest.approx((loss_a, loss_b), abs=1e-6)
    assert lmc.barrier_stats(curve) == row.base_a
    json.dumps(asdict(result))


@pytest.mark.parametrize("order", ["shallow", "deep", "random"])
def test_cumulative_last_step_equals_full_barrier(digits, mlp_pair, order):
    model_a, model_b = mlp_pair
    sa, sb = _state(model_a), _state(model_b)
    x, y = digits.x_test, digits.y_test
    result = lmc.cumulative_barriers(model_a, sa, sb, x, y, order=order, seed=1, num_points=5)
    names = [s.added for s in result.steps]
    assert sorted(names) == ["net.1", "net.3", "net.5"]
    if order == "shallow":
        assert names == ["net.1", "net.3", "net.5"]
    if order == "deep":
        assert names == ["net.5", "net.3", "net.1"]
    assert result.steps[-1].groups == names
    full = lmc.barrier(model_a, sa, sb, x, y, num_points=5)["before"]
    assert full["max_loss"] > 0.01  # otherwise the comparison below would be vacuous
    last = result.steps[-1].stats
    for key in ("max_loss", "max_error", "mid_loss", "mid_error"):
        assert getattr(last, key) == pytest.approx(full[key], abs=1e-9)
        assert getattr(result.full, key) == pytest.approx(full[key], abs=1e-9)
    json.dumps(asdict(result))


def test_random_order_is_seeded():
    model = build_model("mlp", (1, 8, 8), 10, width=8, depth=6)
    s = _state(model)
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)
    orders = [
        [st.added for st in lmc.cumulative_barriers(model, s, s, x, y, order="random", seed=k, num_points=2).steps]
        for k in (5, 5, 6)
    ]
    assert orders[0] == orders[1] != orders[2]
    with pytest.raises(ConfigError):
        lmc.cumulative_barriers(model, s, s, x, y, order="middle")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- multi-model barrier


def test_multi_model_barrier_of_identical_models_is_zero(digits, mlp_pair):
    model = mlp_pair[0]
    s = _state(model)
    r = lmc.multi_model_barrier(model, [s, s, s, s], digits.x_test, digits.y_test, weights=[1, 2, 3, 4])
    assert r.loss_barrier == pytest.approx(0.0, abs=1e-7) and r.error_barrier == pytest.approx(0.0, abs=1e-12)
    assert r.weights == pytest.approx([0.1, 0.2, 0.3, 0.4])
    json.dumps(asdict(r))


def test_multi_model_barrier_of_two_models_is_the_midpoint_barrier(digits, mlp_pair):
    sa, sb = _state(mlp_pair[0]), _state(mlp_pair[1])
    x, y = digits.x_test, digits.y_test
    r = lmc.multi_model_barrier(mlp_pair[0], [sa, sb], x, y)
    full = lmc.barrier(mlp_pair[0], sa, sb, x, y, num_points=3)["before"]
    assert r.loss_barrier == pytest.approx(full["mid_loss"], abs=1e-5)
    assert r.error_barrier == pytest.approx(full["mid_error"], abs=1e-9)
    assert r.loss_barrier > 0.01
    with pytest.raises(ConfigError):
        lmc.multi_model_barrier(mlp_pair[0], [sa, sb], x, y, weights=[1.0])


# ----------------------------------------------------------------------------- batch norm


def test_bn_reset_at_each_alpha_on_vgg(digits):
    x, y = digits.x_train[:320], digits.y_train[:320]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = VGG(digits.input_shape, digits.num_classes, cfg=(8, "M", 16), batch_norm=True, hidden=32)
        train(m, x, y, epochs=1, lr=0.05, momentum=0.9, seed=seed)
        models.append(m)
    sa, sb = _state(models[0]), _state(models[1])
    template = models[0]
    before = _state(template)
    xt, yt = digits.x_test, digits.y_test
    reset = lmc.interpolation_curve(template, sa, sb, xt, yt, num_points=3, bn_reset_data=x)
    plain = lmc.interpolation_curve(template, sa, sb, xt, yt, num_points=3)
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())  # template untouched
    assert all(math.isfinite(v) for v in reset.losses)

    # α = ½ by hand: interpolate, reset BN statistics with a cumulative average, evaluate
    probe = copy.deepcopy(template)
    probe.load_state_dict(lmc.interpolate(sa, sb, 0.5))
    for mod in probe.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    probe.train()
    with torch.no_grad():
        for start in range(0, len(x), 256):
            probe(x[start : start + 256])
    loss, acc = evaluate(probe, xt, yt)
    assert reset.losses[1] == pytest.approx(loss, abs=1e-5)
    assert reset.accuracies[1] == pytest.approx(acc)
    assert reset.losses[1] != pytest.approx(plain.losses[1], abs=1e-4)  # the reset changes the midpoint
    bn = next(m for m in probe.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.momentum is None
    work = copy.deepcopy(template).eval()  # the LMC curves reset BN statistics with the rest of the model in eval
    reset_bn_stats(work, x, batch_size=256)
    assert all(m.momentum == 0.1 for m in work.modules() if isinstance(m, nn.BatchNorm2d))  # restored
    assert not work.training


# ----------------------------------------------------------------------------- plots


def test_plots_write_files(tmp_path, digits, mlp_pair):
    model = build_model("mlp", digits.input_shape, digits.num_classes, width=8, depth=1, seed=0)
    other = build_model("mlp", digits.input_shape, digits.num_classes, width=8, depth=1, seed=1)
    sa, sb = _state(model), _state(other)
    x, y = digits.x_test[:100], digits.y_test[:100]
    curve = lmc.interpolation_curve(model, sa, sb, x, y, num_points=3)
    layerwise = lmc.layerwise_barriers(model, sa, sb, x, y, num_points=3)
    cumulative = {o: lmc.cumulative_barriers(model, sa, sb, x, y, order=o, num_points=3) for o in ("shallow", "deep")}
    paths = [
        lmc.plot_curve({"A→B": curve, "as dict": asdict(curve)}, tmp_path / "curve.png"),
        lmc.plot_layerwise(asdict(layerwise), tmp_path / "layerwise.png", metric="error"),
        lmc.plot_cumulative(cumulative, tmp_path / "cumulative.png"),
    ]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
