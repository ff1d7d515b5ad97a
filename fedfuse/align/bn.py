"""BatchNorm and fusion: statistics after fusion, and BN-aware alignment (folding).

Averaging aligned weights shrinks activation variance ("variance collapse"); two fixes:

* :func:`reset_bn_stats` — recompute every BatchNorm's running mean/var on data (cumulative average);
  the one BN reset of fedfuse (fusion, REPAIR and the LMC curves use it).
* REPAIR (Jordan et al. 2022): rescale every hidden unit to the λ-interpolation of the aligned parents'
  statistics — :mod:`fedfuse.align.repair` (with and without BatchNorm, one-shot and federated).

BN-aware alignment (``fuse(..., bn_fold=True)``): in eval mode a unit ``c`` of ``conv → BN`` computes
``γ_c (w_c·x − μ_c)/√(σ_c² + ε) + β_c``; training with BN leaves the scale of ``w_c`` free, so two parents can
compute the same unit with raw rows of different norms, and the raw weight-matching/OT cost and the raw
average (``w̄``, ``σ̄²`` averaged separately) compare and mix the wrong things. :func:`fold_bn` rewrites each
unit as its affine map ``w'_c = s_c w_c``, ``b'_c = β_c + s_c (b_c − μ_c)``, ``s_c = γ_c/√(σ_c² + ε)``; alignment
and averaging run on that; :func:`unfold_bn` writes the result back as conv + BN (exact in eval mode).
Measured (benchmarks/results/repair-bn-mnist10k-5.md): it raises every aligned fusion of the BN CNN, most
without any repair, and brings the REPAIRed one to about the no-BN CNN's distance from the ensemble.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.errors import ConfigError

__all__ = ["reset_bn_stats", "has_batch_norm", "fold_pairs", "fold_bn", "unfold_bn"]

_BN = nn.modules.batchnorm._BatchNorm


def _inputs(data: Any) -> Tensor:
    if isinstance(data, (tuple, list)):
        data = data[0]
    if not isinstance(data, Tensor) or len(data) == 0:
        raise ConfigError("repair/reset data must be a non-empty input tensor (or an (x, y) pair)")
    return data


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Any, batch_size: int = 512) -> nn.Module:
    """Recompute the running statistics of every tracked BatchNorm on ``data`` (in place; returns ``model``).

    Only the BatchNorm layers that track running statistics are put in train mode, with ``momentum=None``
    (a cumulative average: the running mean/var become the mean of the per-batch statistics over
    ``batch_size`` batches); every other module keeps its mode (Dropout stays as it is). Momenta and every
    module's training flag are restored afterwards, also on error. Call ``model.eval()`` first to run the
    rest of the model in inference mode.
    """
    x = _inputs(data)
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average = exact mean over the batches
            m.train()
        for start in range(0, len(x), int(batch_size)):
            model(x[start : start + int(batch_size)])
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        for m, training in modes:
            m.training = training
    return model


# ---------------------------------------------------------------------------------------------------------------
# folding BatchNorm into its producer (BN-aware alignment)
# ---------------------------------------------------------------------------------------------------------------

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_pairs(model: nn.Module, example_input: Any = None) -> list[tuple[str, str, float]]:
    """``(producer, bn, ε)``: module names where an affine, tracked BatchNorm reads a Linear/Conv's output directly
    and nothing else reads that output (traced with ``torch.fx``; the BN folds exactly into that producer)."""
    from fedfuse.align.solvers import infer_example_input
    from fedfuse.align.spec import trace_values

    if not has_batch_norm(model):
        return []
    graph, _ = trace_values(model, example_input if example_input is not None else infer_example_input(model))
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if not (isinstance(bn, _BN) and bn.affine and bn.track_running_stats) or not node.args:
            continue
        src = node.args[0]
        prod = modules.get(str(src.target)) if getattr(src, "op", None) == "call_module" else None
        if isinstance(prod, _PRODUCERS) and len(src.users) == 1 and prod.weight.shape[0] == bn.num_features:
            pairs.append((str(src.target), str(node.target), float(bn.eps)))
    return pairs


def _scale(w: Tensor, s: Tensor) -> Tensor:
    return (w.double() * s.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)


def fold_bn(state: Mapping[str, Tensor], pairs: list[tuple[str, str, float]]) -> dict[str, Tensor]:
    """``state`` with every BatchNorm of ``pairs`` folded into its producer; the same function in eval mode.

    Per unit, ``s = γ / √(σ² + ε)``: ``W ← s·W``, producer bias ← 0, BN ``β ← β + s·(b − μ)``, ``γ ← 1``,
    ``μ ← 0``, ``σ² ← 1 − ε`` (so the BN is the identity plus the folded shift). The result is the eval-mode
    affine map of each unit, which is what alignment costs and averaging should compare: two units computing
    the same function have the same folded rows whatever their raw scale (BN makes ``W``'s scale free).
    """
    out = dict(state)
    for prod, bn, eps in pairs:
        g, beta = state[f"{bn}.weight"].double(), state[f"{bn}.bias"].double()
        mu, var = state[f"{bn}.running_mean"].double(), state[f"{bn}.running_var"].double()
        s = g / (var + eps).sqrt()
        b = state[f"{prod}.bias"].double() if f"{prod}.bias" in state else torch.zeros_like(mu)
        out[f"{prod}.weight"] = _scale(state[f"{prod}.weight"], s)
        if f"{prod}.bias" in state:
            out[f"{prod}.bias"] = torch.zeros_like(state[f"{prod}.bias"])
        dt = state[f"{bn}.weight"].dtype
        out[f"{bn}.bias"] = (beta + s * (b - mu)).to(dt)
        out[f"{bn}.weight"] = torch.ones_like(state[f"{bn}.weight"])
        out[f"{bn}.running_mean"] = torch.zeros_like(state[f"{bn}.running_mean"])
        out[f"{bn}.running_var"] = torch.full_like(state[f"{bn}.running_var"], 1.0 - eps)
    return out


def unfold_bn(
    folded: Mapping[str, Tensor], pairs: list[tuple[str, str, float]], norm: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Undo :func:`fold_bn` onto the BatchNorm parameters ``norm`` (``γ``, ``β``, ``σ²`` per BN; e.g. the
    λ-average of the aligned parents'), keeping the eval-mode function of ``folded`` exactly.

    With the folded unit ``z = W'x + b'`` and ``k = √(σ² + ε) / γ``: ``W ← k·W'``, ``μ ← k·(β − b')``, so
    ``γ (Wx − μ)/√(σ² + ε) + β = W'x + b'``. Units with ``|γ| < 1e-6`` keep ``γ = √(σ² + ε)`` (``k = 1``).
    *(our reading: any (γ, β, σ²) gives the same eval function; the parents' averaged ones keep the
    train-mode behaviour close to the parents' — BN then normalises the fused unit to std ``|γ|`` and mean
    ``β``, the parents' averaged output statistics — and a later BN reset or REPAIR starts from them.)*
    """
    out = dict(folded)
    for prod, bn, eps in pairs:
        g, beta = norm[f"{bn}.weight"].double(), norm[f"{bn}.bias"].double()
        var = norm[f"{bn}.running_var"].double().clamp_min(0.0)
        root = (var + eps).sqrt()
        g = torch.where(g.abs() < 1e-6, root, g)
        k = root / g
        b_fold = folded[f"{bn}.bias"].double()
        out[f"{prod}.weight"] = _scale(folded[f"{prod}.weight"], k)
        dt = folded[f"{bn}.weight"].dtype
        out[f"{bn}.weight"] = g.to(dt)
        out[f"{bn}.bias"] = beta.to(dt)
        out[f"{bn}.running_var"] = var.to(dt)
        out[f"{bn}.running_mean"] = (k * (beta - b_fold)).to(dt)
    return out
