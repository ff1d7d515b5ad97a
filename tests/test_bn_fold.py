"""BN-aware fusion: folding BatchNorm into its producer for the alignment cost and the average (``bn_fold``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedfuse.align import derive_spec, fuse, permute_model
from fedfuse.align.bn import fold_bn, fold_pairs, unfold_bn
from fedfuse.errors import ConfigError
from tests.test_align_cases import make_case, outputs


def _n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("case", ["vgg_bn", "resnet20_bn"])
def test_fold_and_unfold_keep_the_eval_function(case: str) -> None:
    model, x = make_case(case)
    pairs = fold_pairs(model, x[:2])
    assert len(pairs) == _n_bn(model)  # every BN here reads a conv's output directly
    state = model.state_dict()
    folded = fold_bn(state, pairs)
    for _, bn, _ in pairs:
        assert torch.equal(folded[f"{bn}.weight"], torch.ones_like(state[f"{bn}.weight"]))
    torch.testing.assert_close(outputs(model, folded, x), outputs(model, None, x), atol=1e-4, rtol=1e-4)
    gen = torch.Generator().manual_seed(3)
    norm = {  # any BN parameters: the unfolded model must keep the folded function
        k: (torch.rand(v.shape, generator=gen) + 0.5) * (1 if "var" in k else torch.sign(torch.randn(v.shape)))
        for k, v in state.items()
        if k.endswith(("weight", "bias", "running_var"))
    }
    unfolded = unfold_bn(folded, pairs, norm)
    torch.testing.assert_close(outputs(model, unfolded, x), outputs(model, None, x), atol=1e-4, rtol=1e-4)
    for _, bn, _ in pairs:
        torch.testing.assert_close(unfolded[f"{bn}.weight"], norm[f"{bn}.weight"])
    # unfolding onto the model's own BN parameters gives back its state
    back = unfold_bn(folded, pairs, state)
    for k, v in state.items():
        torch.testing.assert_close(back[k].float(), v.float(), atol=1e-5, rtol=1e-5)


def _rescaled(model: nn.Module, pairs: list[tuple[str, str, float]], seed: int) -> nn.Module:
    """Same eval function, other raw parameters: unit c's conv row × s_c, its BN μ × s_c and σ² × s_c² (ε → 0)."""
    out = copy.deepcopy(model)
    state = out.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for prod, bn, _ in pairs:
        s = torch.exp(2 * torch.randn(state[f"{bn}.running_var"].shape, generator=gen))
        state[f"{prod}.weight"] *= s.view(-1, *([1] * (state[f"{prod}.weight"].dim() - 1)))
        state[f"{bn}.running_mean"] *= s
        state[f"{bn}.running_var"] *= s * s
    out.load_state_dict(state)
    for m in out.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 0.0
    return out.eval()


@pytest.mark.parametrize("method", ["match", "wb"])
def test_fused_rescaled_permuted_copies_compute_the_model_only_with_bn_fold(method: str) -> None:
    model, x = make_case("vgg_bn")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 0.0
    spec = derive_spec(model, x[:2])
    pairs = fold_pairs(model, x[:2])
    other, _ = permute_model(_rescaled(model, pairs, seed=1), spec, seed=2)
    torch.testing.assert_close(outputs(other, None, x), outputs(model, None, x), atol=1e-4, rtol=1e-4)
    want = _features(model, None, x)
    fused = fuse([model, other], method=method, spec=spec, template=model, bn_repair=None, bn_fold=True)
    torch.testing.assert_close(_features(model, fused, x), want, atol=1e-4, rtol=1e-4)
    raw = fuse([model, other], method=method, spec=spec, template=model, bn_repair=None)
    err = float((_features(model, raw, x) - want).abs().max() / want.abs().max())
    assert err > 0.02  # BN-blind: the raw scales are averaged, so the fused units compute something else


def _features(model: nn.Module, state: dict[str, torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
    net = copy.deepcopy(model)
    if state is not None:
        net.load_state_dict(state)
    with torch.no_grad():
        return net.eval().features(x)


def test_bn_fold_returns_aligned_parents_in_ordinary_bn_form() -> None:
    model, x = make_case("vgg_bn")
    spec = derive_spec(model, x[:2])
    permuted, _ = permute_model(model, spec, seed=5)
    fused, aligned = fuse(
        [model, permuted], [2, 1], method="match", spec=spec, template=model, bn_repair=None, bn_fold=True,
        return_aligned=True,
    )  # fmt: skip
    for state in (fused, *aligned):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(state[k].float(), v.float(), atol=1e-5, rtol=1e-5)


def test_bn_fold_without_a_module_is_one_clear_error() -> None:
    model, x = make_case("vgg_bn")
    spec = derive_spec(model, x[:2])
    with pytest.raises(ConfigError, match="bn_fold"):
        fuse([model.state_dict()] * 2, method="match", spec=spec, bn_fold=True)


def test_bn_fold_is_a_no_op_without_batch_norm() -> None:
    model, x = make_case("mlp")
    other, _ = make_case("mlp", seed=1)
    a = fuse([model, other], method="match", bn_fold=True)
    b = fuse([model, other], method="match")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls_name", ["FedMatch", "FedWB"])
def test_fusion_strategies_expose_bn_fold(cls_name: str) -> None:
    import strategies.fusion as fusion

    model, x = make_case("vgg_bn")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 0.0
    spec = derive_spec(model, x[:2])
    other, _ = permute_model(_rescaled(model, fold_pairs(model, x[:2]), seed=4), spec, seed=6)
    states = [model.state_dict(), other.state_dict()]
    cls = getattr(fusion, cls_name)
    assert "bn-fold" in {o.name for o in cls.options}
    folded = cls(model=model, example_input=x, bn_fold=True).aggregate_arrays(1, states, [2.0, 1.0])
    torch.testing.assert_close(_features(model, folded, x), _features(model, None, x), atol=1e-4, rtol=1e-4)
    raw = cls(model=model, example_input=x).aggregate_arrays(1, states, [2.0, 1.0])
    assert float((_features(model, raw, x) - _features(model, None, x)).abs().max()) > 1e-3
