"""Reading a client's train reply: the one unpacking every strategy and every round observer uses.

Duck-typed on Flower's ``Message`` (``msg.content.array_records`` / ``metric_records``, ``ArrayRecord[key].data``
and ``.to_torch_state_dict()``; :func:`decode_arrays` reads the same bytes faster), so the core never imports Flower.
Checks, in order, none of which raises on a malformed reply: one ArrayRecord + one MetricRecord, the weight key,
the size limit BEFORE decoding (:func:`fedfuse.validation.check_reply_size`), decoding, then
:func:`fedfuse.validation.check_update` against the model sent to that client.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from fedfuse.state import state_bytes
from fedfuse.validation import MAX_NUM_EXAMPLES, MAX_REPLY_FACTOR, check_reply_size, check_update

__all__ = ["Reply", "unpack_reply", "reply_size_reason", "error_summary", "decode_arrays", "traffic", "LOCAL_STEPS"]

LOCAL_STEPS = "local-steps"  # the optimiser steps a client reports (fedfuse clients do; others may not)
State = dict[str, torch.Tensor]

_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.+?)\s*$")
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")


class Reply(NamedTuple):
    """A valid train reply: the full state, the claimed num-examples, the claimed local steps (None if absent)."""

    state: State
    weight: float
    steps: float | None


def traffic(sent: Sequence[Mapping[str, torch.Tensor]], replies: Sequence[object]) -> dict[str, float]:
    """A round's array bytes: ``bytes_down`` what each answering node was sent, ``bytes_up`` what the valid replies
    (:class:`Reply`) hold — what a full-model FedAvg round moves, for comparing with the LoRA strategies' own."""
    up = sum(state_bytes(r.state) for r in replies if isinstance(r, Reply))
    return {"bytes_down": float(sum(state_bytes(s) for s in sent)), "bytes_up": float(up)}


def error_summary(reason: str | None) -> str:
    """One line of an error reply's reason (often a whole traceback, under Ray wrapped twice): the client's
    own ``Type: message`` line where there is one, else the last line."""
    lines = [ln for ln in (reason or "").splitlines() if ln.strip()]
    found = [m for ln in lines if (m := _EXC_LINE.match(ln))]
    own = [m for m in found if not any(w in m.group(1) for w in _WRAPPERS)]
    if own:
        return f"{own[-1].group(1).rsplit('.', 1)[-1]}: {own[-1].group(2)}"
    return lines[-1].strip() if lines else "no reason given"


def reply_size_reason(
    record: Any, sent: Mapping[str, torch.Tensor], max_factor: float = MAX_REPLY_FACTOR
) -> str | None:
    """:func:`fedfuse.validation.check_reply_size` on a reply's serialised arrays (an ``ArrayRecord``), before
    anything is decoded (so a reply cannot make the server allocate much)."""
    sizes = {}
    for key in record.keys():
        data = getattr(record[key], "data", None)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return f"{key}: not a serialised array"
        sizes[key] = len(data)
    return check_reply_size(sizes, sent, max_factor)


_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}  # .npy header bytes -> (dtype, shape, data offset)


def _npy_layout(data: bytes | bytearray | memoryview) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, offset of the first element) of the C-ordered, pickle-free ``.npy`` bytes ``data``, or None
    (Fortran order, object dtype, not ``.npy``). Each distinct header is parsed once, by numpy's own reader; a
    round's arrays repeat the same few headers, so later calls are one dict lookup (``np.load`` re-parses the header
    text with ``ast.literal_eval`` every time: most of what decoding a small model costs)."""
    view = memoryview(data)
    if len(view) < 10 or bytes(view[:6]) != b"\x93NUMPY":
        return None
    major = view[6]
    start = 10 if major == 1 else 12
    if len(view) < start:
        return None
    hlen = int.from_bytes(view[8:start], "little")
    key = bytes(view[: start + hlen])
    layout = _HEADERS.get(key)
    if layout is None:
        import io

        fh = io.BytesIO(key)
        try:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)  # numpy's own checked parser
        except (ValueError, TypeError, SyntaxError):
            return None
        if fortran or dtype.hasobject:
            return None
        if len(_HEADERS) > 4096:  # bounded: a model has one header per distinct (dtype, shape)
            _HEADERS.clear()
        layout = _HEADERS[key] = (dtype, tuple(int(d) for d in shape), len(key))
    return layout


def decode_arrays(record: Any) -> dict[str, torch.Tensor]:
    """An ``ArrayRecord`` (numpy-serialised arrays) as a state dict of fresh CPU tensors — what
    ``record.to_torch_state_dict()`` returns, the same values and dtypes, decoded through a header cache; an array this
    cannot read (another serialisation, Fortran order, too few bytes) is decoded by the record's own method."""
    out: dict[str, torch.Tensor] = OrderedDict()
    for key in list(record.keys()):
        arr = record[key]
        data = getattr(arr, "data", None)
        layout = _npy_layout(data) if getattr(arr, "stype", None) == "numpy.ndarray" and data is not None else None
        if layout is not None:
            dtype, shape, offset = layout
            count = math.prod(shape)
            if len(data) - offset >= count * dtype.itemsize:
                flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
                out[key] = torch.from_numpy(flat.reshape(shape).copy())
                continue
        out[key] = torch.from_numpy(arr.numpy())
    return out


def _steps(metrics: Mapping[str, Any]) -> float | None:
    value = metrics.get(LOCAL_STEPS)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _frozen_changed(state: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` fails to return a ``frozen`` entry as it was sent (dtype, shape and every bit), or None."""
    for key in (k for k in frozen if k in state):
        got, ref = state[key], frozen[key]
        if got.dtype != ref.dtype or got.shape != ref.shape or not torch.equal(got, ref):
            return f"{key}: a frozen entry it was sent came back changed (return it unchanged, or not at all)"
    return None


def unpack_reply(
    msg: Any,
    sent: Mapping[str, torch.Tensor],
    weighted_by_key: str,
    *,
    max_reply_factor: float = MAX_REPLY_FACTOR,
    max_num_examples: float = MAX_NUM_EXAMPLES,
    shape_ok: Any = None,
    complete: bool = False,
    frozen: Mapping[str, torch.Tensor] | None = None,
) -> Reply | str:
    """The :class:`Reply` of a train reply ``msg``, or why it is rejected; never raises. ``complete``: a reply
    with only some of the keys is completed with the ``sent`` model (what a round observer looks at).
    ``frozen``: entries the node was sent to use, not to train (a LoRA node's base weights once the server folds
    updates into them); a reply may send them back, bit for bit, and they are dropped."""
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return "expected exactly one ArrayRecord and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    if weighted_by_key not in metrics:
        return f"MetricRecord lacks {weighted_by_key!r}"
    record = next(iter(content.array_records.values()))
    frozen = frozen or {}
    reason = reply_size_reason(record, {**sent, **frozen}, max_reply_factor)
    if reason is not None:
        return reason
    try:
        state = decode_arrays(record)
    except Exception as exc:  # noqa: BLE001 — undecodable arrays are a bad update, not a crash
        return f"arrays cannot be decoded ({type(exc).__name__})"
    reason = _frozen_changed(state, frozen)
    if reason is not None:
        return reason
    state = {k: v for k, v in state.items() if k not in frozen}
    if complete:
        state = {**sent, **state}
    weight = metrics[weighted_by_key]
    reason = check_update(state, sent, weight, shape_ok=shape_ok, max_num_examples=max_num_examples)
    if reason is not None:
        return reason
    state = {k: state[k] for k in sent}  # the sent model's key order: every flat view lines up coordinate by coordinate
    return Reply(state, float(weight), _steps(metrics))  # type: ignore[arg-type]
