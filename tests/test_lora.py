"""LoRA adapters and their aggregation (fedfuse.lora): exactness, the factor-averaging gap, rank alignment,
rank heterogeneity and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.lora import (
    adapter_pairs,
    aggregation_error,
    aligned_lora,
    exact_lora,
    fedavg_lora,
    flora_stack,
    hetlora_pad,
    inject_lora,
    inject_peft,
    mean_products,
    mean_update,
    svd_lora,
    truncate_rank,
)
from fedfuse.lora.layers import layer_scales


def _states(ranks, out=12, inp=10, seed=0, conv=False):
    g = torch.Generator().manual_seed(seed)
    states = []
    for r in ranks:
        a_shape = (r, inp, 3, 3) if conv else (r, inp)
        b_shape = (out, r, 1, 1) if conv else (out, r)
        states.append({
            "l.lora_A": torch.randn(a_shape, generator=g), "l.lora_B": torch.randn(b_shape, generator=g),
            "l.bias": torch.randn(out, generator=g),
        })  # fmt: skip
    return states


def _product(state, alpha=None):
    a, b = state["l.lora_A"].double(), state["l.lora_B"].double()
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])
    return (1.0 if alpha is None else alpha / a.shape[0]) * b @ a


@pytest.mark.parametrize("conv", [False, True])
def test_exact_and_flora_reproduce_the_mean_product(conv):
    states, w = _states([2, 2, 2], conv=conv), [1.0, 2.0, 3.0]
    target = mean_products(states, w, alpha=4.0)["l"]
    agg, res = exact_lora(states, w, rank=6, alpha=4.0)  # rank(M) <= 6: no residual needed
    assert torch.allclose(_product(agg, 4.0), target, atol=1e-6)
    assert float(res["l"].norm()) < 1e-6
    assert agg["l.lora_A"].shape[0] == 6 and agg["l.lora_B"].shape == ((12, 6, 1, 1) if conv else (12, 6))
    stacked = flora_stack(_states([1, 2, 3], conv=conv), w, alpha=4.0)
    assert torch.allclose(_product(stacked), mean_products(_states([1, 2, 3], conv=conv), w, 4.0)["l"], atol=1e-6)
    assert stacked["l.lora_A"].shape[0] == 6
    gap = aggregation_error(_states([1, 2, 3], conv=conv), w, stacked, 4.0, out_scale=1.0)["l"]
    assert gap < 1e-6 * float(mean_products(_states([1, 2, 3], conv=conv), w, 4.0)["l"].norm())  # float32 factors
    mean_bias = sum(x * s["l.bias"].double() for x, s in zip([1 / 6, 2 / 6, 3 / 6], states, strict=True))
    assert torch.allclose(agg["l.bias"].double(), mean_bias)


def test_exact_at_a_lower_rank_keeps_the_update_through_the_residual():
    states, w = _states([3, 3, 3]), [1.0, 1.0, 1.0]
    agg, res = exact_lora(states, w, rank=3)
    errors = aggregation_error(states, w, agg)
    assert errors["l"] > 1e-3  # rank 3 cannot hold the rank-9 mean: the adapters alone are inexact
    assert aggregation_error(states, w, agg, residuals=res)["l"] < 1e-6  # with the residual folded: exact
    # the truncated SVD is the best rank-3 approximation: no worse than averaging the factors apart
    assert errors["l"] <= aggregation_error(states, w, fedavg_lora(states, w))["l"] + 1e-9
    assert torch.equal(svd_lora(states, w, rank=3)["l.lora_A"], agg["l.lora_A"])


def test_fedavg_lora_is_inexact_on_random_factors():
    states, w = _states([4, 4]), [1.0, 1.0]
    agg = fedavg_lora(states, w)
    assert torch.allclose(agg["l.lora_A"], (states[0]["l.lora_A"] + states[1]["l.lora_A"]) / 2)
    assert aggregation_error(states, w, agg)["l"] > 1.0


def test_aligned_recovers_permuted_and_sign_flipped_copies():
    g = torch.Generator().manual_seed(1)
    base = _states([5])[0]
    states = []
    for _ in range(4):
        perm, sign = torch.randperm(5, generator=g), torch.where(torch.rand(5, generator=g) < 0.5, -1.0, 1.0)
        noisy = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        states.append({
            "l.lora_A": noisy["l.lora_A"][perm] * sign[:, None], "l.lora_B": noisy["l.lora_B"][:, perm] * sign,
            "l.bias": noisy["l.bias"],
        })  # fmt: skip
    w = [1.0, 1.0, 1.0, 1.0]
    plain = aggregation_error(states, w, fedavg_lora(states, w))["l"]
    aligned = aggregation_error(states, w, aligned_lora(states, w))["l"]
    assert aligned <= plain
    assert aligned < 0.05 * plain  # the symmetry undone: only the noise is left
    # matched to a given reference (the global adapters the clients started from): the same recovery
    assert aggregation_error(states, w, aligned_lora(states, w, reference=base))["l"] < 0.05 * plain


def test_hetlora_pads_and_truncate_keeps_the_update():
    states, w = _states([2, 4]), [1.0, 1.0]
    agg = hetlora_pad(states, w, alpha=8.0)
    assert agg["l.lora_A"].shape[0] == 4
    low = truncate_rank(agg, 2, alpha=8.0)
    assert low["l.lora_A"].shape[0] == 2
    full = 8.0 / 4 * agg["l.lora_B"][:, :2].double() @ agg["l.lora_A"][:2].double()
    assert torch.allclose(_product(low, 8.0), full, atol=1e-5)
    # one client: padding then averaging is that client's update
    one = hetlora_pad(states[1:], [1.0], alpha=8.0)
    assert torch.allclose(_product(one, 8.0), _product(states[1], 8.0), atol=1e-5)


def test_mixed_ranks_are_refused_where_a_rule_needs_one_rank():
    states, w = _states([2, 3]), [1.0, 1.0]
    with pytest.raises(ConfigError, match="ranks \\[2, 3\\]"):
        fedavg_lora(states, w)
    with pytest.raises(ConfigError, match="rank=0"):
        exact_lora(states, w, rank=0)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        fedavg_lora([{"w": torch.zeros(2)}], [1.0])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def test_inject_lora_starts_at_the_base_and_trains_only_adapters():
    model, x = _mlp(), torch.randn(5, 16)
    before = model(x)
    inject_lora(model, "1,3:2", rank=4, alpha=8.0)
    assert torch.equal(model(x), before)  # B = 0
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["1.lora_A", "1.lora_B", "3.lora_A", "3.lora_B"]
    assert model[3].lora_A.shape == (2, 8) and layer_scales(model) == {"1": 2.0, "3": 4.0}
    conv = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1))
    inject_lora(conv, "", rank=3)
    with torch.no_grad():
        conv[0].lora_B.normal_()
    ref = nn.functional.conv2d(torch.ones(1, 2, 4, 4), conv[0].base.weight + conv[0].delta().reshape(6, 2, 3, 3),
                               conv[0].base.bias, padding=1)  # fmt: skip
    assert torch.allclose(conv(torch.ones(1, 2, 4, 4)), ref, atol=1e-6)


def test_a_frozen_batch_norm_trains_as_it_is_evaluated():
    """A LoRA base's BatchNorm is frozen with it: local training normalises with its running statistics (which
    never travel) instead of batch statistics the server never sees; a BatchNorm with trainable parameters (a full
    run, or one named in --lora-head) still updates them. BN CNN, pretrain low-classes, 5 clients, 5 rounds,
    3 seeds: fedex-lora 0.708 → 0.741, fedavg-lora 0.713 → 0.742 (every seed up)."""
    from fedfuse.train import train

    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    x, y = torch.randn(64, 6) * 3 + 1, torch.randint(0, 3, (64,))
    full, lora = net(), inject_lora(net(), "0", rank=2)
    stats = lora[1].running_mean.clone(), lora[1].running_var.clone()
    train(full, x, y, epochs=1, batch_size=16)
    train(lora, x, y, epochs=1, batch_size=16)
    assert torch.equal(lora[1].running_mean, stats[0]) and torch.equal(lora[1].running_var, stats[1])
    assert not torch.equal(full[1].running_mean, stats[0])  # trainable BN: statistics move as ever
    assert lora.training and lora[0].training and not lora[1].training


def test_peft_adapters_are_found_by_name_and_aggregated():
    a, b = inject_peft(_mlp(), "1", rank=2, alpha=4.0), inject_peft(_mlp(), "1", rank=2, alpha=4.0)
    with torch.no_grad():
        for m in (a, b):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_()
    states = [{k: v for k, v in m.state_dict().items() if "lora_" in k} for m in (a, b)]
    assert list(adapter_pairs(states[0])) == ["base_model.model.1"]
    agg, res = exact_lora(states, [1.0, 1.0], rank=2, alpha=4.0)
    assert aggregation_error(states, [1.0, 1.0], agg, alpha=4.0, residuals=res)["base_model.model.1"] < 1e-6


@pytest.mark.parametrize(
    ("targets", "rank", "match"),
    [("", 0, "lora-rank=0"), ("", -2, "lora-rank=-2"), ("3", 5, "lora-rank=5 is too large for layer '3'"),
     ("nope*", 2, "'nope\\*' matches no Linear/Conv2d/Conv1D layer"), ("1:0", 2, "rank '0'")],
)  # fmt: skip
def test_bad_lora_input_is_one_config_error(targets, rank, match):
    with pytest.raises(ConfigError, match=match):
        inject_lora(_mlp(), targets, rank)


def test_a_base_checkpoint_that_does_not_fit_is_refused(tmp_path):
    from fedfuse.lora.run import adapt_model

    path = tmp_path / "base.pt"
    torch.save({"1.weight": torch.zeros(3, 3)}, path)
    cfg = {"base": str(path), "lora-rank": 2, "seed": 0}
    with pytest.raises(ConfigError, match="base: .*base.pt.* does not fit"):
        adapt_model(cfg, None, _mlp())
    good = _mlp()
    with torch.no_grad():
        good[1].weight.fill_(0.5)
    torch.save(good.state_dict(), path)
    model = adapt_model(cfg, None, _mlp())
    assert torch.all(model[1].base.weight == 0.5) and model[1].lora_A.shape == (2, 16)


class _HeadFirst(nn.Module):
    """The output layer registered before the body: only the forward pass tells which one produces the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)
        self.body = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_the_head_and_the_adapted_biases_are_trained_fully_and_travel():
    from fedfuse.lora import head_modules, output_layer, trained_keys, travelling_state

    model, x = _mlp(), torch.randn(5, 16)
    head = head_modules(model, "auto", x)
    assert head == ["3"] and output_layer(_HeadFirst(), torch.randn(2, 16)) == "head"
    assert output_layer(_HeadFirst()) == "body"  # without an example: the last registered (documented fallback)
    assert head_modules(model, "auto", x, targets="1,3") == []  # the user adapts the output layer: not a head
    inject_lora(model, "", rank=2, head=head, bias="lora_only")
    assert isinstance(model[3], nn.Linear) and not hasattr(model[3], "lora_A")  # the head is not adapted
    assert trained_keys(model) == ["1.base.bias", "3.weight", "3.bias"]
    assert set(travelling_state(model)) == {"1.lora_A", "1.lora_B", "1.base.bias", "3.weight", "3.bias"}
    assert not model[1].base.weight.requires_grad
    everything = inject_lora(_mlp(), "1", rank=2, bias="all")
    assert trained_keys(everything) == ["1.base.bias", "3.bias"]
    with pytest.raises(ConfigError, match="'3', which is trained fully"):
        inject_lora(_mlp(), "3", rank=2, head=["3"])
    with pytest.raises(ConfigError, match="lora-bias='some' is not allowed"):
        inject_lora(_mlp(), "", rank=2, bias="some")
    with pytest.raises(ConfigError, match="'fc' matches no module"):
        head_modules(_mlp(), "fc")


def test_peft_head_goes_to_modules_to_save_and_bias_to_peft():
    from fedfuse.lora import trained_keys

    model = inject_peft(_mlp(), "", rank=2, alpha=4.0, head=["3"], bias="lora_only")
    keys = trained_keys(model)
    assert "base_model.model.1.base_layer.bias" in keys
    assert any("3.modules_to_save" in k and k.endswith("weight") for k in keys)
    assert not any("lora_" in k for k in keys) and not any("3.lora_A" in k for k in model.state_dict())


def test_rslora_scales_a_rank_r_adapter_by_alpha_over_sqrt_r():
    from fedfuse.lora import lora_scale

    model, x = inject_lora(_mlp(), "1,3:2", rank=4, alpha=8.0, scale="rslora"), torch.randn(5, 16)
    assert layer_scales(model) == {"1": pytest.approx(4.0), "3": pytest.approx(8.0 / 2**0.5)}  # 8/√4, 8/√2
    assert layer_scales(inject_lora(_mlp(), "1,3:2", rank=4, alpha=8.0)) == {"1": 2.0, "3": 4.0}  # default: alpha/r
    assert lora_scale(4.0, 16, "rslora") == 1.0 and lora_scale(4.0, 16) == 0.25
    with torch.no_grad():
        model[1].lora_B.normal_()
    lin = model[1]
    want = lin.base(x.flatten(1)) + 4.0 * x.flatten(1) @ (lin.lora_B @ lin.lora_A).T
    assert torch.allclose(lin(x.flatten(1)), want, atol=1e-5)  # the forward uses the rslora scale


def test_peft_and_the_built_in_wrapper_agree_under_rslora():
    pytest.importorskip("peft")
    ours = inject_lora(_mlp(), "1", rank=4, alpha=6.0, scale="rslora")
    peft = inject_peft(_mlp(), "1", rank=4, alpha=6.0, scale="rslora")
    assert layer_scales(peft) == {"base_model.model.1": pytest.approx(3.0)}  # PEFT's use_rslora: 6/√4
    assert layer_scales(ours) == {"1": pytest.approx(3.0)}
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    with torch.no_grad():
        ours[1].lora_A.copy_(a), ours[1].lora_B.copy_(b)
        peft.base_model.model[1].lora_A["default"].weight.copy_(a)
        peft.base_model.model[1].lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 16)
    assert torch.allclose(ours(x), peft(x), atol=1e-5)
    plain = inject_peft(_mlp(), "1", rank=4, alpha=6.0)
    assert layer_scales(plain) == {"base_model.model.1": pytest.approx(1.5)}  # standard: 6/4


def _rs_product(state, alpha):
    a, b = state["l.lora_A"].double(), state["l.lora_B"].double()
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])
    return alpha / a.shape[0] ** 0.5 * b @ a


def test_aggregation_of_products_stays_exact_with_mixed_ranks_under_rslora():
    states, w, alpha = _states([2, 4, 8]), [1.0, 2.0, 3.0], 4.0
    target = sum(x / 6 * _rs_product(s, alpha) for x, s in zip(w, states, strict=True))
    assert torch.allclose(mean_products(states, w, alpha, "rslora")["l"], target)
    assert not torch.allclose(mean_products(states, w, alpha)["l"], target)  # alpha/r weighs the ranks otherwise
    agg, res = exact_lora(states, w, rank=10, alpha=alpha, scale="rslora")  # rank(M) <= 10 (= min(in, out))
    assert torch.allclose(_rs_product(agg, alpha), target, atol=1e-5) and float(res["l"].norm()) < 1e-5
    low, res = exact_lora(states, w, rank=3, alpha=alpha, scale="rslora")
    assert aggregation_error(states, w, low, alpha, residuals=res, scale="rslora")["l"] < 1e-5
    assert torch.allclose(_rs_product(low, alpha) + res["l"], target, atol=1e-5)  # s' = alpha/√3 on the adapters
    stacked = flora_stack(states, w, alpha, "rslora")
    assert aggregation_error(states, w, stacked, alpha, out_scale=1.0, scale="rslora")["l"] < 1e-5
    # HetLoRA's padding and the truncation keep each client's update under the rslora scale too
    one = hetlora_pad(states[:1], [1.0], alpha, "rslora")
    assert one["l.lora_A"].shape[0] == 2 and torch.allclose(_rs_product(one, alpha), _rs_product(states[0], alpha))
    padded = hetlora_pad(states, w, alpha, "rslora")
    back = truncate_rank(padded, 4, alpha, "rslora")
    kept = alpha / 8**0.5 * padded["l.lora_B"][:, :4].double() @ padded["l.lora_A"][:4].double()
    assert torch.allclose(_rs_product(back, alpha), kept, atol=1e-5)


def test_a_bad_lora_scale_is_one_config_error():
    from strategies.registry import validate_config

    for call in (
        lambda: inject_lora(_mlp(), "", rank=2, scale="sqrt"),
        lambda: mean_products(_states([2]), [1.0], 4.0, "sqrt"),
        lambda: validate_config({"strategy": "hetlora", "lora-ranks": "2,4", "lora-scale": "sqrt"}),
    ):
        with pytest.raises(ConfigError, match="^lora-scale='sqrt' is not allowed; allowed: standard, rslora$"):
            call()
    from fedfuse.lora.layers import SCALES
    from strategies.options import LORA_OPTIONS

    assert next(o for o in LORA_OPTIONS if o.name == "lora-scale").choices == SCALES


def _global_adapters(rank=6, out=12, inp=10, seed=5):
    """Global adapters as an SVD leaves them: components in decreasing order of their singular values."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, inp, generator=g, dtype=torch.float64)
    b = torch.randn(out, rank, generator=g, dtype=torch.float64)
    return svd_lora([{"l.lora_A": a, "l.lora_B": b}], [1.0], rank, 4.0)


def test_mean_update_is_the_mean_product_when_every_client_has_the_global_rank():
    start, states, w = _global_adapters(3), _states([3, 3, 3]), [1.0, 2.0, 3.0]
    assert torch.allclose(mean_update(states, w, start, 4.0)["l"], mean_products(states, w, 4.0)["l"], atol=1e-9)
    with_start, res = exact_lora(states, w, 3, 4.0, start=start)
    without, res0 = exact_lora(states, w, 3, 4.0)
    assert torch.allclose(_product(with_start, 4.0) + res["l"], _product(without, 4.0) + res0["l"], atol=1e-9)


@pytest.mark.parametrize("scale", ["standard", "rslora"])
def test_an_idle_round_keeps_the_global_update_with_mixed_ranks(scale):
    """Clients of ranks 2, 4, 6 that return exactly what they were sent (the global adapters at their rank) changed
    nothing: U is the global product G, and svd_lora with ``start`` gives G back. The mean of the products M drops
    the components a rank-2 or rank-4 client never received, shrinking G's tail."""
    start = _global_adapters(6)
    ranks, w = [2, 4, 6], [1.0, 1.0, 2.0]
    states = [{**truncate_rank(start, r, 4.0, scale), "l.bias": torch.zeros(12)} for r in ranks]
    g = mean_products([start], [1.0], 4.0, scale)["l"]
    assert torch.allclose(mean_update(states, w, start, 4.0, scale)["l"], g, atol=1e-9)
    kept = svd_lora(states, w, 6, 4.0, scale, start=start)
    assert torch.allclose(mean_products([kept], [1.0], 4.0, scale)["l"], g, atol=1e-9)
    dropped = mean_products(states, w, 4.0, scale)["l"]
    assert float((dropped - g).norm()) > 0.05 * float(g.norm())
    u = mean_update(states, w, start, 4.0, scale)
    assert float(aggregation_error(states, w, kept, 4.0, scale=scale, target=u)["l"]) < 1e-9


def test_a_low_rank_clients_change_is_applied_in_full():
    """One rank-2 client moves its B; the others return what they were sent: U = G + λ_1 (P_1 − T_1)."""
    start = _global_adapters(6)
    states = [dict(truncate_rank(start, r, 4.0)) for r in (2, 6)]
    t1 = mean_products([states[0]], [1.0], 4.0)["l"]
    states[0]["l.lora_B"] = states[0]["l.lora_B"] + 0.5
    p1 = mean_products([states[0]], [1.0], 4.0)["l"]
    g = mean_products([start], [1.0], 4.0)["l"]
    assert torch.allclose(mean_update(states, [1.0, 3.0], start, 4.0)["l"], g + 0.25 * (p1 - t1), atol=1e-9)


def test_mean_update_refuses_a_client_rank_above_the_global_one():
    with pytest.raises(ConfigError, match="rank 8 is above the global rank 6"):
        mean_update(_states([8]), [1.0], _global_adapters(6))
