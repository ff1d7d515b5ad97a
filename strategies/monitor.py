"""Round observers the ServerApp composes with any strategy (``--lmc-monitor``, ``--save-client-models``).

Each implements :class:`strategies.observed.RoundObserver`; the maths and file formats live in
:mod:`fedfuse.lmc.monitor`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.lmc.monitor import lmc_round_stats, save_client_states
from strategies.observed import ClientModel

__all__ = ["LMCMonitor", "ClientModelDump"]

log = logging.getLogger("fedfuse")


class LMCMonitor:
    """Full and layer-wise midpoint barriers among each round's client models on a held-out batch ``(x, y)``."""

    def __init__(self, template: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.template, self.x, self.y = template, x, y

    def observe(self, server_round: int, clients: Sequence[ClientModel]) -> Mapping[str, float]:
        if len(clients) < 2:
            return {}
        try:
            states = [c.state for c in clients]
            return lmc_round_stats(self.template, states, [c.weight for c in clients], self.x, self.y)
        except (ConfigError, RuntimeError) as exc:  # e.g. clients of other widths: skip, never lose the round
            log.warning("round %d: LMC monitor skipped: %s", server_round, exc)
            return {}


class ClientModelDump:
    """Saves round ``server_round``'s client models as ``out/clients/round<R>/<label>.pt``."""

    def __init__(self, server_round: int, out: Path) -> None:
        self.round, self.out = int(server_round), Path(out)

    def observe(self, server_round: int, clients: Sequence[ClientModel]) -> Mapping[str, float]:
        if server_round == self.round:
            directory = self.out / "clients" / f"round{server_round}"
            save_client_states(directory, [c.label for c in clients], [c.state for c in clients])
        return {}
