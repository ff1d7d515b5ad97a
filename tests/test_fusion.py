"""Fusion: exact recovery, limits, unequal widths, BatchNorm statistics, input validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedfuse.align import derive_spec, fuse, permute_model, repair, reset_bn_stats
from fedfuse.data import load_dataset
from fedfuse.errors import ConfigError
from fedfuse.models import MLP
from fedfuse.state import torch_threads
from fedfuse.train import evaluate, train
from tests.test_align_cases import CASES, make_case, max_state_diff, outputs


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["match", "wb", "gwb", "gw"])
def test_fusing_a_model_with_its_permuted_copy_gives_the_model(name: str, method: str) -> None:
    # Prepare
    model, x = make_case(name)
    spec = derive_spec(model, x[:2])
    permuted, _ = permute_model(model, spec, seed=11)
    # Execute
    fused = fuse([model, permuted], method=method, spec=spec)
    # Assert
    torch.testing.assert_close(outputs(model, fused, x), outputs(model, None, x), atol=1e-5, rtol=1e-5)


def test_plain_average_of_permuted_copies_breaks_the_function() -> None:
    # the control for the test above: without alignment the function changes
    model, x = make_case("mlp")
    permuted, _ = permute_model(model, derive_spec(model, x[:2]), seed=11)
    fused = fuse([model, permuted], method="average")
    assert float((outputs(model, fused, x) - outputs(model, None, x)).abs().max()) > 1e-2


@pytest.mark.parametrize("method", ["average", "match", "wb", "gwb"])
def test_weight_one_zero_gives_the_first_model(method: str) -> None:
    a, x = make_case("vgg_bn")
    b, _ = make_case("vgg_bn", seed=1)
    fused = fuse([a, b], weights=[1.0, 0.0], method=method, example_input=x[:2])
    assert max_state_diff(fused, a.state_dict()) < 1e-6


@pytest.mark.parametrize("method", ["wb", "gwb"])
def test_barycenter_of_one_model_is_that_model(method: str) -> None:
    model, x = make_case("resnet20_bn")
    fused = fuse([model], method=method, example_input=x[:2])
    assert max_state_diff(fused, model.state_dict()) < 1e-6


def test_wb_sinkhorn_of_permuted_copies_is_close_to_the_model() -> None:
    model, x = make_case("mlp")
    spec = derive_spec(model, x[:2])
    permuted, _ = permute_model(model, spec, seed=2)
    fused = fuse([model, permuted], method="wb", spec=spec, solver="sinkhorn", epsilon=1e-3)
    torch.testing.assert_close(outputs(model, fused, x), outputs(model, None, x), atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def digits_mlps() -> tuple[list[nn.Module], object]:
    data = load_dataset("digits")
    models = []
    for seed, width in enumerate((64, 96)):
        torch.manual_seed(seed)
        m = MLP(data.input_shape, data.num_classes, (width,))
        train(m, data.x_train, data.y_train, epochs=4, lr=0.05, momentum=0.9, seed=seed)
        models.append(m)
    return models, data


@pytest.mark.parametrize("method", ["wb", "wb_sinkhorn", "gwb"])
def test_unequal_widths_fuse_into_chosen_width(digits_mlps: tuple[list[nn.Module], object], method: str) -> None:
    # Prepare
    models, data = digits_mlps
    for m in models:
        assert evaluate(m, data.x_test, data.y_test)[1] > 0.85
    # Execute
    kwargs = {"solver": "sinkhorn", "epsilon": 0.01} if method == "wb_sinkhorn" else {}
    if method == "gwb":
        kwargs = {"max_iter": 5}
    fused = fuse(models, method=method.split("_")[0], target_width=80, example_input=data.x_test[:2], **kwargs)
    # Assert
    net = MLP(data.input_shape, data.num_classes, (80,))
    net.load_state_dict(fused)
    acc = evaluate(net, data.x_test, data.y_test)[1]
    assert acc > 0.5, acc


def test_reset_bn_stats_matches_batch_statistics() -> None:
    model, x = make_case("vgg_bn")
    reset_bn_stats(model, x)
    first_conv = model.features[0](x)
    torch.testing.assert_close(model.features[1].running_mean, first_conv.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert not model.training


@pytest.mark.parametrize("training", [False, True])
def test_reset_bn_stats_trains_only_batchnorm_and_restores_every_mode(training: bool) -> None:
    # Prepare: Dropout in front of a BatchNorm would corrupt the statistics if it ran in train mode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.BatchNorm1d(5), nn.Linear(5, 2)).train(training)
    model[1].eval()  # a module whose mode differs from the model's must keep it too
    x = torch.randn(64, 6)
    seen: list[bool] = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    # Execute
    reset_bn_stats(model, x, batch_size=64)
    # Assert: BN statistics of the Dropout-free features; every flag and the momentum restored
    assert seen == [False]
    torch.testing.assert_close(model[2].running_mean, model[0](x).mean(0), atol=1e-6, rtol=1e-6)
    assert [m.training for m in model] == [training, False, training, training] and model.training == training
    assert model[2].momentum == 0.1


def test_reset_bn_stats_restores_modes_on_error() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()
    with pytest.raises(RuntimeError):
        reset_bn_stats(model, torch.randn(8, 7))  # wrong input width
    assert not any(m.training for m in model.modules()) and model[1].momentum == 0.1


def test_repair_matches_interpolated_parent_statistics() -> None:
    # Prepare: two aligned parents and their plain average
    a, _ = make_case("vgg_bn")
    b, _ = make_case("vgg_bn", seed=1)
    x = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    fused = copy.deepcopy(a)
    fused.load_state_dict(fuse([a, b], method="average", bn_repair=None))
    # Execute
    repair(fused, [a, b], x, weights=[0.5, 0.5])

    # Assert: per-channel mean/std of the first BN output equal the parents' average
    def stats(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            h = m.eval().features[1](m.features[0](x))
        return h.mean((0, 2, 3)), h.std((0, 2, 3))

    (ma, sa), (mb, sb), (mf, sf) = stats(a), stats(b), stats(fused)
    torch.testing.assert_close(mf, (ma + mb) / 2, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(sf, (sa + sb) / 2, atol=2e-2, rtol=2e-2)


def test_fuse_resets_bn_stats_when_repair_data_given() -> None:
    a, x = make_case("vgg_bn")
    b, _ = make_case("vgg_bn", seed=1)
    fused = fuse([a, b], method="wb", example_input=x[:2], repair_data=x)
    net = copy.deepcopy(a)
    net.load_state_dict(fused)
    torch.testing.assert_close(
        fused["features.1.running_mean"], net.features[0](x).mean((0, 2, 3)), atol=1e-5, rtol=1e-5
    )
    fused_rep = fuse([a, b], method="match", example_input=x[:2], repair_data=x, bn_repair="repair")
    assert max_state_diff(fused_rep, fused) > 0


def test_repair_without_batch_norm_rescales_hidden_layers() -> None:
    a, _ = make_case("mlp")
    b, _ = make_case("mlp", seed=1)
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fused = copy.deepcopy(a)
    fused.load_state_dict(fuse([a, b], method="average"))
    repair(fused, [a, b], x)
    with torch.no_grad():
        h = [m.net[1](m.net[0](x)) for m in (a, b, fused)]
    torch.testing.assert_close(h[2].std(0), (h[0].std(0) + h[1].std(0)) / 2, atol=1e-4, rtol=1e-4)


def test_mismatched_architectures_are_rejected() -> None:
    a, b = MLP((4,), 2, (5, 5)), MLP((4,), 2, (5,))
    with pytest.raises(ConfigError, match=r"model 1 does not match model 0's architecture.*missing"):
        fuse([a, b])
    c = MLP((4,), 2, (5, 6))
    with pytest.raises(ConfigError, match=r"'net.3.weight': shape \(5, 5\) in model 0 vs \(6, 5\).*method='wb'"):
        fuse([a, c], method="average")
    d = MLP((3,), 2, (5, 5))  # different input size: an axis no group may change
    with pytest.raises(ConfigError, match=r"'net.1.weight'.*axis 1 which no hidden-unit group indexes"):
        fuse([a, d], method="wb", example_input=torch.randn(2, 4))


def test_nan_weights_are_rejected_by_name() -> None:
    a, b = MLP((4,), 2, (5,)), MLP((4,), 2, (5,))
    with torch.no_grad():
        b.net[1].bias[2] = float("nan")
    for method in ("average", "match", "wb", "gwb"):
        with pytest.raises(ConfigError, match=r"parameter 'net.1.bias' of model 1 contains NaN"):
            fuse([a, b], method=method, example_input=torch.randn(2, 4))


def test_bad_options_are_rejected() -> None:
    a = MLP((4,), 2, (5,))
    with pytest.raises(ConfigError, match="method='magic' is not supported"):
        fuse([a, a], method="magic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weights"):
        fuse([a, a], weights=[1.0, -1.0])
    with pytest.raises(ConfigError, match="spec="):
        fuse([a.state_dict(), a.state_dict()], method="wb")
    with pytest.raises(ConfigError, match="solver='lp' is not supported"):
        fuse([a, a], method="wb", solver="lp", example_input=torch.randn(2, 4))  # type: ignore[arg-type]


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_wb_models_aligned_in_parallel_equal_one_at_a_time(solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The WB step aligns the models to the barycenter on a few threads: the same bits as one after another."""
    from fedfuse.align import fusion

    # Prepare: four independently initialised models (many transports move, several WB iterations)
    models = [make_case("mlp", seed=s)[0] for s in range(4)]
    x = make_case("mlp", seed=0)[1]
    spec = derive_spec(models[0], x[:2])
    # Execute
    with torch_threads(2):
        fused, aligned = fuse(models, method="wb", spec=spec, solver=solver, return_aligned=True)
        monkeypatch.setattr(fusion, "WB_WORKERS", 1)
        fused1, aligned1 = fuse(models, method="wb", spec=spec, solver=solver, return_aligned=True)
    # Assert
    assert all(torch.equal(fused[k], fused1[k]) for k in fused)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(aligned, aligned1, strict=True) for k in a)
    assert max_state_diff(fused, models[0].state_dict()) > 0  # a real fusion, not a copy
