"""The gate (a derived spec proves itself before any use) and the rules for parametrized and tied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from fedfuse.align import derive_spec, fuse
from fedfuse.align import gate as gate_mod
from fedfuse.align.gate import coverage, verify_spec
from fedfuse.align.rules import register_leaf_rule
from fedfuse.align.rules.core import LEAF_RULES, MODULE_RULES
from fedfuse.align.rules.layers import elementwise
from fedfuse.align.selfcheck import selfcheck
from fedfuse.align.spec import UnsupportedModelError
from fedfuse.align.transport import permute_model


class NormedMLP(nn.Module):
    def __init__(self, wrap=weight_norm) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = wrap(nn.Linear(5, 7)), wrap(nn.Linear(7, 6)), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class SpectralCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = spectral_norm(nn.Conv2d(2, 4, 3)), spectral_norm(nn.Conv2d(4, 5, 3))
        self.fc = spectral_norm(nn.Linear(5 * 2 * 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class WordLM(nn.Module):
    """The classic word LM: tied encoder/decoder around an LSTM."""

    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.encoder, self.rnn, self.decoder = nn.Embedding(vocab, d), nn.LSTM(d, d, 2), nn.Linear(d, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rnn(self.encoder(x))[0])


def _fused_is_exact(model: nn.Module, x: torch.Tensor) -> None:
    """Two independent initialisations fuse without error; a permuted copy fuses back to the model's function."""
    torch.manual_seed(1)
    fuse([model, type(model)()], method="match", example_input=x)  # passes the gate
    spec = derive_spec(model, x)
    permuted, _ = permute_model(model, spec, seed=3)
    with torch.no_grad():
        ref = model.eval()(x)
        assert (permuted.eval()(x) - ref).abs().max() < 1e-5 * ref.abs().max()
        for method in ("match", "wb"):
            out = fuse([model, permuted], method=method, spec=spec, init=0, max_iter=1)
            net = type(model)()
            net.load_state_dict(out)
            assert (net.eval()(x) - ref).abs().max() < 1e-5 * ref.abs().max(), method


def test_weight_norm_mlp_moves_its_originals_and_fuses_exactly() -> None:
    torch.manual_seed(0)
    model, x = NormedMLP(), torch.randn(4, 5)
    spec = derive_spec(model, x)
    members = {(m.key, m.axis) for m in spec["fc1"].members}
    assert {("fc1.parametrizations.weight.original0", 0), ("fc1.parametrizations.weight.original1", 0)} <= members
    assert ("fc2.parametrizations.weight.original1", 1) in members
    assert ("fc2.parametrizations.weight.original0", 1) not in members  # g has length 1 there: the norm is a sum
    assert coverage(model, spec).untouched == []
    _fused_is_exact(model, x)


def test_hook_based_weight_norm_moves_g_and_v() -> None:
    with pytest.warns(FutureWarning):
        fc1, fc2 = nn.utils.weight_norm(nn.Linear(5, 7)), nn.utils.weight_norm(nn.Linear(7, 6), dim=None)
    model = nn.Sequential(fc1, nn.ReLU(), fc2, nn.ReLU(), nn.Linear(6, 2))
    res = selfcheck(model, torch.randn(3, 5))
    assert res.ok and res.permuted_err < 1e-10 and res.axis_share == pytest.approx(4 / 6) and not res.untouched


def test_without_the_parametrization_rule_the_gate_refuses_what_was_silently_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedfuse.align.spec as spec_mod

    monkeypatch.setattr(spec_mod, "parametrized_weights", lambda model: {})  # the derivation before the rule
    monkeypatch.setattr(gate_mod, "_CACHE", type(gate_mod._CACHE)())
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    with pytest.raises(UnsupportedModelError, match="not exact") as exc:
        fuse([NormedMLP(), NormedMLP()], method="match", example_input=x)
    line = str(exc.value)
    assert "\n" not in line and "group(s) 'fc1', 'fc2'" in line
    assert "untouched beside them: fc1.parametrizations.weight.original0" in line
    res = selfcheck(NormedMLP(), x)
    assert not res.ok and "fc2.parametrizations.weight.original1" in res.untouched


@pytest.mark.parametrize("train", [False, True])
def test_spectral_norm_moves_u_and_v_exactly(train: bool) -> None:
    torch.manual_seed(0)
    model, x = SpectralCNN(), torch.randn(3, 2, 6, 6)
    spec = derive_spec(model, x)
    keys = {m.key for g in spec for m in g.members}
    assert {"c1.parametrizations.weight.0._u", "c2.parametrizations.weight.0._v"} <= keys
    permuted, _ = permute_model(model, spec, seed=2)
    model.train(train), permuted.train(train)
    with torch.no_grad():  # training mode runs a power iteration: it commutes with the permutation too
        ref = model(x)
        assert (permuted(x) - ref).abs().max() < 1e-5 * ref.abs().max()
    verify_spec(model.eval(), spec, x)
    assert coverage(model, spec).untouched == []  # the first layer's v (input side) is mentioned, kept fixed


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.flip(0)  # mixes the weight's rows: no permutation of the originals is known to commute


def test_unknown_parametrization_is_refused_in_one_line() -> None:
    model = NormedMLP(wrap=lambda m: m)
    parametrize.register_parametrization(model.fc2, "weight", _Double())
    with pytest.raises(UnsupportedModelError, match="parametrization _Double on 'fc2.weight'") as exc:
        fuse([model, model], method="match", example_input=torch.randn(2, 5))
    assert "\n" not in str(exc.value)


def test_tied_word_lm_is_exact_and_the_tie_joins_constraints(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model, x = WordLM(), torch.randint(0, 11, (5, 2))
    # the Embedding rule: the width is a group that the tie joins with the decoder's columns and the last LSTM layer
    spec = derive_spec(model, x)
    tied = next({(m.key, m.axis) for m in g.members} for g in spec if any(m.key == "encoder.weight" for m in g.members))
    assert {("encoder.weight", 1), ("decoder.weight", 1), ("rnn.weight_ih_l0", 1), ("rnn.weight_hh_l1", 0)} <= tied
    res = selfcheck(model, x)
    assert res.ok and res.permuted_err < 1e-10

    # without an Embedding rule the encoder keeps its width fixed: the decoder's columns (and the last LSTM layer)
    # must stay put too, not move through the alias alone (silently wrong before the tie rule)
    monkeypatch.delitem(MODULE_RULES, nn.Embedding)
    spec = derive_spec(model, x)
    assert all(m.key not in ("encoder.weight", "decoder.weight") for g in spec for m in g.members)
    res = selfcheck(model, x)
    assert res.ok and res.permuted_err < 1e-10 and 0 < res.axis_share < 1


def test_without_the_tie_rule_the_gate_refuses_the_word_lm(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedfuse.align.spec as spec_mod

    monkeypatch.setattr(spec_mod, "tie_constraints", lambda d, state: None)  # the derivation before the rule
    monkeypatch.delitem(MODULE_RULES, nn.Embedding)  # and before the Embedding rule: only the decoder's side moves
    monkeypatch.setattr(gate_mod, "_CACHE", type(gate_mod._CACHE)())
    x = torch.randint(0, 11, (5, 2))
    with pytest.raises(UnsupportedModelError, match=r"not exact .*group\(s\) 'rnn.l1'.*decoder\.weight"):
        fuse([WordLM(), WordLM()], method="wb", example_input=x)


class _Mix(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)


class MixedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mix, self.fc2 = nn.Linear(4, 6), _Mix(), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.mix(self.fc1(x)))


def test_a_wrong_rule_is_caught_by_the_gate_naming_the_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_mod, "_CACHE", type(gate_mod._CACHE)())
    register_leaf_rule(_Mix, elementwise)  # wrong on purpose: flip mixes the units
    try:
        x = torch.randn(3, 4)
        with pytest.raises(UnsupportedModelError, match=r"not exact .*group\(s\) 'fc1'.*fc1\.weight") as exc:
            fuse([MixedMLP(), MixedMLP()], method="wb", example_input=x)
        assert "\n" not in str(exc.value)
        assert not selfcheck(MixedMLP(), x).ok
    finally:
        LEAF_RULES.pop(f"{_Mix.__module__}.{_Mix.__qualname__}")


class Rolled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.roll(torch.relu(self.fc1(x)), 1, -1))  # rolling the units fixes them


def test_hidden_units_but_nothing_aligned_is_refused_never_ok() -> None:
    x = torch.randn(3, 4)
    res = selfcheck(Rolled(), x)
    assert res.groups == 0 and not res.ok and "nothing to align in Rolled" in res.nothing_aligned
    with pytest.raises(UnsupportedModelError, match="0 hidden-unit groups .* 2 weight layers"):
        fuse([Rolled(), Rolled()], method="match", example_input=x)
    fuse([Rolled(), Rolled()], method="average")  # a plain average stays allowed


def test_gate_runs_once_per_model_class_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = gate_mod._verdict
    monkeypatch.setattr(gate_mod, "_CACHE", type(gate_mod._CACHE)())
    monkeypatch.setattr(gate_mod, "_verdict", lambda *a: calls.append("v") or real(*a))
    x = torch.randn(2, 5)
    for seed in range(3):  # three "rounds" with fresh weights
        torch.manual_seed(seed)
        fuse([NormedMLP(), NormedMLP()], method="match", example_input=x)
    assert calls == ["v"]


def test_selfcheck_reports_the_share_that_moves() -> None:
    res = selfcheck(NormedMLP(), torch.randn(2, 5))
    # 3 layers, 6 weight axes: fc1 in (the input) and fc3 out (the classes) never move
    assert res.ok and res.axis_share == pytest.approx(4 / 6)
    assert 0.5 < res.param_share <= 1.0 and res.untouched == []


def test_a_hand_written_spec_is_gated_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfuse.align.spec import Axis, Group, TransportSpec

    monkeypatch.setattr(gate_mod, "_CACHE", type(gate_mod._CACHE)())
    monkeypatch.setattr(gate_mod, "_PASSED", type(gate_mod._PASSED)())
    model, x = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(2, 4)
    rows = (Axis("0.weight", 0), Axis("0.bias", 0))
    wrong = TransportSpec((Group("h", 6, rows),))  # forgets the next layer's input columns
    with pytest.raises(UnsupportedModelError, match=r"the given spec of Sequential is not exact.*'h'.*fix its"):
        fuse([model, nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))], method="match", spec=wrong)
    right = TransportSpec((Group("h", 6, (*rows, Axis("2.weight", 1, "in"))),))
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    permuted, _ = permute_model(model, right, seed=2)
    fused = fuse([model, permuted], method="match", spec=right, example_input=x)
    torch.testing.assert_close(fused["2.weight"], model.state_dict()["2.weight"])
    calls: list[str] = []
    real = gate_mod._verdict
    monkeypatch.setattr(gate_mod, "_verdict", lambda *a: calls.append("v") or real(*a))
    fuse([model, other], method="match", spec=right)  # passed once for this class and shapes: not re-run
    assert calls == []
    states = [model.state_dict(), other.state_dict()]
    fuse(states, method="match", spec=wrong)  # state dicts alone carry no function to check: the user's word


def test_a_model_too_large_for_float64_is_gated_in_float32_to_its_own_tolerance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above GATE_F64_MAX_PARAMS the gate's two copies are float32: an exact spec passes there (its permuted copy
    differs by ~1e-6, more than the float64 tolerance), a wrong rule is still refused naming its parameters."""
    monkeypatch.setattr(gate_mod, "_CACHE", type(gate_mod._CACHE)())
    monkeypatch.setattr(gate_mod, "GATE_F64_MAX_PARAMS", 10)
    dtypes: list[bool] = []
    real = gate_mod.permutation_error
    monkeypatch.setattr(gate_mod, "permutation_error", lambda *a, **k: dtypes.append(k["float64"]) or real(*a, **k))
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU())])
    x = torch.randn(8, 256)
    total, _ = real(gate_mod._probe(deep, x, 1), derive_spec(deep, x), x, float64=False)
    assert 0 < total < gate_mod.GATE_RTOL_F32
    # float32 rounding of this deep net is ~1e-6 (5e-7 on an Intel VM, above 1e-6 on an AMD one): put the float64
    # tolerance below it on every machine, so that a float32 gate held to the float64 tolerance would refuse it
    monkeypatch.setattr(gate_mod, "GATE_RTOL", total / 10)
    fuse([deep, deep], method="match", example_input=x)  # passes the gate
    assert dtypes == [False]
    register_leaf_rule(_Mix, elementwise)  # wrong on purpose, as in the test above
    try:
        with pytest.raises(UnsupportedModelError, match=r"not exact .*group\(s\) 'fc1'.*fc1\.weight"):
            fuse([MixedMLP(), MixedMLP()], method="wb", example_input=torch.randn(3, 4))
        assert dtypes == [False, False]
    finally:
        LEAF_RULES.pop(f"{_Mix.__module__}.{_Mix.__qualname__}")
