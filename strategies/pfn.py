"""FedPFN and FedPNU (training-time neuron alignment, Li et al. 2024, arXiv 2402.01342).

FedPFN: the server draws one mask seed; every client rebuilds the same fixed mask from it and
trains only the free entries, so fixed entries keep their initial global values all run long.
FedPNU (our reading): the mask is redrawn every round from (seed, round), so each round trains a
shared subspace while, over rounds, every weight gets updated. Masks never travel: only the seed,
ratio and granularity go out in the round's ConfigRecord.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from torch import nn

from fedfuse import protocol
from fedfuse.align import fuse
from fedfuse.align.solvers import resolve_spec
from fedfuse.config import Option
from fedfuse.errors import ConfigError
from fedfuse.experiment import derive_seed, round_mask
from fedfuse.subspace import fixed_distance, mask_ratio
from strategies.base import FedFuseStrategy, require_model
from strategies.options import STRATEGY_OPTIONS
from strategies.repair import PostFusionRepair

__all__ = ["FedPFN", "FedPNU"]


class FedPFN(FedFuseStrategy):
    """FedAvg over clients that train only the free entries of one seeded mask (ratio ρ fixed).

    Extra per-round metrics: ``pfn_mask_ratio`` (fraction of entries fixed, server-side mask) and
    ``pfn_fixed_distance`` = ‖(θ_global − θ_ref) ⊙ fixed‖₂ with θ_ref the initial global model; it
    stays exactly 0 for FedPFN with ``fusion="average"``. ``fusion="wb"`` (or match/gwb) aligns the
    clients before averaging — FedPFN + FedWB; alignment may then move fixed entries, and the metric shows it.
    """

    mode = "pfn"
    options: ClassVar[tuple[Option, ...]] = STRATEGY_OPTIONS["fedpfn"]

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        pfn_ratio: float = 0.4,
        pfn_granularity: str = "weight",
        fusion: str = "average",
        example_input: torch.Tensor | None = None,
        bn_repair: str = "none",
        repair_rounds: int = 0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        model = require_model(self, model)
        super().__init__(seed=seed, **kwargs)
        self.template = model
        if fusion not in ("average", "wb", "match", "gwb"):
            raise ConfigError(f"fusion={fusion!r} is not allowed; allowed: average, wb, match, gwb")
        self.fusion = fusion
        self.spec = resolve_spec(None, model, example_input) if fusion != "average" else None
        if not 0.0 <= float(pfn_ratio) < 1.0:
            raise ConfigError(f"pfn_ratio={pfn_ratio!r} is out of range; allowed: >= 0 and < 1")
        if pfn_granularity not in ("weight", "neuron"):
            raise ConfigError(f"pfn_granularity={pfn_granularity!r} is not allowed; allowed: weight, neuron")
        self.pfn_ratio = float(pfn_ratio)
        self.pfn_granularity = pfn_granularity
        self.pfn_seed = derive_seed(seed, 11)  # the server's one draw; clients get it in the config
        self.reference_state: dict[str, torch.Tensor] | None = None
        self.post = PostFusionRepair(bn_repair, rounds=repair_rounds, template=model, example_input=example_input)
        self._grid: Grid | None = None
        self._train_config = ConfigRecord()

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        return {
            "model": model,
            "pfn_ratio": float(cfg["pfn-ratio"]),
            "pfn_granularity": str(cfg["pfn-granularity"]),
            "fusion": str(cfg["pfn-fusion"]),
            "example_input": example_input,
            "bn_repair": str(cfg["bn-repair"]),
            "repair_rounds": int(cfg["repair-rounds"]),
        }

    def pfn_config(self) -> dict[str, Any]:
        """The round-config keys clients rebuild the mask from (the mask itself never travels)."""
        return {
            protocol.PFN_MODE: self.mode,
            protocol.PFN_RATIO: self.pfn_ratio,
            protocol.PFN_SEED: self.pfn_seed,
            protocol.PFN_GRANULARITY: self.pfn_granularity,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        arrays = self.post.train_arrays(arrays)  # after federated REPAIR: the unrepaired fused model
        if self.reference_state is None or self.mode == "pnu":
            self.reference_state = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        for key, value in self.pfn_config().items():
            config[key] = value
        self._grid, self._train_config = grid, config  # for the post-fusion statistics round (bn-repair)
        return list(super().configure_train(server_round, arrays, config, grid))

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        aligned = states
        if self.fusion == "average":
            new_state = super().aggregate_arrays(server_round, states, weights)
        else:  # FedPFN + fusion: align the clients' models before averaging (fixed entries may move then)
            new_state, aligned = fuse(
                states,
                weights,
                method=self.fusion,
                spec=self.spec,
                template=self.template,
                seed=self.seed + server_round,
                reduce=self.reduce,
                return_aligned=True,
            )
        new_state = self.post.for_strategy(self, server_round, new_state, aligned, weights)  # bn-repair (moves fixed)
        masks = round_mask(self.pfn_config(), self.template, server_round)
        assert masks is not None and self.reference_state is not None
        self.round_metrics["pfn_mask_ratio"] = mask_ratio(masks)
        self.round_metrics["pfn_fixed_distance"] = fixed_distance(new_state, self.reference_state, masks)
        return new_state

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pfn_reference": self.reference_state, **self.post.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.reference_state = state.get("pfn_reference")
        self.post.load_state_dict(state)


class FedPNU(FedPFN):
    """Partial neuron update: a fresh seeded mask every round (``pnu_mask(seed, round)``).

    ``pfn_fixed_distance`` compares the new global model with the one sent out this round, on this
    round's mask: 0 as well (entries fixed this round did not move this round).
    """

    mode = "pnu"
