"""A trusted reference update from data the server holds (FLTrust's root data set, Cao et al. NDSS 2021).

Each round the server trains the global model it sent on its own ``N`` labelled examples with the clients' local
SGD plan: ``g₀ = θ_trained − θ_sent``. The direction guard (:mod:`fedfuse.screening`) then measures every client
update against ``g₀`` instead of against the round's coordinate median. Colluding attackers can pull a median of
the clients' own updates towards them (three identical ``−4μ`` updates of ten Dirichlet-0.3 clients reach cosine +0.26
with it, above most honest clients); they cannot move ``g₀``. Unlike FLTrust, updates are not rescaled to
``‖g₀‖`` and not weighted by their cosine (both cost 20–30 points on clean non-IID runs here): the guard keeps
its projection and down-weighting, with ``g₀`` as the reference, and the norm bound lets an update exceed the
round's median norm per step only as far as it agrees with ``g₀`` (:func:`fedfuse.screening._allowance`: 1 × at
cosine ≤ 0, the full factor at ≥ 0.25) — a boosted label flip stays under the plain bound and left 14.9 points
on the table at 2 of 10 clients.

The same examples are the influence test's evidence (:mod:`fedfuse.influence`, :meth:`TrustedReference.losses`):
an outsized update keeps its claimed size only where the loss of the aggregate on them does not show harm.

In simulation the examples are a seeded draw from the training split (the clients' own distribution): an
optimistic stand-in for a server's own labelled data, as in FLTrust's experiments.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedfuse.errors import ConfigError
from fedfuse.screening_options import TRUSTED_DATA
from fedfuse.train import example_losses

__all__ = ["TrustedReference", "OnWhole", "trusted_examples", "trusted_reference"]

State = Mapping[str, Tensor]
LOSS_CAP = 10.0  # nats (p(true class) ≈ 4.5e-5): above it a per-example loss counts logarithmically
TrainFn = Callable[[nn.Module, Tensor, Tensor, int], Any]  # (model, x, y, server_round): trains in place


class TrustedReference:
    """``reference(sent, server_round)`` → the state ``model`` reaches from ``sent`` after ``train`` on ``(x, y)``.

    ``train(model, x, y, server_round)`` must be deterministic in its arguments, so a resumed run computes the
    same reference."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, train: TrainFn) -> None:
        if len(x) < 1 or len(x) != len(y):
            raise ConfigError(f"trusted data needs >= 1 labelled example; got {len(x)} inputs and {len(y)} labels")
        self.model, self.x, self.y, self.train = copy.deepcopy(model), x, y, train

    def __call__(self, sent: State, server_round: int) -> dict[str, Tensor]:
        model = self.model
        model.load_state_dict(dict(sent))
        self.train(model, self.x, self.y, server_round)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def losses(self, state: State) -> Tensor:
        """The per-example cross-entropy ``ℓ`` of ``state`` on the server's examples, in eval mode, compressed
        above ``C`` = ``LOSS_CAP`` nats to ``C + log(1 + ℓ − C)`` (the influence test's evidence,
        :mod:`fedfuse.influence`). Raw, a junk aggregate's few examples at 10³ nats made its standard error so wide
        that a mean loss of 56 vs 2.3 was not significant; clamped at ``C``, two junk trials (10⁵ vs 10³ nats)
        both read ``C`` and could not be told apart. The log keeps their order and shrinks the tail."""
        self.model.load_state_dict(dict(state))
        loss = example_losses(self.model, self.x, self.y)
        return torch.where(loss > LOSS_CAP, LOSS_CAP + torch.log1p((loss - LOSS_CAP).clamp(min=0)), loss)


class OnWhole:
    """A trusted reference for a strategy whose clients get and send only a part of its model (LoRA: the adapters
    and dense keys): the server trains, and measures, the whole model ``whole()`` it holds. ``reference`` is a
    :class:`TrustedReference` or any ``(state, round) -> state`` callable; ``losses`` is None for one without
    ``losses`` (then there is no influence test)."""

    def __init__(self, reference: Callable[[State, int], State], whole: Callable[[], State]) -> None:
        self.reference, self.whole = reference, whole
        own = getattr(reference, "losses", None)
        self.losses: Callable[[State], Tensor] | None = (lambda state: own({**whole(), **state})) if own else None

    def __call__(self, sent: State, server_round: int) -> dict[str, Tensor]:
        """g₀'s end state, trained from the whole model (``sent`` is a part of it)."""
        return dict(self.reference(self.whole(), server_round))


def trusted_examples(cfg: Mapping[str, Any], ds: Any) -> tuple[Tensor, Tensor] | None:
    """The ``trusted-data`` = N labelled examples the server holds, or None when N = 0: N training examples drawn
    without replacement by a generator seeded with ``derive_seed(seed, 37)``. The default N takes the whole split
    when it holds fewer; an N set above the split's size is one line (the CLI's preflight calls this before
    anything is written)."""
    n = int(cfg.get("trusted-data", 0) or 0)
    if n <= 0:
        return None
    from fedfuse.experiment import derive_seed

    total = len(ds.x_train)
    if n == TRUSTED_DATA:
        n = min(n, total)
    if n > total:
        raise ConfigError(f"trusted-data={n} exceeds the {total} training samples of {ds.name!r}; allowed: 0..{total}")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(derive_seed(int(cfg["seed"]), 37)))[:n]
    return ds.x_train[idx].clone(), ds.y_train[idx].clone()


def trusted_reference(cfg: Mapping[str, Any], model: nn.Module) -> TrustedReference | None:
    """The run's trusted reference (``trusted-data`` = N > 0 and the direction guard on), or None:
    :func:`trusted_examples`, trained on with the run's local SGD (``local-epochs``, ``batch-size``, ``lr``…) and a
    shuffling seed derived from (seed, round)."""
    from fedfuse.experiment import LocalPlan, dataset_for, derive_seed, local_train

    wanted = int(cfg.get("trusted-data", 0) or 0) > 0 and cfg.get("direction-guard", "median") != "off"
    examples = trusted_examples(cfg, dataset_for(cfg)) if wanted else None
    if examples is None:
        return None
    seed = int(cfg["seed"])

    def train(m: nn.Module, x: Tensor, y: Tensor, server_round: int) -> None:
        plan = LocalPlan(int(cfg["local-epochs"]), None, derive_seed(seed, server_round, 38), False)
        with torch.random.fork_rng(devices=[]):  # dropout draws from a generator seeded by (seed, round) alone
            torch.manual_seed(derive_seed(seed, server_round, 39))
            local_train(cfg, m, x, y, plan)

    return TrustedReference(model, *examples, train)
