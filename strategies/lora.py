"""Federated LoRA fine-tuning: the server keeps the frozen base, only adapters travel.

Each strategy is FedFuseStrategy's round loop with three changes: a node receives the global adapters at its
own rank (:func:`fedfuse.lora.truncate_rank`; plus the adapted layers' base weights once the server has folded
updates into them: fedex-lora, flora) and the dense ``train_keys`` (a head trained fully, trainable biases); a
reply holds what the node was sent minus the base weights (validated against it), the dense keys averaged plainly;
the aggregate is one :mod:`fedfuse.lora.aggregate` rule, merged back into the global model the server holds.
The exact rules (fedex-lora, svd-lora) aim at U = G + Σ λ_i (s_i B_i A_i − T_i), the global product G plus the
clients' mean change from what each was sent (T_i: G at its rank), :func:`fedfuse.lora.mean_update`; with one rank
U = M = Σ λ_i s_i B_i A_i, with mixed ranks M would drop the components of G a lower-rank client never received
(``refactor="product"``, run option ``lora-refactor product``, re-factorises M instead).
Round metrics: ``bytes_down``/``bytes_up`` (array bytes sent to / received from the clients), ``lora_agg_error``
= ‖U − s·B̄·Ā‖_F over the adapted layers, ``lora_update_error`` (the same for what the global model applies, base
folding included) and ``lora_mean_update`` = ‖U‖_F (FLoRA: M, its clients all start from B = 0).

Usable in a user's own Flower app like FedWB: ``FedExLoRA(model=model)`` with ``model`` the clients' LoRA model
(PEFT's ``get_peft_model`` or :func:`fedfuse.lora.inject_lora`; its alpha, scale and trained head/biases are read
from it), a ServerApp whose initial arrays are ``model.state_dict()``, and a ClientApp that loads what it receives
(``load_state_dict(..., strict=False)``) and sends back its adapters and trained entries — or everything it
received: the base weights a node gets once the server folds into them may come back unchanged, and are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedfuse import lora
from fedfuse.catalog import LORA_ALPHA
from fedfuse.config import Option
from fedfuse.errors import ConfigError
from fedfuse.experiment import derive_seed
from fedfuse.lora.run import lora_ranks
from fedfuse.state import state_bytes
from fedfuse.trust import OnWhole
from strategies.base import FedFuseStrategy
from strategies.options import LORA_OPTIONS, STRATEGY_OPTIONS

__all__ = ["LORA_OPTIONS", "LoRAStrategy", "FedAvgLoRA", "FedExLoRA", "AlignedLoRA", "FLoRA", "HetLoRA", "SVDLoRA"]

State = dict[str, torch.Tensor]
REFACTORING = ("exact", "svd")  # rules that re-factorise a mean by truncated SVD: run option lora-refactor


def _settings(
    model: torch.nn.Module | None, alpha: float | None, scale: str | None, train_keys: Sequence[str] | None
) -> tuple[float, str, Sequence[str]]:
    """(alpha, scale, train_keys): those given, the rest read from ``model`` (:func:`fedfuse.lora.lora_settings`),
    else alpha 4, the standard scale, no dense keys. A given value the model contradicts is a ConfigError."""
    own = (
        lora.lora_settings(model) if model is not None else {"alpha": LORA_ALPHA, "scale": "standard", "train_keys": []}
    )
    for name, given in (("alpha", alpha), ("scale", scale)):
        if model is not None and given is not None and given != own[name]:
            raise ConfigError(f"{name}={given!r} contradicts the model's LoRA layers ({name} {own[name]!r}); "
                              f"leave {name} out to take the model's")  # fmt: skip
    return (
        own["alpha"] if alpha is None else alpha,
        own["scale"] if scale is None else scale,
        own["train_keys"] if train_keys is None else train_keys,
    )


class LoRAStrategy(FedFuseStrategy):
    """Adapters aggregated by ``rule``: ``fedavg`` (A, B averaged apart), ``exact`` (SVD of the mean product +
    FedEx-LoRA residual folded into the base), ``aligned`` (rank components matched first), ``svd`` (SVD of the
    mean product at the global rank, residual dropped), ``hetlora`` (zero-padding), ``flora`` (stacking: the exact
    mean product folded into the base, fresh adapters). ``alpha``, ``scale``: every adapter's scale is alpha / r
    (``scale="standard"``) or alpha / √r (``"rslora"``), as the clients' (``lora-alpha``, ``lora-scale``; default
    4, standard); ``model``: the clients' LoRA model (fedfuse's or PEFT's), whose alpha, scale and ``train_keys``
    are taken (:func:`fedfuse.lora.lora_settings`) unless given;
    ``client_ranks``: ranks cycled over partitions (None: every client has the global rank); ``train_keys``: the
    dense entries clients train fully and send with the adapters (a head, trainable biases:
    :func:`fedfuse.lora.trained_keys` of the LoRA model), averaged plainly by every rule."""

    rule: ClassVar[str] = "fedavg"
    folds_base: ClassVar[bool] = False
    mixed_ranks: ClassVar[bool] = True
    options: ClassVar[tuple[Option, ...]] = STRATEGY_OPTIONS["fedavg-lora"]

    def __init__(
        self,
        *,
        model: torch.nn.Module | None = None,
        alpha: float | None = None,
        scale: str | None = None,
        client_ranks: Sequence[int] | None = None,
        train_keys: Sequence[str] | None = None,
        refactor: str = "update",
        **kwargs: Any,
    ) -> None:
        alpha, scale, train_keys = _settings(model, alpha, scale, train_keys)
        if isinstance(alpha, bool) or not float(alpha) > 0:
            raise ConfigError(f"alpha={alpha!r} is out of range; allowed: > 0")
        if refactor not in ("update", "product"):
            raise ConfigError(f"refactor={refactor!r} is unknown; allowed: update, product")
        if refactor != "update" and self.rule not in REFACTORING:
            raise ConfigError(f"refactor={refactor!r} applies to FedExLoRA and SVDLoRA only, not {type(self).__name__}")
        lora.check_scale(scale)
        ranks = [int(r) for r in client_ranks] if client_ranks else []
        if any(r < 1 for r in ranks):
            raise ConfigError(f"client_ranks={client_ranks!r}: every rank must be >= 1")
        self.check_mixed(ranks)
        if kwargs.get("robust", "none") != "none":
            raise ConfigError(f"robust={kwargs['robust']!r} is not supported by the LoRA strategies; allowed: none")
        super().__init__(**kwargs)
        self.alpha, self.scale = float(alpha), str(scale)
        self.client_ranks = ranks
        self.train_keys = [str(k) for k in train_keys]
        self.refactor = str(refactor)
        # the trusted reference (trusted-data) trains the server's copy of the whole LoRA model (frozen base, folded
        # weights) from the global state; what is sent is only the adapters and dense keys
        self.trusted = OnWhole(self.trusted, lambda: self._global) if self.trusted else None
        self.base_folded = False  # once the server folds updates into the base, nodes receive the adapted layers'
        self._completed = False  # this round's replies were completed to the global rank (screen_view)

    @classmethod
    def check_mixed(cls, ranks: Sequence[int]) -> None:
        """A ConfigError where clients' ranks differ and this rule needs one rank."""
        if len(set(ranks)) > 1 and not cls.mixed_ranks:
            raise ConfigError(
                f"lora-ranks={','.join(map(str, ranks))}: {cls.__name__} needs one rank for every client; "
                "for mixed ranks use hetlora (zero-padding), flora, svd-lora, fedex-lora or aligned-lora"
            )

    @classmethod
    def config_kwargs(cls, cfg: Mapping[str, Any], *, model: Any, example_input: Any) -> dict[str, Any]:
        ranks = lora_ranks(cfg)
        if not ranks:
            raise ConfigError(f"strategy {cfg['strategy']!r} needs lora-rank >= 1 or lora-ranks (e.g. --lora-rank 4)")
        cls.check_mixed(ranks)  # from the CLI's preflight too: before any write
        if cfg.get("lora-ranks") and ":" in str(cfg.get("lora-targets", "")):
            raise ConfigError("lora-ranks cannot be combined with per-target ranks in lora-targets (PAT:R)")
        if cfg.get("lora-ranks") and int(cfg.get("lora-rank", 0) or 0):
            raise ConfigError(f"lora-rank={cfg['lora-rank']} and lora-ranks={cfg['lora-ranks']!r} are exclusive: "
                              "give one (every client's rank, or ranks cycled over clients)")  # fmt: skip
        n = int(cfg.get("num-clients", 0) or 0)
        if 0 < n < len(ranks):
            raise ConfigError(f"lora-ranks={cfg['lora-ranks']!r} lists {len(ranks)} ranks for num-clients={n}; "
                              f"allowed: at most {n} (they are cycled over the clients)")  # fmt: skip
        train_keys = lora.trained_keys(model) if model is not None else []
        own = {"refactor": str(cfg.get("lora-refactor", "update"))} if cls.rule in REFACTORING else {}
        return {
            "alpha": float(cfg["lora-alpha"]),
            "scale": str(cfg.get("lora-scale", "standard")),
            "client_ranks": ranks if len(set(ranks)) > 1 else None,
            "train_keys": train_keys,
            **own,
        }

    # ---- what travels --------------------------------------------------------------------------
    def _rank_of(self, node: int, global_ranks: Mapping[str, int]) -> dict[str, int]:
        """``node``'s rank per adapted layer: the global one, or its client rank where that is lower."""
        if not self.client_ranks:
            return dict(global_ranks)
        mine = self.client_ranks[max(self.nodes.partition(node), 0) % len(self.client_ranks)]
        return {p: min(mine, r) for p, r in global_ranks.items()}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Each node gets the global adapters at its rank (and the adapted base weights once folded)."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._global = full = self._sent
        self._completed = False
        pairs = lora.adapter_pairs(full)
        if not pairs:
            raise ConfigError(
                f"{type(self).__name__}: the global model has no LoRA adapters ('lora_A'/'lora_B' keys); start from "
                "a LoRA-wrapped model (fedfuse.lora.inject_lora, or --lora-rank)"
            )
        self._global_rank = {p: full[a].shape[0] for p, (a, _) in pairs.items()}  # per layer (lora-targets PAT:R)
        missing = [k for k in self.train_keys if k not in full]
        if missing:
            raise ConfigError(f"{type(self).__name__}: train_keys {missing[:3]} are not in the global model")
        self._sent = {k: full[k] for k in [*lora.adapter_keys(full), *self.train_keys]}
        out, down = [], 0
        for msg in messages:
            node = msg.metadata.dst_node_id
            payload, base = self._payload(full, node)
            self._sent_to[node], self._frozen_to[node] = payload, base  # a reply may echo the base, unchanged
            down += state_bytes(payload) + state_bytes(base)
            content = RecordDict(
                {self.arrayrecord_key: ArrayRecord({**payload, **base}), self.configrecord_key: config}
            )
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self.round_metrics["bytes_down"] = float(down)
        return out

    def _payload(self, full: State, node: int) -> tuple[State, State]:
        """(the adapters at ``node``'s rank and the dense ``train_keys``, the adapted layers' base weights once
        folded, else nothing)."""
        pairs = lora.adapter_pairs(full)
        global_ranks = {p: full[a].shape[0] for p, (a, _) in pairs.items()}
        adapters = {k: full[k] for k in lora.adapter_keys(full)}
        rank = self._rank_of(node, global_ranks)
        payload = adapters if rank == global_ranks else lora.truncate_rank(adapters, rank, self.alpha, self.scale)
        payload = {**payload, **{k: full[k] for k in self.train_keys}}
        keys = [lora.base_weight_key(p, full) for p in pairs] if self.base_folded else []
        return payload, {k: full[k] for k in keys}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation (off in fedfuse's own ServerApp): each node gets what it would train from."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if not messages:
            return messages
        full, out = arrays.to_torch_state_dict(), []
        for msg in messages:
            payload, base = self._payload(full, msg.metadata.dst_node_id)
            content = RecordDict(
                {self.arrayrecord_key: ArrayRecord({**payload, **base}), self.configrecord_key: config}
            )
            out.append(
                Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=msg.metadata.dst_node_id)
            )
        return out

    # ---- aggregation ---------------------------------------------------------------------------
    def _mixed(self) -> bool:
        return len(set(self.client_ranks)) > 1

    def screen_view(self, unpacked: list, sent: list[State]) -> tuple[list, list[State]]:
        """Mixed ranks: every reply completed to the global rank (:func:`fedfuse.lora.complete_rank`) and measured
        against the global adapters, so the screening's norms, direction guard and influence test compare every
        client in one space (else updates of different shapes share no coordinates and go unguarded);
        :meth:`aggregate_arrays` truncates each back to its client's rank (what the screening changed beyond it —
        a projection's part there — is dropped)."""
        if not self._mixed():
            return unpacked, sent
        full, self._completed = self._sent, True  # the global adapters and dense keys, at the global rank
        done = [r if isinstance(r, str) else r._replace(state=lora.complete_rank(r.state, full, self.alpha, self.scale))
                for r in unpacked]  # fmt: skip
        return done, [full] * len(sent)

    def aggregate_arrays(self, server_round: int, states: list[State], weights: list[float]) -> State:
        """The rule's aggregate, merged into the global model (base folding for exact/flora); round metrics."""
        alpha, rank, scale = self.alpha, self._global_rank, self.scale
        if self._completed:  # screened at the global rank (screen_view): back to each client's own
            states = [lora.truncate_rank(st, self._rank_of(node, rank), alpha, scale)
                      for st, node in zip(states, self._valid_nodes, strict=True)]  # fmt: skip
        pairs = lora.adapter_pairs(states[0])
        residuals: dict[str, torch.Tensor] = {}
        start = {k: self._global[k] for k in lora.adapter_keys(self._global)}  # what the clients started from
        since = start if self.refactor == "update" else None  # "product": the mean of the clients' products
        if self.rule == "exact":
            adapters, residuals = lora.exact_lora(states, weights, rank, alpha, scale, since)
        elif self.rule == "svd":
            adapters = lora.svd_lora(states, weights, rank, alpha, scale, since)
        elif self.rule == "flora":
            stacked = lora.flora_stack(states, weights, alpha, scale)
            residuals = {p: sp for p, sp in lora.mean_products(states, weights, alpha, scale).items()}
            dense = {k: v for k, v in stacked.items() if k not in lora.adapter_keys(stacked)}
            adapters = {**dense, **self._fresh_adapters(server_round)}  # dense keys: the plain average
        else:
            padded = [lora.pad_rank(s, rank, alpha, scale) for s in states]
            if self.rule == "aligned":  # matched to the global adapters every client started from
                adapters = lora.aligned_lora(padded, weights, alpha, reference=start)
            else:
                adapters = lora.fedavg_lora(padded, weights, alpha)
        if self.rule == "flora":  # scale 1: stacked; every client started from B = 0, so U = M
            products = lora.mean_products(states, weights, alpha, scale)
            agg_error = lora.aggregation_error(states, weights, stacked, alpha, out_scale=1.0, target=products)
        else:  # U: the global product plus the clients' mean change (= M for one rank)
            products = lora.mean_update(states, weights, start, alpha, scale)
            agg_error = lora.aggregation_error(states, weights, adapters, alpha, scale=scale, target=products)
        new = {**self._global, **{k: v.to(self._global[k].dtype) for k, v in adapters.items()}}
        for prefix, residual in residuals.items():
            key = lora.base_weight_key(prefix, new)
            new[key] = (new[key].double() + residual.reshape(new[key].shape)).to(new[key].dtype)
            self.base_folded = True
        applied = {p: products[p] - self._applied(new, p, pairs[p], residuals) for p in products}
        self.round_metrics.update(
            bytes_up=float(sum(state_bytes(s) for s in states)),
            lora_agg_error=math.sqrt(sum(e * e for e in agg_error.values())),
            lora_update_error=math.sqrt(sum(float(d.norm()) ** 2 for d in applied.values())),
            lora_mean_update=math.sqrt(sum(float(m.norm()) ** 2 for m in products.values())),
        )
        return new

    def _applied(self, new: State, prefix: str, keys: tuple[str, str], residuals: Mapping[str, torch.Tensor]) -> Any:
        """The update the new global model applies on ``prefix`` beyond the old base: s·B·A (+ the folded part)."""
        if self.rule == "flora":  # the folded mean product; the fresh adapters start at B = 0
            return residuals[prefix]
        ak, bk = keys
        a, b = new[ak].double(), new[bk].double()
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])
        got = lora.lora_scale(self.alpha, a.shape[0], self.scale) * (b @ a)
        return got + residuals[prefix] if prefix in residuals else got

    def _fresh_adapters(self, server_round: int) -> State:
        """FLoRA's restart: A Kaiming-uniform (bound 1/√in, as LoRA's init) seeded by (seed, round), B = 0."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, server_round, 71))
        out: State = {}
        for ak, bk in lora.adapter_pairs(self._global).values():
            a = self._global[ak]
            fan_in = a[0].numel()
            out[ak] = (torch.rand(a.shape, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(fan_in)
            out[bk] = torch.zeros_like(self._global[bk], dtype=torch.float64)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: whether the base was folded (nodes then receive the adapted layers' base weights)."""
        return {**super().state_dict(), "lora_base_folded": self.base_folded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.base_folded = bool(state.get("lora_base_folded", False))


class FedAvgLoRA(LoRAStrategy):
    """FedAvg on the factors (the baseline): Ā = Σ λ_i A_i, B̄ = Σ λ_i B_i; one rank for every client."""

    rule = "fedavg"
    mixed_ranks = False


class FedExLoRA(LoRAStrategy):
    """Exact aggregation (FedEx-LoRA, Singhal et al. 2024): adapters = truncated SVD of the mean update U (or of
    M with ``refactor="product"``) at the global rank, the residual folded into the base weights the server keeps
    and sends."""

    rule = "exact"
    folds_base = True
    options = STRATEGY_OPTIONS["fedex-lora"]


class AlignedLoRA(LoRAStrategy):
    """Rank components of every client matched (LAP + signs) to a reference before averaging the factors
    (:func:`fedfuse.lora.aligned_lora`); mixed ranks are zero-padded first."""

    rule = "aligned"


class SVDLoRA(LoRAStrategy):
    """The mean update U (or the mean product M with ``refactor="product"``) re-factorised at the global rank by
    truncated SVD, the rest dropped (mixed ranks)."""

    rule = "svd"
    options = STRATEGY_OPTIONS["svd-lora"]


class HetLoRA(LoRAStrategy):
    """HetLoRA-style zero-padding (Cho et al. 2024): factors padded to the global rank, averaged; each client takes
    its first r_i components."""

    rule = "hetlora"


class FLoRA(LoRAStrategy):
    """FLoRA (Wang et al. 2024): the clients' factors stacked (exact mean product, any mix of ranks), folded into
    the base weights, adapters restarted each round. The server sends the folded base weights of the adapted
    layers (dense; FLoRA's paper sends the stacked factors instead)."""

    rule = "flora"
    folds_base = True
