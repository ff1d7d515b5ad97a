"""REPAIR as sufficient statistics (one-shot and federated form), federated BN pooling, fused-GW fusion."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedfuse.align import derive_spec, fuse
from fedfuse.align.repair import (
    average_statistics,
    pool_bn_statistics,
    repair,
    repair_sites,
    rescale_units,
    unit_statistics,
)
from fedfuse.errors import ConfigError
from fedfuse.models import MLP
from tests.test_align_cases import make_case, max_state_diff, outputs


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP((6,), 3, (16, 12)).eval()


def _hidden(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Pre-activation outputs of the two hidden Linear layers."""
    with torch.no_grad():
        h1 = model.net[1](model.net[0](x))
        h2 = model.net[3](model.net[2](h1))
    return [h1, h2]


def test_sites_are_bn_layers_with_batch_norm_and_producers_without() -> None:
    vgg, x = make_case("vgg_bn")
    mlp = _mlp(0)
    modules = dict(vgg.named_modules())
    sites = repair_sites(vgg, example_input=x)
    conv_groups = [s for s in sites if not isinstance(modules[s.module], nn.Linear)]
    assert conv_groups and all(isinstance(modules[s.module], nn.BatchNorm2d) for s in conv_groups)
    assert [s.module for s in repair_sites(mlp, example_input=torch.randn(2, 6))] == ["net.1", "net.3"]


def test_group_norm_models_are_repaired_once_per_layer_at_the_group_norm_affine() -> None:
    """GroupNorm(G) cuts each conv group into G parts that share one GroupNorm: one site per GroupNorm (rescaling
    it once per part compounded the scale: every REPAIR of a GroupNorm CNN ended at chance), and after REPAIR each
    GroupNorm output unit has the parents' averaged mean and std."""
    from fedfuse.models import build_model

    torch.manual_seed(0)
    a, b = (build_model("cnn", (1, 8, 8), 10, group_norm=4, seed=s).eval() for s in (0, 1))
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    norms = [n for n, m in a.named_modules() if isinstance(m, nn.GroupNorm)]
    sites = repair_sites(a, example_input=x)
    assert [s.module for s in sites if s.kind == "bn"] == norms  # each GroupNorm once, none of the convs
    fused = copy.deepcopy(a)
    fused.load_state_dict(fuse([a, b], method="average"))
    repair(fused, [a, b], x)
    sa, sb, sf = (unit_statistics(m, x, norms) for m in (a, b, fused))
    for n in norms:
        torch.testing.assert_close(sf[n], 0.5 * (sa[n] + sb[n]), atol=1e-3, rtol=1e-3)


def test_unit_statistics_equal_direct_mean_and_std_over_batches() -> None:
    model, x = _mlp(0), torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    stats = unit_statistics(model, x, ["net.1", "net.3"], batch_size=64)
    for name, h in zip(["net.1", "net.3"], _hidden(model, x), strict=True):
        torch.testing.assert_close(stats[name][0], h.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats[name][1], h.std(0), atol=1e-5, rtol=1e-5)


def test_a_linear_on_tokens_has_its_units_last() -> None:
    """(B, T, C) outputs of a Linear (a transformer's MLP): statistics per unit c over batch × tokens (a conv
    layout would read T as the units: REPAIR of every hf: model failed with a shape error)."""
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(40, 11, 5, generator=torch.Generator().manual_seed(3))  # 11 tokens, 7 units
    stats = unit_statistics(net, x, ["0"])["0"]
    h = net[0](x).reshape(-1, 7)
    torch.testing.assert_close(stats[0], h.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats[1], h.std(0), atol=1e-5, rtol=1e-5)
    a, b = copy.deepcopy(net), nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    fused = copy.deepcopy(a)
    fused.load_state_dict(fuse([a, b], method="average"))
    repair(fused, [a, b], x)
    want = 0.5 * (a[0](x).reshape(-1, 7).std(0) + b[0](x).reshape(-1, 7).std(0))
    torch.testing.assert_close(fused[0](x).reshape(-1, 7).std(0), want, atol=1e-4, rtol=1e-4)


def test_sequential_repair_gives_every_layer_the_interpolated_statistics() -> None:
    # Prepare: two parents (already "aligned": any two same-shaped models are), their plain average
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(2))
    fused = copy.deepcopy(a)
    fused.load_state_dict(fuse([a, b], method="average"))
    one_round = copy.deepcopy(fused)
    # Execute
    repair(fused, [a, b], x, [0.25, 0.75])  # rounds = number of sites: exact
    repair(one_round, [a, b], x, [0.25, 0.75], rounds=1)
    # Assert: both layers hit the targets after the full repair; one round gets the first layer only
    ha, hb, hf, h1 = _hidden(a, x), _hidden(b, x), _hidden(fused, x), _hidden(one_round, x)
    for k in range(2):
        torch.testing.assert_close(hf[k].mean(0), 0.25 * ha[k].mean(0) + 0.75 * hb[k].mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hf[k].std(0), 0.25 * ha[k].std(0) + 0.75 * hb[k].std(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h1[0].std(0), 0.25 * ha[0].std(0) + 0.75 * hb[0].std(0), atol=1e-4, rtol=1e-4)
    assert float((h1[1].std(0) - hf[1].std(0)).abs().max()) > 1e-3


def test_federated_form_weights_each_parent_on_its_own_data() -> None:
    # client i's statistics on its own batch, λ-averaged, equal the server-side computation from the pieces
    a, b = _mlp(0), _mlp(1)
    xa, xb = torch.randn(100, 6) + 1.0, torch.randn(300, 6) - 1.0
    fused = copy.deepcopy(a)
    fused.load_state_dict(fuse([a, b], method="average"))
    sites = repair_sites(fused, example_input=xa)
    expected_target = average_statistics([unit_statistics(a, xa, sites), unit_statistics(b, xb, sites)], [1, 3])
    fused_stats = average_statistics([unit_statistics(fused, xa, sites), unit_statistics(fused, xb, sites)], [1, 3])
    manual = rescale_units(fused.state_dict(), sites[:1], fused_stats, expected_target)
    repaired = repair(copy.deepcopy(fused), [a, b], [xa, xb], [1, 3], rounds=1)
    torch.testing.assert_close(repaired.state_dict()["net.1.weight"], manual["net.1.weight"])
    torch.testing.assert_close(repaired.state_dict()["net.1.bias"], manual["net.1.bias"])


def test_repair_of_a_batch_norm_model_acts_on_the_bn_affine_in_eval_mode() -> None:
    a, x = make_case("vgg_bn")
    b, _ = make_case("vgg_bn", seed=1)
    fused = copy.deepcopy(a)
    fused.load_state_dict(fuse([a, b], method="average", bn_repair=None))
    before = copy.deepcopy(fused.state_dict())
    repair(fused, [a, b], x)
    after = fused.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".weight" in k or ".bias" in k for k in changed)
    assert all(k.startswith("features.1.") or k.startswith("features.5.") for k in changed if "features" in k)
    site = repair_sites(fused, example_input=x)[0].module
    got = unit_statistics(fused, x, [site])[site]
    want = average_statistics([unit_statistics(a, x, [site]), unit_statistics(b, x, [site])])[site]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dead_units_are_only_shifted() -> None:
    state = {"l.weight": torch.ones(2, 3), "l.bias": torch.zeros(2)}
    from fedfuse.align.repair import RepairSite

    site = RepairSite("l", "g", "producer")
    fused = {"l": torch.tensor([[0.0, 1.0], [0.0, 2.0]])}  # rows: means, stds; unit 0 has std 0
    target = {"l": torch.tensor([[1.0, 1.0], [5.0, 4.0]])}  # unit 1: mean 1 → 1, std 2 → 4
    out = rescale_units(state, [site], fused, target)
    torch.testing.assert_close(out["l.weight"], torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))
    torch.testing.assert_close(out["l.bias"], torch.tensor([1.0, -1.0]))  # (0 − 1)·2 + 1


def test_pooled_bn_statistics_are_the_statistics_of_the_union() -> None:
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(40, 3, generator=g) * 2 + 1, torch.randn(120, 3, generator=g) - 3
    stats = [{"bn.running_mean": x.mean(0), "bn.running_var": x.var(0, unbiased=False)} for x in (xa, xb)]
    pooled = pool_bn_statistics(stats, [40, 120])
    union = torch.cat([xa, xb])
    torch.testing.assert_close(pooled["bn.running_mean"], union.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled["bn.running_var"], union.var(0, unbiased=False), atol=1e-5, rtol=1e-5)


def test_statistics_from_different_sites_are_rejected() -> None:
    with pytest.raises(ConfigError, match="cover sites"):
        average_statistics([{"a": torch.zeros(2, 3)}, {"b": torch.zeros(2, 3)}])


# ---- fused Gromov-Wasserstein barycenter ---------------------------------------------------------


def test_gwb_with_alpha_zero_is_wb_and_plain_gw_stays_available() -> None:
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(2, 6)
    wb = fuse([a, b], method="wb", example_input=x)
    assert max_state_diff(fuse([a, b], method="gwb", alpha=0.0, example_input=x), wb) == 0.0
    gw = fuse([a, b], method="gw", example_input=x)
    assert set(gw) == set(wb)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_gwb_recovers_a_permuted_copy_at_any_alpha(alpha: float) -> None:
    from fedfuse.align import permute_model

    model, x = make_case("mlp")
    spec = derive_spec(model, x[:2])
    permuted, _ = permute_model(model, spec, seed=3)
    fused = fuse([model, permuted], method="gwb", spec=spec, alpha=alpha)
    torch.testing.assert_close(outputs(model, fused, x), outputs(model, None, x), atol=1e-5, rtol=1e-5)


def test_gwb_alpha_out_of_range_is_one_clear_error() -> None:
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ConfigError, match=r"alpha=1.5 is out of range"):
        fuse([a, b], method="gwb", alpha=1.5, example_input=torch.randn(2, 6))


def test_one_clients_statistics_cannot_set_the_targets_alone() -> None:
    """Each unit's std is bounded at K (σ_m + s) (σ_m the clients' lower median, s the larger of the site's median
    and mean σ_m) and its mean to μ_m ± K (σ_m + |μ_m| + s); statistics inside the bound come back bit for bit
    (honest runs unchanged)."""
    from fedfuse.align.repair import STATS_BOUND, bound_statistics

    gen = torch.Generator().manual_seed(0)
    honest = [{"fc": torch.stack([torch.randn(6, generator=gen), 1 + torch.rand(6, generator=gen)])} for _ in range(4)]
    honest[1]["fc"][1, 5] = 8.0  # alive on one client's data, quiet on the rest: inside through s
    honest[2]["fc"][1, 5] = honest[3]["fc"][1, 5] = honest[0]["fc"][1, 5] = 0.01
    same, hit = bound_statistics(honest)
    assert hit == 0 and all(torch.equal(a["fc"], b["fc"]) for a, b in zip(same, honest, strict=True))
    junk = {"fc": honest[0]["fc"].clone()}
    junk["fc"][1, 2] = 1e6  # a zeroed BatchNorm variance: its unit's std explodes
    junk["fc"][0, 4] = -1e9
    out, hit = bound_statistics([*honest, junk])
    med = torch.stack([s["fc"].double() for s in [*honest, junk]]).sort(0).values[2]
    site = max(med[1].median(), med[1].mean())
    assert hit == 1 and all(torch.equal(a["fc"], b["fc"]) for a, b in zip(out[:4], honest, strict=True))
    assert float(out[4]["fc"][1, 2]) == pytest.approx(float(STATS_BOUND * (med[1, 2] + site)), rel=1e-6)
    low = med[0, 4] - STATS_BOUND * (med[1, 4] + site + med[0, 4].abs())
    assert float(out[4]["fc"][0, 4]) == pytest.approx(float(low), rel=1e-6)
    assert torch.equal(out[4]["fc"][:, :2], junk["fc"][:, :2])  # only the bounded units change
    bn = [{"b.running_mean": torch.zeros(3), "b.running_var": torch.full((3,), v)} for v in (1.0, 4.0, 1e8)]
    out, hit = bound_statistics(bn)
    assert hit == 1 and out[2]["b.running_var"].tolist() == [(STATS_BOUND * (2.0 + 2.0)) ** 2] * 3
    assert bound_statistics(bn[2:]) == (bn[2:], 0)  # one client: nothing to compare with
    # a site where most units are quiet on most clients (median σ_m 0: a deep block of models trained apart): a unit
    # alive on one client's data, and float noise on quiet ones, stay inside (the site's mean σ_m, the floor)
    quiet = [{"b.running_mean": torch.zeros(4), "b.running_var": torch.tensor([v, 0.0, 0.0, 1.0])} for v in (0, 0, 0)]
    quiet[0]["b.running_var"][0], quiet[1]["b.running_var"][1] = 0.25, 1e-16
    out, hit = bound_statistics(quiet)
    assert hit == 0 and all(torch.equal(a[k], b[k]) for a, b in zip(out, quiet, strict=True) for k in a)
