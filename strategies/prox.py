"""FedProx (Li et al., MLSys 2020) on fedfuse's deterministic FedAvg.

Server side it is Flower's ``flwr.serverapp.strategy.FedProx``: the plain weighted average, with the
proximal weight μ sent to the clients in the train ConfigRecord under ``"proximal-mu"`` (Flower 1.41's key).
Sampling, reply order, validation and screening are :class:`strategies.base.FedFuseStrategy`'s. The client
(fedfuse's ClientApp, :func:`fedfuse.train.train`) minimises ``loss(w) + (μ/2)·‖w − w_received‖²``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedProx as FlowerFedProx

from fedfuse import protocol
from fedfuse.config import Option
from strategies.base import FedFuseStrategy
from strategies.options import STRATEGY_OPTIONS

__all__ = ["FedProx"]


class FedProx(FedFuseStrategy, FlowerFedProx):
    """FedFuseStrategy + Flower's FedProx: θ = Σ_i (n_i/n) θ_i, clients pulled toward θ_received by μ.

    ``proximal_mu`` defaults to Flower's 0.0 (= FedAvg, with Flower's warning); the run option ``proximal-mu``
    (``fedfuse simulate --proximal-mu``) defaults to 0.01 and is passed explicitly.
    """

    options: ClassVar[tuple[Option, ...]] = STRATEGY_OPTIONS["fedprox"]

    def __init__(self, *, proximal_mu: float = 0.0, **kwargs: Any) -> None:
        # FedFuseStrategy.__init__ → FlowerFedProx.__init__(proximal_mu=...) → FedAvg.__init__ (the MRO)
        super().__init__(proximal_mu=float(proximal_mu), **kwargs)

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        return {"proximal_mu": float(cfg["proximal-mu"])}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's FedProx key in the config, then fedfuse's seeded sampling."""
        config[protocol.PROXIMAL_MU] = float(self.proximal_mu)
        return super().configure_train(server_round, arrays, config, grid)
