"""Does fedfuse handle a model exactly? Derive its spec, permute it randomly, and recover it by fusion.

:func:`selfcheck` answers with a :class:`CheckResult`: the spec derives (or the one-line reason it
cannot), a random permutation of every group leaves the outputs unchanged, and ``fuse([model, copy])``
with ``match`` and ``wb`` returns the model's function (outputs equal to ``rtol`` of their scale). Both run
one pass (``max_iter=1``: one WB iteration, one matching sweep after the layer-wise start): a permuted copy
must be recovered by the first pass.
:func:`break_symmetric_init` first makes the check meaningful on a freshly built model: builders zero-init
heads and layer scales, and untrained BatchNorm statistics can blow deep nets up, so a check on such a
model would compare zeros (or infinities).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedfuse.align.fusion import AlignmentError, fuse
from fedfuse.align.gate import F64_MAX_PARAMS, _rel_err, _verdict, break_symmetric_init, coverage, measuring
from fedfuse.align.inputs import call_model, first_tensor, map_floats
from fedfuse.align.spec import UnsupportedModelError, derive_spec
from fedfuse.align.transport import load_state, permute_model
from fedfuse.errors import ConfigError

__all__ = ["CheckResult", "F64_MAX_PARAMS", "break_symmetric_init", "selfcheck"]


@dataclass
class CheckResult:
    """Outcome of :func:`selfcheck`; ``*_err`` are max |Δ output| / max |output| (None: not run)."""

    derived: bool
    reason: str = ""
    groups: int = 0
    permuted_err: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rtol: float = 1e-4
    param_share: float = 0.0
    axis_share: float = 0.0
    untouched: list[str] = field(default_factory=list)
    nothing_aligned: str = ""

    @property
    def ok(self) -> bool:
        """Derived, permutation-invariant and recovered by every method — or refused with a reason. A model with
        hidden units but no group (``nothing_aligned``: fusion would be a plain average) is never ok."""
        if not self.derived:
            return bool(self.reason)
        return (
            not self.nothing_aligned
            and self.permuted_err is not None
            and self.permuted_err <= self.rtol
            and not self.failures
            and all(e <= self.rtol for e in self.errors.values())
        )


@torch.no_grad()
def selfcheck(
    model: nn.Module,
    example_input: Any,
    *,
    methods: tuple[str, ...] = ("match", "wb"),
    seed: int = 1,
    rtol: float = 1e-4,
    float64: bool | None = None,
) -> CheckResult:
    """Derive, permute, and recover ``model`` (eval mode) on ``example_input``; see :class:`CheckResult`.

    Outputs are compared in float64 (``float64=None``: for models up to ``F64_MAX_PARAMS`` parameters, one
    float64 network at a time); in float32 the rounding of a deep, wide model can exceed ``rtol`` by itself
    (RegNetY-128GF: 4.2e-4 between its own float32 and float64 outputs), so pass ``float64=True`` there.
    ``param_share``/``axis_share``/``untouched``: what the spec moves (:func:`fedfuse.align.gate.coverage`).
    """
    model = model.eval()
    t0 = time.perf_counter()
    try:
        spec = derive_spec(model, example_input)
    except UnsupportedModelError as exc:
        return CheckResult(False, str(exc).splitlines()[0], seconds={"derive": time.perf_counter() - t0})
    res = CheckResult(True, groups=len(spec.groups), rtol=rtol)
    res.seconds["derive"] = time.perf_counter() - t0
    cov = coverage(model, spec)
    res.param_share, res.axis_share, res.untouched = cov.param_share, cov.axis_share, cov.untouched
    if not spec.groups:
        res.nothing_aligned = _verdict(model, spec, example_input, seed)
    try:
        permuted, _ = permute_model(model, spec, seed=seed)
    except ConfigError as exc:  # an inconsistent spec (a derivation bug): report, do not crash a survey
        res.failures["permute"] = str(exc)
        return res
    # outputs in float64 where memory allows: float32 rounding, amplified by deep random nets, can reach 1e-4.
    # One network is built per evaluation and each fused state is dropped once scored: peak ≈ 5 copies of the
    # weights (model, permuted copy, fused state, float64 network), not 8 (a 630M-parameter model is 2.5 GB a copy)
    in_f64 = sum(p.numel() for p in model.parameters()) <= F64_MAX_PARAMS if float64 is None else bool(float64)
    xs = map_floats(example_input, lambda t: t.double() if in_f64 else t)  # a tensor, tuple or keyword dict

    def run(state: dict[str, torch.Tensor] | None) -> torch.Tensor:
        net = copy.deepcopy(model) if state is None else load_state(copy.deepcopy(model), state)
        return first_tensor(call_model((net.double() if in_f64 else net).eval(), xs))

    ref = run(None)
    res.permuted_err = _rel_err(run(permuted.state_dict()), ref)
    for method in methods:
        t0 = time.perf_counter()
        try:
            with measuring():  # the spec under test is used as it is, right or wrong
                state = fuse(
                    [model, permuted],  # type: ignore[arg-type]
                    method=method,
                    spec=spec,
                    init=0,
                    max_iter=1,
                    bn_repair=None,
                )
        except AlignmentError as exc:
            res.failures[method] = str(exc)
            res.seconds[method] = time.perf_counter() - t0
            continue
        res.seconds[method] = time.perf_counter() - t0
        res.errors[method] = _rel_err(run(state), ref)
        del state
    return res
