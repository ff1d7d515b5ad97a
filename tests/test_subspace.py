"""TNA-PFN subspace training: seeded fixed masks, bit-exact freezing, slow variant, pruning at init."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.models import build_model
from fedfuse.subspace import MaskedTraining, fixed_distance, mask_ratio, pfn_mask, pnu_mask, prune_at_init
from fedfuse.train import state_to_numpy, train

SHAPE = (1, 8, 8)
STEPS = 50
BATCH = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add contention (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int = STEPS * BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _model(name: str, seed: int = 0) -> nn.Module:
    width = {"mlp": 64, "cnn": 32, "lstm": 16}[name]
    return build_model(name, SHAPE, 10, width=width, seed=seed)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _train_50_steps(model: nn.Module, masks: dict[str, torch.Tensor] | None, optim: str, **kw: object) -> None:
    """One epoch of 50 steps: SGD through train()'s after_step, Adam through attach(optimizer)'s step hook."""
    x, y = _data()
    if masks is None:
        opt = None if optim == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        train(model, x, y, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=BATCH, optimizer=opt)
        return
    mt = MaskedTraining(model, masks, **kw)  # type: ignore[arg-type]
    if optim == "sgd":
        with mt:
            res = train(
                model, x, y, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=BATCH, after_step=mt.after_step
            )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        mt.attach(opt)
        res = train(model, x, y, batch_size=BATCH, optimizer=opt)
        mt.detach()
    assert res.steps == STEPS


# ----------------------------------------------------------------------------- bit-exact freezing


@pytest.mark.parametrize(
    "name, granularity, optim",
    [
        ("mlp", "weight", "sgd"),
        ("mlp", "weight", "adam"),
        ("cnn", "weight", "sgd"),
        ("cnn", "weight", "adam"),
        ("cnn", "neuron", "adam"),
        ("lstm", "neuron", "sgd"),
    ],
)
def test_fixed_entries_bit_identical_and_free_entries_move(name: str, granularity: str, optim: str) -> None:
    model = _model(name)
    masks = pfn_mask(model, 0.4, seed=7, granularity=granularity)  # type: ignore[arg-type]
    before = _snapshot(model)

    _train_50_steps(model, masks, optim)

    for pname, param in model.named_parameters():
        fixed = masks[pname].bool()
        assert fixed.any() and (~fixed).any(), pname
        assert torch.equal(param.detach()[fixed], before[pname][fixed]), f"fixed entries of {pname} moved"
        assert not torch.equal(param.detach()[~fixed], before[pname][~fixed]), f"free entries of {pname} froze"
    assert fixed_distance(before, dict(model.named_parameters()), masks) == 0.0


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_without_masking_or_restore_the_fixed_entries_move(optim: str) -> None:
    """The bit-exact check is sensitive: plain training, and gradient zeroing alone under weight decay,
    both move the entries that the mask calls fixed."""
    model = _model("mlp")
    masks = pfn_mask(model, 0.4, seed=7)
    before = _snapshot(model)
    _train_50_steps(model, None, optim)
    assert fixed_distance(before, _snapshot(model), masks) > 0

    model = _model("mlp")
    x, y = _data()
    with MaskedTraining(model, masks):  # grad hooks only: weight decay still shrinks fixed entries
        train(model, x, y, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=BATCH)
    assert fixed_distance(before, _snapshot(model), masks) > 0


def test_grad_of_fixed_entries_is_zero_until_context_exit() -> None:
    model = _model("mlp")
    masks = pfn_mask(model, 0.5, seed=1)
    x, y = _data(64)
    fixed = masks["net.1.weight"].bool()
    with MaskedTraining(model, masks):
        nn.functional.cross_entropy(model(x), y).backward()
        grad = model.net[1].weight.grad
        assert grad is not None and bool((grad[fixed] == 0).all()) and bool((grad[~fixed] != 0).any())
        model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grad = model.net[1].weight.grad
    assert grad is not None and bool((grad[fixed] != 0).any())


# ----------------------------------------------------------------------------- mask ratio / granularity


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.7])
def test_mask_ratio_on_a_large_layer(granularity: str, ratio: float) -> None:
    model = nn.Sequential(nn.Linear(512, 512))
    masks = pfn_mask(model, ratio, seed=3, granularity=granularity)  # type: ignore[arg-type]
    assert set(masks) == {"0.weight", "0.bias"}
    assert masks["0.weight"].dtype == torch.float32
    assert set(masks["0.weight"].unique().tolist()) == {0.0, 1.0}
    assert abs(mask_ratio({"w": masks["0.weight"]}) - ratio) <= 0.01
    assert abs(mask_ratio(masks) - ratio) <= 0.01
    if granularity == "weight":  # exactly round(ratio * numel) per tensor, biases included
        assert int(masks["0.weight"].sum()) == round(ratio * 512 * 512)
        assert int(masks["0.bias"].sum()) == round(ratio * 512)


def test_neuron_granularity_fixes_whole_rows_and_bias_follows() -> None:
    model = _model("cnn")
    masks = pfn_mask(model, 0.4, seed=5, granularity="neuron")
    for pname, param in model.named_parameters():
        if param.dim() < 2:
            continue
        rows = masks[pname].reshape(param.shape[0], -1)
        assert torch.equal(rows, rows[:, :1].expand_as(rows)), f"{pname}: a row is partly fixed"
        assert int(rows[:, 0].sum()) == round(0.4 * param.shape[0])
        bias = pname.removesuffix("weight") + "bias"
        if bias in masks:
            assert torch.equal(masks[bias], rows[:, 0]), f"{bias} does not follow the rows of {pname}"


def test_neuron_granularity_rnn_gate_rows_shared_by_ih_hh_and_biases() -> None:
    model = _model("lstm")
    masks = pfn_mask(model, 0.25, seed=5, granularity="neuron")
    rows = masks["rnn.weight_ih_l0"][:, 0]
    assert rows.numel() == 4 * 16 and int(rows.sum()) == 16  # each of the 4·H gate rows is a row
    assert torch.equal(masks["rnn.weight_hh_l0"], rows[:, None].expand(-1, 16))
    assert torch.equal(masks["rnn.bias_ih_l0"], rows) and torch.equal(masks["rnn.bias_hh_l0"], rows)


# ----------------------------------------------------------------------------- seeding


def _masks_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_same_seed_same_mask_on_server_and_client(granularity: str) -> None:
    server, client = _model("cnn", seed=0), _model("cnn", seed=99)  # different init values, same architecture
    a = pfn_mask(server, 0.4, seed=11, granularity=granularity)  # type: ignore[arg-type]
    b = pfn_mask(client, 0.4, seed=11, granularity=granularity)  # type: ignore[arg-type]
    assert _masks_equal(a, b)
    assert not _masks_equal(a, pfn_mask(server, 0.4, seed=12, granularity=granularity))  # type: ignore[arg-type]


def test_mask_is_independent_of_python_hash_seed() -> None:
    """A client process (another PYTHONHASHSEED) rebuilds the same mask from the seed alone."""
    code = (
        "from fedfuse.models import build_model; from fedfuse.subspace import pfn_mask\n"
        "m = build_model('mlp', (1, 8, 8), 10, width=64)\n"
        "k = pfn_mask(m, 0.4, seed=11)\n"
        "print(sum(int(v.flatten().nonzero().flatten().mul(7).sum()) for v in k.values()))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    here = pfn_mask(_model("mlp", seed=3), 0.4, seed=11)
    assert int(out.stdout) == sum(int(v.flatten().nonzero().flatten().mul(7).sum()) for v in here.values())


def test_pnu_mask_redrawn_per_round() -> None:
    model = _model("mlp")
    r0, r0_again, r1 = pnu_mask(model, 0.4, 3, 0), pnu_mask(model, 0.4, 3, 0), pnu_mask(model, 0.4, 3, 1)
    assert _masks_equal(r0, r0_again)
    assert not _masks_equal(r0, r1)
    assert not _masks_equal(r0, pnu_mask(model, 0.4, 4, 0))
    assert abs(mask_ratio(r1) - 0.4) < 0.01
    # over many rounds every weight of the first layer is free at least once
    free_once = sum(1 - pnu_mask(model, 0.4, 3, r)["net.1.weight"] for r in range(12))
    assert bool((free_once > 0).all())


# ----------------------------------------------------------------------------- layer selection


def test_layers_first_middle_last_and_globs() -> None:
    model = _model("mlp")  # net.1, net.3, net.5 are the Linear layers
    names = [n for n, _ in model.named_parameters()]

    def masked(layers: object) -> list[str]:
        return [n for n, m in pfn_mask(model, 0.4, seed=2, layers=layers).items() if m.any()]  # type: ignore[arg-type]

    assert masked("all") == names
    assert masked("first") == ["net.1.weight", "net.1.bias"]
    assert masked("middle") == ["net.3.weight", "net.3.bias"]
    assert masked("last") == ["net.5.weight", "net.5.bias"]
    assert masked(["*.bias"]) == ["net.1.bias", "net.3.bias", "net.5.bias"]
    assert masked(["net.5"]) == ["net.5.weight", "net.5.bias"]  # a module name selects its parameters
    assert masked(["net.1.weight", "net.3.*"]) == ["net.1.weight", "net.3.weight", "net.3.bias"]
    # unselected parameters are present and fully free; selected draws do not depend on the selection
    first = pfn_mask(model, 0.4, seed=2, layers="first")
    assert set(first) == set(names) and not first["net.3.weight"].any()
    assert torch.equal(first["net.1.weight"], pfn_mask(model, 0.4, seed=2)["net.1.weight"])
    assert mask_ratio(first, over="masked") == pytest.approx(0.4, abs=0.01)
    assert mask_ratio(first) < 0.4


def test_layers_first_on_cnn_masks_only_the_first_conv() -> None:
    model = _model("cnn")
    masks = pfn_mask(model, 0.4, seed=2, layers="first")
    assert [n for n, m in masks.items() if m.any()] == ["features.0.weight", "features.0.bias"]


# ----------------------------------------------------------------------------- slow variant


def test_slow_mode_single_sgd_step_scales_fixed_updates_exactly() -> None:
    plain, slow = _model("mlp"), _model("mlp")
    masks = pfn_mask(slow, 0.4, seed=4)
    before = _snapshot(plain)
    x, y = _data(BATCH)
    for model, masked in ((plain, False), (slow, True)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mt = MaskedTraining(model, masks, mode="slow", slow_scale=0.1).attach(opt) if masked else None
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if mt is not None:
            mt.detach()
    slow_params = dict(slow.named_parameters())
    for pname, param in plain.named_parameters():
        fixed = masks[pname].bool()
        d_plain = param.detach() - before[pname]
        d_slow = slow_params[pname].detach() - before[pname]
        torch.testing.assert_close(d_slow[~fixed], d_plain[~fixed], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(d_slow[fixed], 0.1 * d_plain[fixed], rtol=1e-3, atol=1e-7)


def test_slow_mode_fixed_entries_move_less_than_free_ones() -> None:
    model = _model("mlp")
    masks = pfn_mask(model, 0.4, seed=4)
    before = _snapshot(model)
    x, y = _data()
    with MaskedTraining(model, masks, mode="slow", slow_scale=0.1) as mt:
        train(model, x, y, lr=0.05, batch_size=BATCH, after_step=mt.after_step)  # plain SGD
    moved_fixed = moved_free = 0.0
    n_fixed = n_free = 0
    for pname, param in model.named_parameters():
        fixed = masks[pname].bool()
        delta = (param.detach() - before[pname]).abs()
        moved_fixed += float(delta[fixed].sum())
        moved_free += float(delta[~fixed].sum())
        n_fixed, n_free = n_fixed + int(fixed.sum()), n_free + int((~fixed).sum())
    assert moved_fixed > 0
    ratio = (moved_fixed / n_fixed) / (moved_free / n_free)
    assert 0.05 < ratio < 0.2, ratio  # about slow_scale


# ----------------------------------------------------------------------------- pruning at init


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_prune_at_init_zeroes_and_keeps_zero(optim: str) -> None:
    model = _model("cnn")
    masks = pfn_mask(model, 0.5, seed=8)
    prune_at_init(model, masks)
    for pname, param in model.named_parameters():
        fixed = masks[pname].bool()
        assert bool((param.detach()[fixed] == 0).all()), pname
        assert bool((param.detach()[~fixed] != 0).any()), pname
    before = _snapshot(model)
    _train_50_steps(model, masks, optim)
    for pname, param in model.named_parameters():
        fixed = masks[pname].bool()
        assert bool((param.detach()[fixed] == 0).all()), f"pruned entries of {pname} came back"
        assert not torch.equal(param.detach()[~fixed], before[pname][~fixed])


# ----------------------------------------------------------------------------- helpers


def test_fixed_distance_is_l2_on_fixed_entries_and_accepts_numpy() -> None:
    a = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0])}
    b = {"w": torch.tensor([3.0, 4.0, 100.0, 0.0])}
    masks = {"w": torch.tensor([1.0, 1.0, 0.0, 1.0])}
    assert fixed_distance(a, b, masks) == pytest.approx(5.0)
    model = _model("mlp")
    masks_m = pfn_mask(model, 0.4, seed=0)
    shifted = {k: v + 1.0 for k, v in _snapshot(model).items()}
    expected = math.sqrt(sum(float(m.sum()) for m in masks_m.values()))
    assert fixed_distance(state_to_numpy(model), shifted, masks_m) == pytest.approx(expected)


def test_masked_training_works_on_a_deepcopy_with_same_masks() -> None:
    """A client copy of the global model trains under the server's mask; the fixed distance stays 0."""
    server = _model("mlp")
    client = copy.deepcopy(server)
    masks = pfn_mask(server, 0.4, seed=21)
    _train_50_steps(client, masks, "sgd")
    assert fixed_distance(server.state_dict(), client.state_dict(), masks) == 0.0
    assert fixed_distance(server.state_dict(), client.state_dict(), {k: 1 - m for k, m in masks.items()}) > 0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), True])
def test_bad_ratio_raises_config_error(ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"ratio=.*0 <= ratio < 1") as info:
        pfn_mask(_model("mlp"), ratio)
    assert repr(ratio) in str(info.value)


def test_bad_options_raise_config_error_naming_value_and_allowed() -> None:
    model = _model("mlp")
    with pytest.raises(ConfigError, match=r"granularity='row'.*weight, neuron"):
        pfn_mask(model, 0.4, granularity="row")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"layers='second'.*all, first, middle, last"):
        pfn_mask(model, 0.4, layers="second")
    with pytest.raises(ConfigError, match=r"'conv\*' matches no parameter"):
        pfn_mask(model, 0.4, layers=["conv*"])
    masks = pfn_mask(model, 0.4)
    with pytest.raises(ConfigError, match=r"mode='fast'.*freeze, slow"):
        MaskedTraining(model, masks, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"slow_scale=2"):
        MaskedTraining(model, masks, mode="slow", slow_scale=2)
    with pytest.raises(ConfigError, match=r"unknown parameters \['nope'\]"):
        MaskedTraining(model, {"nope": torch.ones(1)})
    with pytest.raises(ConfigError, match=r"shape"):
        MaskedTraining(model, {"net.1.bias": torch.ones(3)})
