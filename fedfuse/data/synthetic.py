"""FedProx's Synthetic(α, β) federation, generated lazily: client ``k``'s data is a function of ``(seed, k)`` only.

Li et al., *Federated Optimization in Heterogeneous Networks* (MLSys 2020), §5.1, as their generator
(``data/synthetic_*/generate_niid.py``) draws it — α and β are standard deviations there, as here:

* per client ``k``: ``u_k ~ N(0, α)``, ``W_k ~ N(u_k, 1)`` (60×10), ``b_k ~ N(u_k, 1)`` (10): α sets how much
  the clients' labelling functions differ;
* ``B_k ~ N(0, β)``, ``v_k ~ N(B_k, 1)`` (60), ``x ~ N(v_k, Σ)`` with ``Σ = diag(j^-1.2)``, j = 1…60: β sets
  how much their inputs differ;
* ``y = argmax(softmax(x W_k + b_k))``; the sample count is ``⌊lognormal(4, 2)⌋ + 50`` (a power law), of
  which the first 90 % train and the last 10 % are held out.

Nothing is drawn for the federation as a whole, so any number of clients costs nothing until a client is
asked for, and client ``k`` gets the same data whatever the number of clients. The server's test set is
the held-out part of clients ``0…TEST_CLIENTS-1`` (the same set for every number of clients, so runs of
different sizes are scored alike); the train parts of those clients stand for the training split where a
run needs one (``server-data``, BN reset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedfuse.catalog import SYNTHETIC_REASON, synthetic_params
from fedfuse.errors import ConfigError

__all__ = ["Synthetic", "parse_synthetic", "synthetic_problem", "DIM", "NUM_CLASSES", "TEST_CLIENTS"]

DIM, NUM_CLASSES, TEST_CLIENTS, TRAIN_FRACTION = 60, 10, 100, 0.9
_SIGMA = np.arange(1, DIM + 1, dtype=np.float64) ** -0.6  # sqrt of diag(j^-1.2)
_TAG = 1_000_003  # keeps the data's seed stream apart from the run's other derived seeds


def synthetic_problem(name: str) -> str | None:
    """Why ``name`` is not ``synthetic`` or ``synthetic:ALPHA,BETA`` (two numbers >= 0), or None."""
    return None if synthetic_params(name) is not None else SYNTHETIC_REASON


def parse_synthetic(name: str) -> tuple[float, float]:
    """``(α, β)`` of ``synthetic`` (= Synthetic(1, 1), FedProx's most heterogeneous) or ``synthetic:ALPHA,BETA``."""
    params = synthetic_params(name)
    if params is None:
        raise ConfigError(f"dataset={name!r} {SYNTHETIC_REASON}")
    return params


@dataclass(frozen=True)
class Synthetic:
    """The Synthetic(α, β) federation of seed ``seed``; :meth:`client` draws one client's data."""

    alpha: float
    beta: float
    seed: int

    def _raw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 0:
            raise ConfigError(f"synthetic client id={k} must be >= 0")
        rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), _TAG, int(k)]))
        n = int(rng.lognormal(4.0, 2.0)) + 50
        u = rng.normal(0.0, self.alpha)
        w = rng.normal(u, 1.0, (DIM, NUM_CLASSES))
        b = rng.normal(u, 1.0, NUM_CLASSES)
        v = rng.normal(rng.normal(0.0, self.beta), 1.0, DIM)
        x = v + rng.standard_normal((n, DIM)) * _SIGMA
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: its argmax is the logits'
        return x.astype(np.float32), y.astype(np.int64)

    def client(self, k: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``k``'s ``train`` (first 90 %) or ``test`` (last 10 %) samples: float32 (n, 60), int64 (n,)."""
        x, y = self._raw(k)
        cut = int(TRAIN_FRACTION * len(x))
        sl = slice(0, cut) if split == "train" else slice(cut, None)
        return torch.from_numpy(x[sl].copy()), torch.from_numpy(y[sl].copy())

    def pooled(self, clients: range, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``split`` samples of ``clients``, concatenated in client order."""
        xs, ys = zip(*(self.client(k, split) for k in clients), strict=True)
        return torch.cat(xs), torch.cat(ys)
