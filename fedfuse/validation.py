"""Checks a client update must pass before any aggregation or fusion sees it."""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from numbers import Number

import torch

__all__ = [
    "check_known_args",
    "check_update", "non_finite", "single_threaded", "check_num_examples", "check_reply_size", "check_strategy_args",
    "MAX_NUM_EXAMPLES", "MAX_REPLY_FACTOR", "negative_variance", "is_variance", "valid_variance",
]  # fmt: skip

MAX_NUM_EXAMPLES = 1e9  # default bound on a reply's num-examples (its aggregation weight)
MAX_REPLY_FACTOR = 2.0  # default bound on a reply's serialised bytes, relative to the model sent

ShapeCheck = Callable[[str, tuple[int, ...], tuple[int, ...]], bool]


def check_reply_size(
    sizes: Mapping[str, int], reference: Mapping[str, torch.Tensor], max_factor: float = MAX_REPLY_FACTOR
) -> str | None:
    """Why a reply whose arrays serialise to ``sizes`` bytes (key → bytes) is refused before it is decoded:
    keys ``reference`` lacks, or Σ sizes > ``max_factor`` · Σ (raw bytes + 256) of ``reference`` (256 bytes
    per array cover the serialisation header; .npy uses 128). None when it may be decoded."""
    extra = sorted(k for k in sizes if k not in reference)
    if extra:
        return f"unexpected key(s) {extra[:3]}"
    limit = max_factor * sum(t.numel() * t.element_size() + 256 for t in reference.values())
    size = sum(sizes.values())
    if size > limit:
        return f"reply of {size} bytes exceeds {max_factor:g} × the sent model ({limit:.0f} bytes)"
    return None


def check_update(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    num_examples: object,
    *,
    shape_ok: ShapeCheck | None = None,
    max_num_examples: float = MAX_NUM_EXAMPLES,
) -> str | None:
    """Why ``state`` cannot be aggregated against the global ``reference``, or None when it can.

    Rules: the same keys; the same dtype per key; the same shape per key (or, with width
    heterogeneity, ``shape_ok(key, shape, reference_shape)``); every value finite; every running variance
    ``>= 0``; ``num_examples``
    a positive integer <= ``max_num_examples``. Never raises on a malformed reply: every fault is a reason.
    """
    reason = check_num_examples(num_examples, max_num_examples)
    if reason is not None:
        return reason
    with single_threaded():
        return _check_arrays(state, reference, shape_ok)


def _check_arrays(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], shape_ok: ShapeCheck | None
) -> str | None:
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing:
        return f"missing key(s) {missing[:3]}"
    if extra:
        return f"unexpected key(s) {extra[:3]}"
    for key, ref in reference.items():
        value = state[key]
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype} != {ref.dtype}"
        shape, ref_shape = tuple(value.shape), tuple(ref.shape)
        if shape != ref_shape and not (shape_ok is not None and shape_ok(key, shape, ref_shape)):
            return f"{key}: shape {shape} != {ref_shape}"
    bad = non_finite(state)
    if bad is not None:
        return f"{bad[0]}: {bad[1]} non-finite value(s)"
    bad = negative_variance(state)
    if bad is not None:
        return f"{bad[0]}: {bad[1]} negative value(s) (a running variance is >= 0)"
    return None


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread inside: the server's checks are many small reductions, which intra-op threads only slow
    down (on a busy machine by 10× and more, ``benchmarks/sim_overhead.py``)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def non_finite(state: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """The first floating-point entry of ``state`` holding NaN or ±inf and how many it holds, or None.

    One reduction per tensor instead of an elementwise mask: Σ v (accumulated in float64) is finite iff every v is,
    unless finite values overflow the sum, which the exact per-element check of the suspect tensors rules out.
    """
    floats = [(k, v.detach()) for k, v in state.items() if v.is_floating_point()]
    if not floats:
        return None
    sums = torch.stack([v.sum(dtype=torch.float64) for _, v in floats])
    if bool(torch.isfinite(sums).all()):
        return None
    for (key, value), total in zip(floats, sums.tolist(), strict=True):
        if not math.isfinite(total):
            bad = int(value.numel() - torch.isfinite(value).sum())
            if bad:
                return key, bad
    return None


def is_variance(key: str) -> bool:
    """Whether state entry ``key`` is a normalisation layer's running variance (``*running_var``: BatchNorm,
    InstanceNorm), which must stay ``>= 0`` (:func:`negative_variance`)."""
    return key.endswith("running_var")


def valid_variance(key: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` clamped at 0 where ``key`` is a running variance (:func:`is_variance`), else ``value`` itself:
    what a moved, projected or simulated state does to stay a valid reply."""
    return value.clamp(min=0) if is_variance(key) else value


def negative_variance(state: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """The first normalisation running variance (a ``*running_var`` entry: BatchNorm, InstanceNorm) of ``state``
    with entries ``< 0`` and how many, or None. ``σ² < 0`` is no statistic any client can measure; BatchNorm
    would divide by ``√(σ² + ε)`` of it and turn every output NaN."""
    for key, value in state.items():
        if is_variance(key) and value.is_floating_point() and value.numel() and float(value.min()) < 0:
            return key, int((value < 0).sum())
    return None


def check_num_examples(num_examples: object, max_num_examples: float = MAX_NUM_EXAMPLES) -> str | None:
    """Why ``num_examples`` is not a usable aggregation weight (a positive integer <= the bound), or None."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, Number):
        return f"num-examples={num_examples!r} is not a number"
    try:
        value = float(num_examples)  # type: ignore[arg-type]
    except OverflowError:
        return f"num-examples={num_examples!r} exceeds the limit {max_num_examples:g}"
    except (TypeError, ValueError):  # complex, exotic Number types
        return f"num-examples={num_examples!r} is not a real number"
    if not math.isfinite(value):
        return f"num-examples={num_examples!r} is not finite"
    if value <= 0 or value != math.floor(value):
        return f"num-examples={num_examples!r} is not a positive integer"
    if value > max_num_examples:
        return f"num-examples={num_examples!r} exceeds the limit {max_num_examples:g}"
    return None


def check_strategy_args(
    seed: object, fedavg_kwargs: Mapping[str, object], max_num_examples: object, max_reply_factor: object,
    distill_epochs: object, server_data: object, distill_model: object,
) -> None:  # fmt: skip
    """A :class:`~fedfuse.errors.ConfigError` naming the first out-of-range argument of a fedfuse strategy
    (FedAvg's fractions and node minimums, the seed, the reply limits, FedDF's distillation), else None."""
    from fedfuse.errors import ConfigError

    if isinstance(distill_epochs, bool) or int(distill_epochs) < 0:  # type: ignore[call-overload]
        raise ConfigError(f"distill_epochs={distill_epochs!r} is out of range; allowed: an integer >= 0 (0 = off)")
    if int(distill_epochs) and (server_data is None or len(server_data) < 2 or distill_model is None):  # type: ignore[arg-type]
        raise ConfigError(
            f"distill-epochs={distill_epochs} needs server-data >= 2 (unlabeled inputs the server holds) and the model"
        )
    for name in ("fraction_train", "fraction_evaluate"):
        value = fedavg_kwargs.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"{name}={value!r} is out of range; allowed: a number in [0, 1]")
    counts = [*((n, fedavg_kwargs.get(n, 2)) for n in ("min_train_nodes", "min_available_nodes")), ("seed", seed)]
    for name, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}={value!r} is out of range; allowed: an integer >= 0")
    for name, value in (("max_num_examples", max_num_examples), ("max_reply_factor", max_reply_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
            raise ConfigError(f"{name}={value!r} is out of range; allowed: a number > 0")


def check_known_args(
    strategy: object, parent_init: Callable[..., object], kwargs: Mapping[str, object], also: Iterable[str] = ()
) -> None:
    """A ConfigError naming the first keyword that ``parent_init`` (the base class's ``__init__``, e.g. Flower's
    FedAvg) does not take, with the nearest name among those and every ``__init__`` of ``strategy``'s classes
    and ``also`` (e.g. the run option ``fusion-solver`` is the argument ``solver``); else None."""
    params = inspect.signature(parent_init).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params]
    if not unknown:
        return
    names = set(params) | set(also)
    for cls in type(strategy).__mro__:
        if "__init__" in vars(cls):
            names |= set(inspect.signature(vars(cls)["__init__"]).parameters)
    allowed = sorted(names - {"self", "args", "kwargs"})
    from fedfuse.errors import ConfigError

    near = difflib.get_close_matches(unknown[0], allowed, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"allowed: {', '.join(allowed)}"
    raise ConfigError(f"{type(strategy).__name__} takes no argument {unknown[0]}={kwargs[unknown[0]]!r}; {hint}")
