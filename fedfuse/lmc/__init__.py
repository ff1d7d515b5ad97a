"""Linear mode connectivity: interpolation curves, loss/error barriers, layer-wise and cumulative barriers.

Notation: θ(α) = (1 − α)·θA + α·θB on a chosen set of keys (every other entry held at a *base* model);
L is the mean cross-entropy (or the error 1 − accuracy) on (x, y). The barrier of a path is how far L rises
above the straight line between the losses of the two *full* models A and B (Frankle et al. 2020; Adilova et
al., ICLR 2024):

* max barrier       B_max = max_α [ L(θ(α)) − ((1 − α)·L(θA) + α·L(θB)) ]
* midpoint barrier  B_mid = L(θ(½)) − ½·(L(θA) + L(θB))

Layer-wise: interpolate one group only, the rest from A (and, separately, from B); the reference line stays
the full models' (as in Adilova et al.'s code), so a single-layer B_mid near 0 means "averaging this layer alone
costs nothing". Cumulative: grow the interpolated set one group at a time. Pure PyTorch; results are
dataclasses of floats (``dataclasses.asdict``).

Modules: :mod:`~fedfuse.lmc.curves` (curves, barriers of one path, the N-model barrier),
:mod:`~fedfuse.lmc.layerwise` (layer groups, layer-wise and cumulative barriers), :mod:`~fedfuse.lmc.plots`,
:mod:`~fedfuse.lmc.monitor` (per-round barriers among a round's client models). State arithmetic
(interpolation, weighted averages) lives in :mod:`fedfuse.state`, the BatchNorm reset in :mod:`fedfuse.align.bn`.
"""

from fedfuse.lmc.curves import (
    METRICS,
    BarrierStats,
    Curve,
    MultiModelBarrier,
    barrier,
    barrier_stats,
    interpolation_curve,
    max_barrier,
    midpoint_barrier,
    multi_model_barrier,
)
from fedfuse.lmc.layerwise import (
    ORDERS,
    CumulativeResult,
    CumulativeStep,
    GroupBarrier,
    LayerwiseResult,
    cumulative_barriers,
    layer_groups,
    layerwise_barriers,
)
from fedfuse.lmc.monitor import lmc_round_stats, plot_lmc_monitor, save_client_states
from fedfuse.lmc.plots import plot_cumulative, plot_curve, plot_layerwise
from fedfuse.state import interpolate

__all__ = [
    "METRICS",
    "ORDERS",
    "Curve",
    "BarrierStats",
    "GroupBarrier",
    "LayerwiseResult",
    "CumulativeStep",
    "CumulativeResult",
    "MultiModelBarrier",
    "interpolate",
    "interpolation_curve",
    "max_barrier",
    "midpoint_barrier",
    "barrier_stats",
    "layer_groups",
    "layerwise_barriers",
    "cumulative_barriers",
    "barrier",
    "multi_model_barrier",
    "lmc_round_stats",
    "save_client_states",
    "plot_curve",
    "plot_layerwise",
    "plot_cumulative",
    "plot_lmc_monitor",
]
