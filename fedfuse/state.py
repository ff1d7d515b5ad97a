"""State-dict arithmetic, written once: weight normalisation, weighted average, interpolation, thread control.

Every averaging path of fedfuse goes through :func:`weighted_average` — the server's FedAvg, fusion
(``fedfuse.align``), the LMC barriers and monitor (``fedfuse.lmc``) — so they agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from fedfuse.errors import ConfigError

__all__ = [
    "State",
    "normalise_weights",
    "check_compatible",
    "weighted_average",
    "interpolate",
    "state_bytes",
    "torch_threads",
    "single_threaded",
    "caller_threads",
    "threaded_matmul",
]

State = Mapping[str, Tensor]


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """λᵢ = wᵢ / Σⱼ wⱼ for ``n`` states; ``None`` gives uniform weights 1/n.

    Raises ConfigError (naming the value) on a wrong length or a negative, non-finite or all-zero weight.
    """
    if n < 1:
        raise ConfigError("at least one state is needed")
    if weights is None:
        return [1.0 / n] * n
    try:
        w = [float(v) for v in weights]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"weights={weights!r} must be numbers ({exc})") from exc
    if len(w) != n:
        raise ConfigError(f"weights={w} has {len(w)} entries for {n} states")
    total = sum(w)
    if any(not math.isfinite(v) or v < 0 for v in w) or not math.isfinite(total) or total <= 0:
        raise ConfigError(f"weights={w} must be finite, >= 0 and not all zero")
    return [v / total for v in w]


def check_compatible(states: Sequence[State], ref: int = 0) -> None:
    """Every state has the keys and shapes of ``states[ref]`` (ConfigError naming the first offending key)."""
    base = states[ref]
    for i, s in enumerate(states):
        if i == ref:
            continue
        if set(s) != set(base):
            missing, extra = sorted(set(base) - set(s)), sorted(set(s) - set(base))
            raise ConfigError(
                f"state dict {i} has different keys than state dict {ref}: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for k, v in base.items():
            if tuple(s[k].shape) != tuple(v.shape):
                raise ConfigError(
                    f"state entry {k!r} has shape {tuple(s[k].shape)} in state dict {i} "
                    f"but {tuple(v.shape)} in state dict {ref}"
                )


def weighted_average(
    states: Sequence[State], weights: Sequence[float] | None = None, *, ref: int = 0
) -> dict[str, Tensor]:
    """θ = Σᵢ λᵢ θᵢ with λ = :func:`normalise_weights` (uniform by default), on floating tensors.

    Integer buffers (``num_batches_tracked``) are copied from ``states[ref]``, whose keys, order, device and
    dtypes the result takes. Each entry is accumulated in float64, in the given order of ``states``
    (``acc += θᵢ.double() · λᵢ``), and cast back to the dtype of ``states[ref]``. Why float64: the result then
    does not depend on the number of clients or the summation order at float32 precision (the rounding
    happens once, at the cast), and N identical float32 states average to exactly θ — the float64 sum is
    within about 2⁻⁵⁰ (relative) of θ, far inside half a float32 ulp, so the cast returns θ. The server's
    FedAvg uses this same loop, so fused, monitored and served averages are bit-identical.
    """
    if not states:
        raise ConfigError("weighted_average needs at least one state dict")
    lam = normalise_weights(weights, len(states))
    if not 0 <= int(ref) < len(states):
        raise ConfigError(f"ref={ref} is not a state index (0..{len(states) - 1})")
    check_compatible(states, int(ref))
    out: dict[str, Tensor] = {}
    for k, v in states[int(ref)].items():
        v = v.detach()
        if not torch.is_floating_point(v):
            out[k] = v.clone()
            continue
        parts = [s[k].detach() for s in states]
        if v.numel() > AVERAGE_CHUNK and all(p.device.type == "cpu" and p.is_contiguous() for p in [v, *parts]):
            out[k] = _average_chunked(parts, lam, v)
            continue
        acc = torch.zeros_like(v, dtype=torch.float64)
        term = torch.empty_like(acc)  # reused: the same float64 ops as acc += θᵢ.double() * λᵢ, fewer allocations
        for p, w in zip(parts, lam, strict=True):
            acc += term.copy_(p).mul_(w)
        out[k] = acc.to(v.dtype)
    return out


# Large CPU entries are averaged this many elements at a time (two float64 buffers of 512 KiB, cache-resident).
AVERAGE_CHUNK = 1 << 16


def _average_chunked(parts: list[Tensor], lam: list[float], like: Tensor) -> Tensor:
    """:func:`weighted_average`'s loop on one contiguous CPU entry, ``AVERAGE_CHUNK`` elements at a time: the same
    element-wise float64 operations in the same order (so the same bits) without two full-size float64 buffers."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format).view(-1)
    flat = [p.reshape(-1) for p in parts]
    acc_buf = torch.empty(AVERAGE_CHUNK, dtype=torch.float64)
    term_buf = torch.empty_like(acc_buf)
    for j in range(0, out.numel(), AVERAGE_CHUNK):
        m = min(AVERAGE_CHUNK, out.numel() - j)
        acc, term = acc_buf[:m].zero_(), term_buf[:m]
        for p, w in zip(flat, lam, strict=True):
            acc += term.copy_(p[j : j + m]).mul_(w)
        out[j : j + m].copy_(acc)
    return out.view(like.shape)


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """The bytes of ``state``'s arrays (``Σ numel × element size``): what sending it moves, before serialisation."""
    return sum(v.numel() * v.element_size() for v in state.values())


def interpolate(state_a: State, state_b: State, alpha: float, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """θ(α) = (1 − α)·θA + α·θB on ``keys`` (default: every float tensor); every other entry is copied from A.

    Integer buffers (``num_batches_tracked``) always come from A. Uses ``torch.lerp``, which returns θA
    exactly at α = 0 and θB exactly at α = 1, so a model interpolated with itself is unchanged.
    """
    check_compatible([state_a, state_b])
    chosen = set(state_a) if keys is None else set(keys)
    unknown = sorted(chosen - set(state_a))
    if unknown:
        raise ConfigError(f"keys not in the state dict: {unknown[:5]}")
    out: dict[str, Any] = {}
    for k, va in state_a.items():
        va = va.detach()
        if k in chosen and va.is_floating_point():
            out[k] = torch.lerp(va, state_b[k].detach().to(device=va.device, dtype=va.dtype), float(alpha))
        else:
            out[k] = va.clone()
    return out


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous setting.

    Float reductions are split per thread, so the thread count is part of what makes a result
    bit-reproducible: clients fix it (``client-threads``) whatever backend runs them.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# The thread count of the code that entered the outermost single_threaded() block (None outside one).
_CALLER_THREADS: ContextVar[int | None] = ContextVar("fedfuse_caller_threads", default=None)
# Products of at least this many multiply-adds run on the caller's threads inside single_threaded().
GEMM_THREADS_MIN_MACS = 1 << 24


@contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread for the block: ``with single_threaded(): ...`` or, as a decorator, ``@single_threaded()``.

    Alignment does thousands of small gathers/matmuls; OpenMP start-up and contention cost more than
    they save there (≈20× slower measured on a loaded 2-core CPU). The caller's thread count is kept
    (:func:`caller_threads`) for the few large products, which :func:`threaded_matmul` runs on it. As a
    decorator the guard is recreated on every call (``contextlib.ContextDecorator``), so decorated
    functions may nest and recurse; nested guards keep the outermost caller's count.
    """
    outer = _CALLER_THREADS.get()
    token = _CALLER_THREADS.set(outer if outer is not None else torch.get_num_threads())
    try:
        with torch_threads(1):
            yield
    finally:
        _CALLER_THREADS.reset(token)


def caller_threads() -> int:
    """The intra-op thread count outside the enclosing :func:`single_threaded` block (the current one outside)."""
    n = _CALLER_THREADS.get()
    return torch.get_num_threads() if n is None else n


def threaded_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; inside :func:`single_threaded`, on the caller's threads when it has ≥ ``GEMM_THREADS_MIN_MACS``
    multiply-adds (m·k·n): a large GEMM scales with threads where the small operations around it do not."""
    n = _CALLER_THREADS.get()
    big = n is not None and n > 1 and a.shape[0] * a.shape[-1] * b.shape[-1] >= GEMM_THREADS_MIN_MACS
    with torch_threads(n) if big else nullcontext():  # type: ignore[arg-type]
        return a @ b
