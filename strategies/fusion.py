"""Alignment-aware aggregation: FedMatch, FedWB, FedGWB, and the activation-based FedCCA and FedZip.

Each is FedAvg's round loop with one change: the valid replies' state dicts go through
``fedfuse.align.fuse`` (align every client model to a common target, then average in the aligned
space) instead of a plain weighted average. The maths lives in ``fedfuse.align`` and ``fedfuse.merge``.
FedCCA/FedZip align by the activations of the server's unlabeled batch (``server-data``, FedDF's setting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from torch import nn

from fedfuse.align import fuse
from fedfuse.align.fusion import DATA_METHODS
from fedfuse.align.gw import DEFAULT_ALPHA
from fedfuse.align.solvers import resolve_spec
from fedfuse.config import Option
from fedfuse.errors import ConfigError
from fedfuse.merge.linear import linear_units
from strategies.base import FedFuseStrategy, require_model
from strategies.options import SOLVERS, STRATEGY_OPTIONS
from strategies.repair import PostFusionRepair

__all__ = ["FedFusion", "FedMatch", "FedWB", "FedGWB", "FedCCA", "FedZip"]


class FedFusion(FedFuseStrategy):
    """Aggregate with ``fuse(states, weights, method=self.method, ...)``; λ_i = n_i / Σ n_j.

    Arguments beyond FedAvg's: ``model`` (a module of the global architecture) and, where the model
    cannot fix its input shape itself, an ``example_input`` batch (to derive the transport spec with
    torch.fx, once); ``solver``
    (``emd`` exact or ``sinkhorn``), ``epsilon`` (Sinkhorn regularisation, relative to the cost
    range), ``max_iter`` (barycenter iterations), ``bn_repair`` (``none``: BatchNorm statistics are the
    transported average; ``reset``/``repair``: a post-fusion statistics round with the same clients,
    :mod:`strategies.repair`, ``repair_rounds`` Jacobi rounds for ``repair``), ``bn_fold`` (BN-aware alignment:
    ``fuse(bn_fold=True)``).

    Width heterogeneity (wb/gwb): with ``client_widths`` (client with partition p gets
    ``client_widths[p % len]``) and ``model_factory(width) -> module``, each client receives the global
    model transported to its width (a one-model barycenter of that width) and the server fuses the
    clients' models of different widths back into the global width (``target_width`` per group).
    """

    method = "average"
    options: ClassVar[tuple[Option, ...]] = STRATEGY_OPTIONS["match"]

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        example_input: torch.Tensor | None = None,
        solver: str = "emd",
        epsilon: float = 0.01,
        max_iter: int | None = None,
        bn_repair: str = "none",
        repair_rounds: int = 0,
        bn_fold: bool = False,
        client_widths: Sequence[int] | None = None,
        model_factory: Callable[[int], nn.Module] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        model = require_model(self, model)
        if kwargs.get("distill_epochs"):
            kwargs.setdefault("distill_model", model)
            if client_widths or bn_repair != "none":
                what = f"client_widths={client_widths!r}" if client_widths else f"bn_repair={bn_repair!r}"
                raise ConfigError(f"distill_epochs={kwargs['distill_epochs']} cannot be combined with {what}")
        if self.method in DATA_METHODS and kwargs.get("server_data") is None:
            raise ConfigError(
                f"strategy {self.method!r} aligns by activations and needs server-data > 0 (unlabeled inputs the "
                "server holds, e.g. --server-data 200)"
            )
        if solver not in SOLVERS:
            raise ConfigError(f"solver={solver!r} is not allowed; allowed: {', '.join(SOLVERS)}")
        if not float(epsilon) > 0:
            raise ConfigError(f"epsilon={epsilon!r} is out of range; allowed: > 0")
        if max_iter is not None and int(max_iter) < 1:
            raise ConfigError(f"max_iter={max_iter!r} is out of range; allowed: >= 1")
        super().__init__(seed=seed, **kwargs)
        self.template = model
        self.example_input = example_input
        self.spec = resolve_spec(None, model, example_input)  # fails early, naming an unsupported op
        if self.method in DATA_METHODS and example_input is not None:  # a unit no linear map carries: before round 1
            linear_units(self.method, self.spec, model, example_input)
        self.solver = solver
        self.epsilon = float(epsilon)
        self.max_iter = max_iter
        self.fuse_kwargs: dict[str, Any] = {}  # method-specific fuse() arguments (gwb: alpha)
        self.bn_fold = bool(bn_fold)
        self.post = PostFusionRepair(bn_repair, rounds=repair_rounds, template=model, example_input=example_input)
        self.bn_repair = None  # the server holds no data: BN statistics stay the transported average unless self.post
        self._grid: Grid | None = None
        self._train_config = ConfigRecord()
        self.client_widths = [int(w) for w in client_widths] if client_widths else None
        self.group_sizes: dict[int, dict[str, int]] = {}
        if self.client_widths:
            if self.method not in ("wb", "gwb"):
                raise ConfigError(f"client_widths needs method wb or gwb; got {self.method!r}")
            if self.post.enabled:
                raise ConfigError(f"bn_repair={bn_repair!r} needs equal client widths (client_widths is set)")
            if model_factory is None or min(self.client_widths) < 1:
                raise ConfigError(f"client_widths={client_widths!r} needs widths >= 1 and a model_factory")
            for w in set(self.client_widths):  # per width, the size of every hidden group
                self.group_sizes[w] = resolve_spec(None, model_factory(w), example_input).sizes
        self.global_sizes = self.spec.sizes

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        from fedfuse.experiment import width_arguments

        return {
            "model": model,
            "example_input": example_input,
            "solver": str(cfg["fusion-solver"]),
            "epsilon": float(cfg["fusion-epsilon"]),
            "max_iter": int(cfg["fusion-iters"]) or None,
            "bn_repair": str(cfg["bn-repair"]),
            "repair_rounds": int(cfg["repair-rounds"]),
            "bn_fold": bool(cfg["bn-fold"]),
            **width_arguments(cfg),
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As FedAvg; with client widths, each node gets the global model transported to its width. After a
        federated REPAIR round, clients train from the unrepaired fused model (:mod:`strategies.repair`)."""
        arrays = self.post.train_arrays(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._grid, self._train_config = grid, config  # for the post-fusion statistics round (bn-repair)
        if not self.client_widths:
            return messages
        global_state = arrays.to_torch_state_dict()
        resized: dict[int, dict[str, torch.Tensor]] = {}
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            width = self.client_widths[max(self.nodes.partition(node), 0) % len(self.client_widths)]
            if self.group_sizes[width] == self.global_sizes:
                out.append(msg)
                continue
            if width not in resized:
                resized[width] = fuse(
                    [global_state], method="wb", spec=self.spec, template=self.template,
                    target_width=self.group_sizes[width], bn_repair=self.bn_repair,  # type: ignore[arg-type]
                )  # fmt: skip
            self._sent_to[node] = resized[width]
            content = RecordDict({self.arrayrecord_key: ArrayRecord(resized[width]), self.configrecord_key: config})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return out

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        fused, aligned = self._fuse(server_round, states, weights)
        return self.post.for_strategy(self, server_round, fused, aligned, weights)

    def trial_aggregate(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """The fusion under trial ``weights`` (the apart claim test) asking no client anything: the post-fusion
        statistics round (``reset``/``repair``) is done on the server's own examples instead, where it has them
        (a BatchNorm model's transported statistics alone leave every trial near chance, and a junk reply's
        statistics decide it)."""
        x = getattr(self.trusted, "x", None)
        mode = self.post.mode if self.post.enabled and x is not None else None
        return self._fuse(server_round, states, weights, bn_repair=mode, repair_data=x)[0]

    def _fuse(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float],
        bn_repair: str | None = None, repair_data: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:  # fmt: skip
        """(fused, aligned): :func:`fedfuse.align.fuse` with the strategy's settings, BatchNorm/REPAIR on
        ``repair_data`` where ``bn_repair`` is given (else the strategy's own ``bn_repair``)."""
        return fuse(
            states,
            weights,
            method=self.method,  # type: ignore[arg-type]
            spec=self.spec,
            template=self.template,
            solver=self.solver,  # type: ignore[arg-type]
            epsilon=self.epsilon,
            max_iter=self.max_iter,
            **self.fuse_kwargs,
            bn_repair=bn_repair or self.bn_repair,  # type: ignore[arg-type]
            bn_fold=self.bn_fold,
            seed=self.seed + server_round,
            target_width=self.global_sizes if self.client_widths else None,
            reduce=self.reduce,  # robust aggregation in the aligned space
            data=self.server_data if self.method in DATA_METHODS else None,
            repair_data=repair_data,
            return_aligned=True,
        )

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: the base's plus the unrepaired fused model clients train on after REPAIR."""
        return {**super().state_dict(), **self.post.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.post.load_state_dict(state)


class FedMatch(FedFusion):
    """Weight-match every client to the largest-weight one (Git Re-Basin), then average."""

    method = "match"


class FedWB(FedFusion):
    """Wasserstein-barycenter fusion (Akash et al. 2022): alternate OT alignment and averaging."""

    method = "wb"
    options = STRATEGY_OPTIONS["wb"]


class FedGWB(FedFusion):
    """Fused Gromov-Wasserstein-barycenter fusion (:mod:`fedfuse.align.gw`): intra-model distance structure +
    WB's feature cost, trade-off ``alpha`` (0 = WB, 1 = GW warm-started from WB)."""

    method = "gwb"
    options = STRATEGY_OPTIONS["gwb"]

    def __init__(self, *, alpha: float = DEFAULT_ALPHA, **kwargs: Any) -> None:
        if isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"alpha={alpha!r} is out of range; allowed: 0 <= alpha <= 1")
        super().__init__(**kwargs)
        self.fuse_kwargs["alpha"] = float(alpha)

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        return {
            **super().config_kwargs(cfg, model=model, example_input=example_input),
            "alpha": float(cfg["gwb-alpha"]),
        }


class FedCCA(FedFusion):
    """CCA Merge (Horoi et al., ICML 2024; :mod:`fedfuse.merge.cca`): every client's units mapped onto the
    largest client's by linear maps from canonical correlations of their activations on the server batch."""

    method = "cca"


class FedZip(FedFusion):
    """ZipIt!-style zipping (Stoica et al., ICLR 2024; :mod:`fedfuse.merge.zip`): units matched within and across
    the clients' models by the correlation of their activations on the server batch, then merged."""

    method = "zip"
