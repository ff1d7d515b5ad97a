"""Plain PyTorch local training and evaluation, shared by clients, benchmarks and tests.

Batches are drawn from in-memory tensors with a seeded ``torch.Generator``, so a (seed, data)
pair fixes the exact sequence of SGD steps on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "TrainResult",
    "make_optimizer",
    "train",
    "evaluate",
    "example_losses",
    "iterate_batches",
    "state_to_numpy",
]


@dataclass
class TrainResult:
    """Mean loss/accuracy over the last local epoch, and the number of samples seen per epoch."""

    loss: float
    accuracy: float
    num_examples: int
    steps: int


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches (a random permutation from ``generator`` per call = one epoch)."""
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The local optimiser ``name``: ``sgd`` = SGD(lr, momentum, weight_decay), ``adam`` = Adam(lr, weight_decay as
    an L2 term in the gradient), ``adamw`` = AdamW(lr, decoupled weight decay: w ← w − lr·wd·w each step); Adam's
    betas are PyTorch's (0.9, 0.999). Parameters without a gradient (a LoRA client's frozen base) do not move."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r} is unknown; allowed: sgd, adam, adamw")


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    after_step: Callable[[], None] | None = None,
    max_steps: int | None = None,
    proximal_mu: float = 0.0,
    max_grad_norm: float = 0.0,
) -> TrainResult:
    """Minimise cross-entropy with SGD(lr, momentum, weight_decay) for ``epochs`` passes over (x, y).

    ``after_step`` runs after every optimizer step (e.g. to restore frozen entries); a custom
    ``optimizer`` replaces the default SGD; ``max_steps`` stops early (a straggler's partial work).
    ``proximal_mu`` = μ > 0 (FedProx) minimises ``CE(w) + (μ/2)·‖w − w₀‖²`` with w₀ the parameters at the
    start (the received global model): its gradient μ·(w − w₀) is added to each parameter's gradient before
    the step. The reported loss is the cross-entropy alone. ``max_grad_norm`` = c > 0 rescales each step's
    gradient g over the trained parameters to g·min(1, c/‖g‖₂) (``torch.nn.utils.clip_grad_norm_``; Hugging Face's
    Trainer does so with c = 1).
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty data set")
    if not proximal_mu >= 0.0:
        raise ValueError(f"proximal_mu={proximal_mu!r} is out of range; allowed: a number >= 0")
    if not max_grad_norm >= 0.0:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} is out of range; allowed: a number >= 0 (0 = off)")
    model.train()
    for m in model.modules():  # a frozen BatchNorm (a LoRA base's) keeps its statistics: train as it is evaluated
        params = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            m.eval()
    trained = [p for p in model.parameters() if p.requires_grad]
    anchor = [(p, p.detach().clone()) for p in trained] if proximal_mu > 0 else []
    opt = optimizer or make_optimizer("sgd", model.parameters(), lr, momentum, weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(int(epochs)):
        ep_loss, ep_correct, ep_seen = 0.0, 0, 0
        for xb, yb in iterate_batches(x, y, batch_size, gen):
            if max_steps is not None and steps >= max_steps:
                break
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            for p, p0 in anchor:  # ∇ (μ/2)‖w − w₀‖² = μ (w − w₀)
                if p.grad is not None:
                    p.grad.add_(p.detach() - p0, alpha=proximal_mu)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
            opt.step()
            if after_step is not None:
                after_step()
            steps += 1
            ep_loss += float(loss.detach()) * len(xb)
            ep_correct += int((logits.detach().argmax(1) == yb).sum())
            ep_seen += len(xb)
        if ep_seen:  # report the last epoch that ran
            total_loss, correct, seen = ep_loss, ep_correct, ep_seen
        if max_steps is not None and steps >= max_steps:
            break
    seen = max(seen, 1)
    return TrainResult(total_loss / seen, correct / seen, len(x), steps)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y) in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for xb, yb in iterate_batches(x, y, batch_size):
        logits = model(xb)
        total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(len(x), 1)
    return total_loss / n, correct / n


@torch.no_grad()
def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The per-example cross-entropy of ``model`` on (x, y) in eval mode (float64, in the order of ``x``)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([nn.functional.cross_entropy(model(xb), yb, reduction="none").double()
                          for xb, yb in iterate_batches(x, y, batch_size)])  # fmt: skip
    finally:
        model.train(was_training)


def state_to_numpy(model: nn.Module) -> dict[str, object]:
    """State dict as numpy arrays (zero-copy views of contiguous CPU tensors)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
