"""Server-side ensemble distillation (FedDF: Lin, Kong, Stich, Jaggi, "Ensemble Distillation for Robust Model
Fusion in Federated Learning", NeurIPS 2020).

The fused model is the student ``s`` (initialised from the fusion); the parents ``f_1..f_K`` are the teachers.
On an unlabeled batch ``D`` the student minimises

    L(s) = T² · E_{d∈D} KL( σ(z̄(d)/T) ‖ σ(s(d)/T) ),   z̄(d) = Σ_k λ_k f_k(d)

(``σ`` the softmax, ``z̄`` the λ-averaged teachers' logits — FedDF averages logits, then distils with KL; the
T² factor keeps gradient sizes comparable across temperatures, Hinton et al. 2015). No labels are used.
Adam (FedDF's optimiser) over mini-batches in a seeded order; *(our choice, label-free in place of FedDF's
labelled validation set)* a tenth of ``D`` (when ``D`` has ≥ 20 samples) is held out and the student with the
lowest held-out KL, checked after every epoch, is returned — the starting student included, so distillation never
returns a student further from the ensemble (on held-out inputs) than the fusion it started from.

:func:`synthetic_inputs` is the data-free case: Gaussian inputs matching per-feature mean and standard deviation
(of a batch, or given), the cheapest statistics a server can hold without any sample.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedfuse.errors import ConfigError
from fedfuse.state import normalise_weights, torch_threads

__all__ = ["distill", "distill_states", "ensemble_logits", "synthetic_inputs"]


@torch.no_grad()
def ensemble_logits(teachers: Sequence[nn.Module], data: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """``z̄ = Σ_k λ_k f_k(data)``: the λ-averaged logits of the teachers in eval mode (λ uniform by default)."""
    lam = normalise_weights(weights, len(teachers))
    out: Tensor | None = None
    for t, w in zip(teachers, lam, strict=True):
        was = t.training
        t.eval()
        z = t(data).float() * w
        t.train(was)
        out = z if out is None else out + z
    assert out is not None
    return out


def _kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t


def _check(student: nn.Module, teachers: Sequence[nn.Module], data: Tensor, epochs: int, lr: float,
           batch_size: int, temperature: float) -> None:  # fmt: skip
    if not isinstance(student, nn.Module):
        raise ConfigError(f"distill: student must be an nn.Module, got {type(student).__name__}")
    if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
        raise ConfigError("distill: teachers must be a non-empty sequence of nn.Module")
    if not isinstance(data, Tensor) or data.dim() < 2 or len(data) < 2:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ConfigError(f"distill: data must be a batch of at least 2 inputs (a tensor N×…), got {shape}")
    if int(epochs) < 1 or int(batch_size) < 1:
        raise ConfigError(f"distill: epochs={epochs} and batch_size={batch_size} must be >= 1")
    if not (lr > 0 and temperature > 0):
        raise ConfigError(f"distill: lr={lr} and temperature={temperature} must be > 0")


def distill(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    data: Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """FedDF (see module docstring): the student's state dict after distilling the teachers' averaged logits.

    ``student`` is not modified (a copy is trained). ``weights``: λ of the logit average (uniform by default).
    Deterministic for a ``seed`` (seeded batch order and hold-out split, one thread).
    """
    _check(student, teachers, data, epochs, lr, batch_size, temperature)
    data = data if data.dtype in (torch.int64, torch.int32) else data.float()  # token ids stay integers
    with torch_threads(1):
        try:
            target = ensemble_logits(teachers, data, weights)
        except RuntimeError as exc:
            raise ConfigError(f"distill: the teachers cannot run on data of shape {tuple(data.shape)} ({exc})") from exc
        net = copy.deepcopy(student)
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(len(data), generator=gen)
        n_val = len(data) // 10 if len(data) >= 20 else 0
        val, fit = order[:n_val], order[n_val:]

        def held_out() -> float:
            if not n_val:
                return 0.0
            net.eval()
            with torch.no_grad():
                return float(_kl(net(data[val]), target[val], temperature))

        best, best_state = held_out(), copy.deepcopy(net.state_dict())
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        bs = min(int(batch_size), len(fit))
        for _ in range(int(epochs)):
            net.train()
            perm = fit[torch.randperm(len(fit), generator=gen)]
            for start in range(0, len(perm) - bs + 1, bs):  # full batches only: BatchNorm needs > 1 sample
                idx = perm[start : start + bs]
                opt.zero_grad(set_to_none=True)
                loss = _kl(net(data[idx]), target[idx], temperature)
                loss.backward()
                opt.step()
            score = held_out()
            if not n_val or score < best:
                best, best_state = score, copy.deepcopy(net.state_dict())
    return {k: v.detach().clone() for k, v in best_state.items()}


def synthetic_inputs(
    n: int,
    like: Tensor | None = None,
    *,
    shape: Sequence[int] | None = None,
    mean: Tensor | float = 0.0,
    std: Tensor | float = 1.0,
    seed: int = 0,
) -> Tensor:
    """``n`` Gaussian inputs ``x ~ N(μ, σ²)`` per feature: μ, σ of ``like`` (a batch) or given with ``shape``.

    The data-free distillation batch: a server that holds no sample can still hold per-feature statistics
    (the clients' pooled mean and standard deviation). Seeded.
    """
    if int(n) < 1:
        raise ConfigError(f"synthetic_inputs: n={n} must be >= 1")
    if like is not None:
        if not isinstance(like, Tensor) or like.dim() < 2 or len(like) < 2:
            raise ConfigError("synthetic_inputs: like= must be a batch of at least 2 inputs (a tensor N×…)")
        x = like.float()
        mean, std, shape = x.mean(0), x.std(0), tuple(x.shape[1:])
    elif shape is None:
        raise ConfigError("synthetic_inputs needs like= (a batch) or shape= (one input's shape)")
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn((int(n), *shape), generator=gen)
    return z * torch.as_tensor(std, dtype=torch.float32) + torch.as_tensor(mean, dtype=torch.float32)


def distill_states(
    model: nn.Module, student: dict[str, Tensor], teachers: Sequence[dict[str, Tensor]], data: Tensor, *,
    epochs: int, seed: int, weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """FedDF on state dicts: ``student`` distilled from the ``teachers`` (λ = normalised ``weights``) on the
    unlabeled ``data``, each loaded into a deep copy of ``model`` (the architecture); in ``student``'s dtypes."""
    from fedfuse.align.transport import load_state

    nets = [load_state(copy.deepcopy(model), s) for s in (student, *teachers)]
    out = distill(nets[0], nets[1:], data, epochs=epochs, seed=seed, weights=weights)
    return {k: out[k].to(v.dtype) for k, v in student.items()}
