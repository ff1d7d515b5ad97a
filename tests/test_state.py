"""fedfuse.state: weight normalisation, the float64 weighted average, interpolation, thread control."""

from __future__ import annotations

import math

import pytest
import torch

from fedfuse import state as state_mod
from fedfuse.errors import ConfigError
from fedfuse.state import (
    caller_threads,
    interpolate,
    normalise_weights,
    single_threaded,
    threaded_matmul,
    torch_threads,
    weighted_average,
)


def _states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(7, 5, generator=gen),
            "b": torch.randn(7, generator=gen) * 1e3,
            "h": torch.randn(4, generator=gen).half(),
            "n": torch.tensor(10 + i),
        }
        for i in range(n)
    ]


def _old_server_fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """strategies/base.py::FedFuseStrategy.aggregate_arrays before it called weighted_average (the reference)."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        if not torch.is_floating_point(ref):
            out[key] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (w / total)
        out[key] = acc.to(ref.dtype)
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10])
def test_weighted_average_of_identical_states_is_exact(n: int) -> None:
    # Prepare
    state = _states(1, seed=n)[0]
    weights = [float(i % 4 + 1) * 37 for i in range(n)]
    # Execute
    avg = weighted_average([state] * n, weights)
    uniform = weighted_average([state] * n)
    # Assert
    for out in (avg, uniform):
        for k, v in state.items():
            assert out[k].dtype == v.dtype
            assert torch.equal(out[k], v), k


@pytest.mark.parametrize("weights", [[1, 1, 1, 1, 1], [120, 37, 5, 999, 64], [0.1, 0.2, 0.3, 0.15, 0.25]])
def test_weighted_average_is_bit_identical_to_the_old_server_fedavg(weights: list[float]) -> None:
    states = _states(5, seed=3)
    new, old = weighted_average(states, weights), _old_server_fedavg(states, weights)
    assert list(new) == list(old)
    for k in old:
        assert new[k].dtype == old[k].dtype and torch.equal(new[k], old[k]), k


@pytest.mark.parametrize("chunk", [1 << 16, 64, 7])
def test_chunked_weighted_average_is_bit_identical_to_the_plain_formula(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large CPU entries are averaged a chunk at a time: the same bits as ``Σ θᵢ.double()·λᵢ`` cast back."""
    # Prepare: entries above and below the chunk size (a ragged last chunk), float32/16/64, one non-contiguous
    monkeypatch.setattr(state_mod, "AVERAGE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(5)
    shapes = {"big": (301, 457), "conv": (17, 9, 5, 5), "small": (3,)}
    states = [{k: torch.randn(s, generator=gen) * 10 ** (i - 1) for k, s in shapes.items()} for i in range(4)]
    for i, s in enumerate(states):
        s["half"] = torch.randn(130, generator=gen).half()
        s["f64"] = torch.randn(99, generator=gen, dtype=torch.float64)
        s["t"] = torch.randn(40, 30, generator=gen).T  # not contiguous: the plain loop
        s["n"] = torch.tensor(i)
    weights = [3.0, 0.7, 11.0, 1e-3]
    lam = [w / sum(weights) for w in weights]
    # Execute
    avg = weighted_average(states, weights, ref=2)
    # Assert
    for k, v in states[2].items():
        if not torch.is_floating_point(v):
            assert torch.equal(avg[k], v)
            continue
        acc = torch.zeros(v.shape, dtype=torch.float64)
        for s, w in zip(states, lam, strict=True):
            acc += s[k].double() * w
        assert avg[k].dtype == v.dtype and avg[k].shape == v.shape
        assert torch.equal(avg[k], acc.to(v.dtype)), k


def test_weighted_average_values_integer_buffers_and_ref() -> None:
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 8.0]), "n": torch.tensor(9)}
    avg = weighted_average([a, b], [3, 1])
    assert torch.equal(avg["w"], torch.tensor([0.5, 5.0])) and int(avg["n"]) == 3
    assert int(weighted_average([a, b], [3, 1], ref=1)["n"]) == 9  # integer buffers come from states[ref]
    assert torch.equal(weighted_average([a, b], [1, 0])["w"], a["w"])


def test_weighted_average_rejects_mismatched_states() -> None:
    a = {"w": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ConfigError, match=r"missing \['b'\]"):
        weighted_average([a, {"w": torch.zeros(2)}])
    with pytest.raises(ConfigError, match=r"'b' has shape \(4,\)"):
        weighted_average([a, {"w": torch.zeros(2), "b": torch.zeros(4)}])
    with pytest.raises(ConfigError, match="at least one"):
        weighted_average([])
    with pytest.raises(ConfigError, match="ref=2"):
        weighted_average([a, a], ref=2)


def test_normalise_weights() -> None:
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([1, 3], 2) == [0.25, 0.75]
    for bad, what in (([1.0], "1 entries"), ([1.0, -1.0], "-1.0"), ([0, 0], "not all zero"), ([1, math.nan], "nan")):
        with pytest.raises(ConfigError, match=what):
            normalise_weights(bad, 2)
    with pytest.raises(ConfigError, match="inf"):
        normalise_weights([1.0, math.inf], 2)
    with pytest.raises(ConfigError, match="must be numbers"):
        normalise_weights(["a", 1], 2)  # type: ignore[list-item]


def test_interpolate_is_exact_at_the_ends() -> None:
    a, b = _states(2, seed=5)
    assert all(torch.equal(interpolate(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.equal(interpolate(a, b, 1.0)[k], b[k]) for k in a if k != "n")
    assert int(interpolate(a, b, 1.0)["n"]) == int(a["n"])


def test_thread_guards_restore_the_thread_count() -> None:
    before = torch.get_num_threads()

    @single_threaded()
    def inner() -> int:
        return torch.get_num_threads()

    with torch_threads(2):
        assert torch.get_num_threads() == 2
        assert inner() == 1 and inner() == 1  # the decorator's guard is recreated per call
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_single_threaded_keeps_the_outermost_callers_thread_count() -> None:
    with torch_threads(2):
        assert caller_threads() == 2  # outside a guard: the current count
        with single_threaded():
            assert torch.get_num_threads() == 1 and caller_threads() == 2
            with single_threaded():  # nested: still the outermost caller's count, not the guard's 1
                assert caller_threads() == 2
            assert caller_threads() == 2
        assert caller_threads() == 2
    with torch_threads(1), single_threaded():
        assert caller_threads() == 1


def test_threaded_matmul_uses_the_callers_threads_only_for_large_products(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return torch.mm(a, b)

    gen = torch.Generator().manual_seed(0)
    small, big = torch.randn(8, 8, generator=gen), torch.randn(64, 64, generator=gen)
    monkeypatch.setattr(state_mod, "GEMM_THREADS_MIN_MACS", 64**3)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__matmul__", spy)
        with torch_threads(2), single_threaded():
            out_small, out_big = threaded_matmul(small, small), threaded_matmul(big, big)
            assert torch.get_num_threads() == 1  # restored after the threaded product
        threaded_matmul(big, big)  # outside a guard: as the caller set it
    assert seen == [1, 2, torch.get_num_threads()]
    assert torch.equal(out_small, small @ small) and torch.equal(out_big, big @ big)
