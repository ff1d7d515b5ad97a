"""Weight matching's permuted-copy shortcuts (``solvers._EXACT``) return what the plain products return."""

from __future__ import annotations

import pytest
import torch

from fedfuse.align import derive_spec, solvers, weight_matching
from fedfuse.align.transport import permute_model
from fedfuse.models import VGG


def _pair(noise: float) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    torch.manual_seed(0)
    model = VGG((1, 8, 8), 10, cfg=(8, "M", 16), batch_norm=True, hidden=32).eval()
    spec = derive_spec(model, torch.randn(1, 1, 8, 8))
    copy, _ = permute_model(model, spec, seed=3)
    if noise:
        with torch.no_grad():
            for p in copy.parameters():
                p.add_(noise * torch.randn_like(p))
    return model, copy, spec


@pytest.mark.parametrize("noise", [0.0, 1e-3, 0.5])
def test_shortcuts_change_no_permutation(noise: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact copy: rows paired by hashing and the sweep skipped; a perturbed copy: the products run as before."""
    model, copy, spec = _pair(noise)
    calls: list[bool] = []
    real = solvers._exact_rows
    monkeypatch.setattr(solvers, "_exact_rows", lambda r, p: calls.append((out := real(r, p)) is not None) or out)
    fast, sweeps_fast = weight_matching(model, copy, spec, return_iterations=True)
    monkeypatch.setattr(solvers, "_EXACT", False)
    plain, sweeps_plain = weight_matching(model, copy, spec, return_iterations=True)
    assert set(fast) == set(plain) and all(torch.equal(fast[k], plain[k]) for k in plain)
    assert sweeps_fast == sweeps_plain
    assert calls and (all(calls) if noise == 0 else not any(calls))  # the shortcut is taken exactly when rows are equal


def test_one_changed_element_defeats_the_shortcut_signed_zeros_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are keyed on a few of their columns only: one changed element anywhere must still defeat the shortcut
    (the full comparison), and −0.0 in place of +0.0 (equal values) must not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3)).eval()
    spec = derive_spec(model, torch.randn(2, 600))
    with torch.no_grad():
        model[0].weight[:, ::7] = 0.0
    copy, _ = permute_model(model, spec, seed=1)
    with torch.no_grad():
        copy[0].weight[copy[0].weight == 0] = -0.0
    calls: list[bool] = []
    real = solvers._exact_rows
    monkeypatch.setattr(solvers, "_exact_rows", lambda r, p: calls.append((out := real(r, p)) is not None) or out)
    weight_matching(model, copy, spec)
    assert calls == [True]  # signed zeros: still a permuted copy
    with torch.no_grad():
        copy[0].weight[5, 599] += 1e-3  # column 599: most likely outside the 256 keyed columns
    calls.clear()
    fast, sweeps_fast = weight_matching(model, copy, spec, return_iterations=True)
    assert calls == [False]
    monkeypatch.setattr(solvers, "_EXACT", False)
    plain, sweeps_plain = weight_matching(model, copy, spec, return_iterations=True)
    assert sweeps_fast == sweeps_plain and all(torch.equal(fast[k], plain[k]) for k in plain)
