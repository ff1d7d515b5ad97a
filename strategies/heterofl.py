"""HeteroFL (Diao et al. 2021) as a Flower strategy: width-heterogeneous clients by sub-model slicing.

A client of width w trains the top-left sub-model of the global one (the first k units of every hidden
group, the group sizes read off the transport spec of ``model_factory(w)``); the server averages every
global entry over the clients whose sub-model holds it (:func:`fedfuse.align.slicing.masked_average`).
The maths lives in :mod:`fedfuse.align.slicing`; this module only routes the sub-models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from torch import nn

from fedfuse.align.slicing import masked_average, slice_state
from fedfuse.align.solvers import resolve_spec
from fedfuse.config import Option
from fedfuse.errors import ConfigError
from strategies.base import FedFuseStrategy, require_model
from strategies.options import STRATEGY_OPTIONS

__all__ = ["HeteroFL"]


class HeteroFL(FedFuseStrategy):
    """Sub-model slicing + masked averaging; with equal client widths it is FedAvg.

    ``client_widths`` (client with partition p gets ``client_widths[p % len]``, every width ≤ the global
    model's in every group) and ``model_factory(width) -> module`` as for :class:`strategies.FedWB`;
    ``model`` is the global architecture (``example_input`` where its input shape cannot be inferred).
    The screening defences apply; a ``robust`` reduction is not defined for masked averaging and is refused.
    """

    options: ClassVar[tuple[Option, ...]] = STRATEGY_OPTIONS["heterofl"]

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        example_input: torch.Tensor | None = None,
        client_widths: Sequence[int] | None = None,
        model_factory: Callable[[int], nn.Module] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        model = require_model(self, model)
        if kwargs.get("robust", "none") != "none":
            raise ConfigError(f"robust={kwargs['robust']!r} is not supported by heterofl; allowed: none")
        super().__init__(seed=seed, **kwargs)
        self.spec = resolve_spec(None, model, example_input)
        self.global_sizes = self.spec.sizes
        self.client_widths = [int(w) for w in client_widths] if client_widths else None
        self.group_sizes: dict[int, dict[str, int]] = {}
        if self.client_widths:
            if model_factory is None or min(self.client_widths) < 1:
                raise ConfigError(f"client_widths={client_widths!r} needs widths >= 1 and a model_factory")
            for w in sorted(set(self.client_widths)):
                sizes = resolve_spec(None, model_factory(w), example_input).sizes
                wider = {g: k for g, k in sizes.items() if k > self.global_sizes.get(g, k)}
                if set(sizes) != set(self.global_sizes) or wider:
                    raise ConfigError(
                        f"client width {w} is not a sub-model of the global model (groups {sizes}, global "
                        f"{self.global_sizes}); allowed: widths whose every group is at most the global one"
                    )
                self.group_sizes[w] = sizes

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        from fedfuse.experiment import width_arguments

        return {
            "model": model,
            "example_input": example_input,
            **width_arguments(cfg),
        }

    def width_of(self, node: int) -> int | None:
        """The width of ``node`` (by its partition id), None without width heterogeneity."""
        if not self.client_widths:
            return None
        return self.client_widths[max(self.nodes.partition(node), 0) % len(self.client_widths)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg; a node of a narrower width gets the top-left sub-model of the global one."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not self.client_widths:
            return messages
        sliced: dict[int, dict[str, torch.Tensor]] = {}
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            width = self.width_of(node)
            assert width is not None
            if self.group_sizes[width] == self.global_sizes:
                out.append(msg)
                continue
            if width not in sliced:
                sliced[width] = slice_state(self._sent, self.spec, self.group_sizes[width])
            self._sent_to[node] = sliced[width]
            content = RecordDict({self.arrayrecord_key: ArrayRecord(sliced[width]), self.configrecord_key: config})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """Masked average of the clients' sub-models; entries no valid client held keep the sent value."""
        return masked_average(states, weights, self.spec, self._sent)
