"""Alignment-aware aggregation: FedMatch, FedWB and FedGWB.

Each is FedAvg's round loop with one change: the valid replies' state dicts go through
``fedfuse.align.fuse`` (align every client model to a common target, then average in the aligned
space) instead of a plain weighted average. The maths lives in ``fedfuse.align``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedfuse.align import derive_spec, fuse
from fedfuse.errors import ConfigError
from strategies.base import FedFuseStrategy

__all__ = ["FedFusion", "FedMatch", "FedWB", "FedGWB"]

SOLVERS = ("emd", "sinkhorn")
BN_REPAIRS = ("auto", "none")


class FedFusion(FedFuseStrategy):
    """Aggregate with ``fuse(states, weights, method=self.method, ...)``; λ_i = n_i / Σ n_j.

    Arguments beyond FedAvg's: ``template`` (a module of the global architecture) and an
    ``example_input`` batch (to derive the transport spec with torch.fx, once); ``solver``
    (``emd`` exact or ``sinkhorn``), ``epsilon`` (Sinkhorn regularisation, relative to the cost
    range), ``max_iter`` (barycenter iterations), ``bn_repair`` (``auto``: transported average of
    BatchNorm statistics; ``none``).
    """

    method = "average"

    def __init__(
        self,
        *,
        template: nn.Module,
        example_input: torch.Tensor,
        solver: str = "emd",
        epsilon: float = 0.01,
        max_iter: int | None = None,
        bn_repair: str = "auto",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if solver not in SOLVERS:
            raise ConfigError(f"solver={solver!r} is not allowed; allowed: {', '.join(SOLVERS)}")
        if not float(epsilon) > 0:
            raise ConfigError(f"epsilon={epsilon!r} is out of range; allowed: > 0")
        if bn_repair not in BN_REPAIRS:
            raise ConfigError(f"bn_repair={bn_repair!r} is not allowed; allowed: {', '.join(BN_REPAIRS)}")
        if max_iter is not None and int(max_iter) < 1:
            raise ConfigError(f"max_iter={max_iter!r} is out of range; allowed: >= 1")
        super().__init__(seed=seed, template=template, **kwargs)
        self.example_input = example_input
        self.spec = derive_spec(template, example_input)  # fails early, naming an unsupported op
        self.solver = solver
        self.epsilon = float(epsilon)
        self.max_iter = max_iter
        self.bn_repair = None if bn_repair == "none" else "auto"

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        return fuse(
            states,
            weights,
            method=self.method,  # type: ignore[arg-type]
            spec=self.spec,
            template=self.template,
            solver=self.solver,  # type: ignore[arg-type]
            epsilon=self.epsilon,
            max_iter=self.max_iter,
            bn_repair=self.bn_repair,  # type: ignore[arg-type]
            seed=self.seed + server_round,
        )


class FedMatch(FedFusion):
    """Weight-match every client to the largest-weight one (Git Re-Basin), then average."""

    method = "match"


class FedWB(FedFusion):
    """Wasserstein-barycenter fusion (Akash et al. 2022): alternate OT alignment and averaging."""

    method = "wb"


class FedGWB(FedFusion):
    """Gromov-Wasserstein-barycenter fusion: align neurons through intra-model distance matrices."""

    method = "gwb"
