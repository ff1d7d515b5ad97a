"""The clients' local optimiser (run option ``optimizer``): sgd (default, unchanged), adam, adamw; PFN's fixed entries
stay fixed under any of them; bad combinations are one ConfigError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.experiment import LocalPlan, local_train
from fedfuse.subspace import MaskedTraining, pfn_mask
from fedfuse.train import make_optimizer, train
from strategies.registry import validate_config


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_sgd_default_is_the_training_loops_own_sgd():
    """optimizer=sgd builds the same SGD as fedfuse.train.train does by itself: bit-identical weights."""
    x, y = _data()
    cfg = validate_config({"lr": 0.1, "momentum": 0.5, "weight-decay": 0.01})
    assert cfg["optimizer"] == "sgd"
    a, b = _model(), _model()
    local_train(cfg, a, x, y, LocalPlan(2, None, 7, False))
    train(b, x, y, epochs=2, lr=0.1, momentum=0.5, weight_decay=0.01, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_adam_is_used_its_first_step_moves_every_entry_by_lr():
    """Adam's first step is lr·g/(|g| + eps): every entry with a gradient moves by lr, whatever the gradient's size
    (SGD's steps are proportional to it)."""
    x, y = _data()
    for name in ("adam", "adamw"):
        model = _model()
        before = [p.detach().clone() for p in model.parameters()]
        cfg = validate_config({"optimizer": name, "lr": 0.01, "batch-size": 64})
        local_train(cfg, model, x, y, LocalPlan(1, 1, 0, False))
        steps = torch.cat([(p.detach() - q).abs().reshape(-1) for p, q in zip(model.parameters(), before, strict=True)])
        moved = steps[steps > 0]
        assert len(moved) > 0.9 * len(steps) and torch.allclose(moved, torch.full_like(moved, 0.01), rtol=1e-3), name
    sgd = _model()
    before = [p.detach().clone() for p in sgd.parameters()]
    local_train(validate_config({"lr": 0.01, "batch-size": 64}), sgd, x, y, LocalPlan(1, 1, 0, False))
    steps = torch.cat([(p.detach() - q).abs().reshape(-1) for p, q in zip(sgd.parameters(), before, strict=True)])
    assert float(steps[steps > 0].std()) > 1e-4  # SGD: steps differ across entries


def test_adamw_decay_moves_free_entries_but_never_pfn_fixed_ones():
    x, y = _data()
    model = _model()
    masks = pfn_mask(model, 0.4, seed=3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = validate_config({"optimizer": "adamw", "lr": 0.01, "weight-decay": 0.5})
    with MaskedTraining(model, masks) as masked:
        local_train(cfg, model, x, y, LocalPlan(2, None, 0, False), after_step=masked.after_step)
    for name, p in model.named_parameters():
        fixed = masks[name].bool()
        assert torch.equal(p.detach()[fixed], start[name][fixed]), name
        assert not torch.equal(p.detach()[~fixed], start[name][~fixed]), name


def test_bad_optimizer_input_is_one_config_error():
    with pytest.raises(ConfigError, match="optimizer.*'rmsprop'.*sgd, adam, adamw"):
        validate_config({"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="momentum=0.5 applies to optimizer sgd; got optimizer='adam'"):
        validate_config({"optimizer": "adam", "momentum": 0.5})
    with pytest.raises(ValueError, match="optimizer='lion' is unknown; allowed: sgd, adam, adamw"):
        make_optimizer("lion", _model().parameters(), 0.1)


def test_max_grad_norm_clips_every_step_and_off_changes_nothing():
    """max-grad-norm c rescales each step's gradient to norm ≤ c: one plain SGD step (lr 1, no momentum) moves the
    trained parameters by exactly min(‖g‖, c); 0 (the default) is bit-identical to no clipping; < 0 is refused."""
    x, y = _data()
    moved = {}
    for c in (0.0, 1e-3, 1e6):
        m, start = _model(), _model()
        local_train(validate_config({"lr": 1.0, "momentum": 0.0, "batch-size": 64, "max-grad-norm": c}), m, x, y,
                    LocalPlan(1, None, 0, False))  # fmt: skip
        moved[c] = torch.cat([(p - q).flatten() for p, q in zip(m.parameters(), start.parameters(), strict=True)])
    assert moved[0.0].norm() > 1e-2  # the gradient itself: far above the clip below
    assert torch.isclose(moved[1e-3].norm(), torch.tensor(1e-3), rtol=1e-4)
    assert torch.equal(moved[1e6], moved[0.0])  # a bound above the gradient's norm: the same step
    with pytest.raises(ConfigError, match="max-grad-norm"):
        validate_config({"max-grad-norm": -1.0})
    with pytest.raises(ValueError, match="max_grad_norm"):
        train(_model(), x, y, max_grad_norm=float("nan"))
