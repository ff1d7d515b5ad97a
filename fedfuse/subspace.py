"""Training-time neuron alignment (TNA-PFN, Li et al. 2024): train only a shared random subspace.

All models share an init and a seeded random mask. Every mask in this module is a **fixed mask**:
``fixed[name]`` is a 0/1 float tensor shaped like parameter ``name``, where **1 = FIXED** (the entry
keeps its initial value) and 0 = free (the entry learns). Training then follows

    p <- p - lr * (grad ⊙ (1 - fixed))

and, for any optimizer (momentum, weight decay, Adam state), fixed entries are restored after every
step, so they never move, bit for bit. Because a mask depends only on (seed, parameter names,
shapes), a server and its clients rebuild the same mask from the seed alone.

- FedPFN: one mask for the whole run, ``pfn_mask(model, ratio, seed)``.
- FedPNU (our reading): the mask is redrawn every round, ``pnu_mask(model, ratio, seed, round)``.
- Random pruning at init (baseline): ``prune_at_init`` zeroes the fixed entries, masked training keeps them 0.

Pure PyTorch; never imports Flower.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn

from fedfuse.errors import ConfigError
from fedfuse.selection import matches

__all__ = [
    "GRANULARITIES",
    "LAYER_GROUPS",
    "MaskedTraining",
    "fixed_distance",
    "mask_ratio",
    "pfn_mask",
    "pnu_mask",
    "prune_at_init",
]

GRANULARITIES = ("weight", "neuron")
LAYER_GROUPS = ("all", "first", "middle", "last")
MODES = ("freeze", "slow")

# weight_ih_l0 / weight_hh_l0 / bias_ih_l0 / bias_hh_l0 (and *_reverse) of one RNN layer index the same gate rows.
_RNN_PARAM = re.compile(r"^(?:weight|bias)_(?:ih|hh)_(l\d+(?:_reverse)?)$")


# ----------------------------------------------------------------------------- mask drawing


def _tensor_seed(salt: str, key: str) -> int:
    """Stable 32-bit seed for one tensor/neuron group: ``crc32(salt + key)`` (Python's ``hash`` is salted per run)."""
    return zlib.crc32(f"{salt}|{key}".encode())


def _draw(n: int, ratio: float, salt: str, key: str) -> torch.Tensor:
    """Indices of ``round(ratio * n)`` distinct entries of ``range(n)``, from a CPU generator seeded by (salt, key)."""
    k = round(ratio * n)
    gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(salt, key))
    return torch.randperm(n, generator=gen)[:k]


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) < 1.0):
        raise ConfigError(f"mask ratio={ratio!r} is invalid; allowed: a number with 0 <= ratio < 1")
    return float(ratio)


def _param_table(model: nn.Module) -> list[tuple[str, str, str, nn.Parameter]]:
    """``(module name, local name, full name, parameter)`` in registration order, shared parameters once."""
    seen: set[int] = set()
    rows: list[tuple[str, str, str, nn.Parameter]] = []
    for mod_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            rows.append((mod_name, local, f"{mod_name}.{local}" if mod_name else local, param))
    return rows


def _select(table: list[tuple[str, str, str, nn.Parameter]], layers: str | Sequence[str]) -> set[str]:
    """Full names of the parameters that get a mask.

    ``"first"`` / ``"last"``: the parameters of the first / last module (registration order) that owns
    parameters; ``"middle"``: all other modules; a list of glob patterns in the grammar of
    :func:`fedfuse.selection.matches` (``"net.1"`` selects ``net.1.weight`` and ``net.1.bias``).
    """
    bad = ConfigError(f"layers={layers!r} is invalid; allowed: {', '.join(LAYER_GROUPS)} or a list of glob patterns")
    if isinstance(layers, str):
        if layers not in LAYER_GROUPS:
            raise bad
        modules = list(dict.fromkeys(mod for mod, _, _, _ in table))
        if layers == "all":
            chosen = set(modules)
        elif layers == "first":
            chosen = set(modules[:1])
        elif layers == "last":
            chosen = set(modules[-1:])
        else:
            chosen = set(modules[1:-1])
        return {full for mod, _, full, _ in table if mod in chosen}
    patterns = list(layers) if isinstance(layers, Sequence) else []
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise bad
    selected: set[str] = set()
    for pattern in patterns:
        hits = {full for _, _, full, _ in table if matches(full, pattern)}
        if not hits:
            names = ", ".join(full for _, _, full, _ in table)
            raise ConfigError(f"layers pattern {pattern!r} matches no parameter; parameters are: {names}")
        selected |= hits
    return selected


def _neuron_group(mod_name: str, local: str) -> str:
    """Parameters sharing a group key share one row choice: a module's weight and bias, or one RNN layer's
    ``weight_ih``/``weight_hh``/``bias_ih``/``bias_hh`` (each gate row is one row)."""
    match = _RNN_PARAM.match(local)
    if match:
        return f"{mod_name}:{match.group(1)}"
    if local.startswith("weight_hr"):  # LSTM projection: its rows are the projected units, a group of its own
        return f"{mod_name}:{local}"
    return mod_name


def _fixed_masks(
    model: nn.Module, ratio: float, salt: str, granularity: str, layers: str | Sequence[str]
) -> dict[str, torch.Tensor]:
    ratio = _check_ratio(ratio)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity={granularity!r} is invalid; allowed: {', '.join(GRANULARITIES)}")
    table = _param_table(model)
    selected = _select(table, layers)

    # neuron granularity: one row count per group = dim 0 of its first >=2-d parameter (else of its first one)
    group_rows: dict[str, int] = {}
    if granularity == "neuron":
        for mod, local, _, param in sorted(table, key=lambda row: row[3].dim() < 2):
            if param.dim() >= 1:
                group_rows.setdefault(_neuron_group(mod, local), param.shape[0])

    masks: dict[str, torch.Tensor] = {}
    for mod, local, full, param in table:
        flat = torch.zeros(param.numel(), dtype=torch.float32)
        if full in selected and ratio > 0:
            group = _neuron_group(mod, local)
            if granularity == "weight" or param.dim() == 0:
                flat[_draw(param.numel(), ratio, salt, full)] = 1.0
            else:  # a parameter whose dim 0 is not its group's rows gets its own row draw
                key = f"neuron:{group}" if group_rows[group] == param.shape[0] else f"neuron:{full}"
                rows = torch.zeros(param.shape[0], dtype=torch.float32)
                rows[_draw(param.shape[0], ratio, salt, key)] = 1.0
                flat = rows.repeat_interleave(param[0].numel())  # row r covers entries [r*k, (r+1)*k)
        masks[full] = flat.reshape(param.shape).to(param.device)
    return masks


def pfn_mask(
    model: nn.Module,
    ratio: float = 0.4,
    seed: int = 0,
    *,
    granularity: Literal["weight", "neuron"] = "weight",
    layers: str | Sequence[str] = "all",
) -> dict[str, torch.Tensor]:
    """FedPFN fixed masks: ``{name: fixed}`` for every ``named_parameters`` entry, **1 = fixed**, 0 = free.

    - ``"weight"``: each selected tensor (biases and norm weights included) fixes exactly
      ``round(ratio * numel)`` entries, drawn independently per tensor.
    - ``"neuron"``: each selected tensor fixes ``round(ratio * rows)`` whole rows along dim 0 (a neuron's
      incoming weights; for an RNN every gate row of ``weight_ih``/``weight_hh`` is a row). Parameters of
      the same module with the same dim 0 (biases; an RNN layer's ih/hh weights and biases) share the
      row choice; a module of only 1-d parameters (a norm layer) fixes whole channels.
    - ``layers``: ``"all"``, ``"first"``/``"last"`` (first/last module owning parameters, registration
      order), ``"middle"`` (the others) or a list of glob patterns on parameter or module names.
      Unselected parameters get an all-zero (fully free) mask.

    The draw for a tensor depends only on (seed, its name, its shape): the same on any machine, for any
    model instance of the same architecture, and independent of ``layers``. Raises ConfigError on
    ``ratio`` outside ``[0, 1)``, an unknown granularity or layer group, or a pattern matching nothing.
    """
    return _fixed_masks(model, ratio, f"pfn:{int(seed)}", granularity, layers)


def pnu_mask(
    model: nn.Module,
    ratio: float = 0.4,
    seed: int = 0,
    round: int = 0,  # the FL round number (shadows the builtin only inside this function)
    *,
    granularity: Literal["weight", "neuron"] = "weight",
    layers: str | Sequence[str] = "all",
) -> dict[str, torch.Tensor]:
    """FedPNU fixed masks: like :func:`pfn_mask` but redrawn every round from ``(seed, round)``, so over
    rounds every weight gets updated (each round trains a fresh ``1 - ratio`` share)."""
    return _fixed_masks(model, ratio, f"pnu:{int(seed)}:{int(round)}", granularity, layers)


# ----------------------------------------------------------------------------- masked training


class MaskedTraining:
    """Train only the free entries (``fixed == 0``) of ``model``.

    ``mode="freeze"`` (TNA-PFN): the gradient of fixed entries is zeroed by a tensor hook
    (``grad <- grad ⊙ (1 - fixed)``), AND after every optimizer step fixed entries are restored from a
    copy taken at :meth:`attach`/``__enter__``; so momentum, weight decay or Adam state can never move
    them, bit for bit. The restore runs either as an optimizer step post-hook (``attach(optimizer)``)
    or via :attr:`after_step` (for ``fedfuse.train.train(..., after_step=mt.after_step)``).

    ``mode="slow"``: fixed entries learn at a reduced rate, ``grad <- grad ⊙ (1 - fixed + slow_scale·fixed)``;
    nothing is restored, so weight decay and momentum still apply to them in full, and under Adam-like
    optimizers the per-entry normalisation largely cancels the scaling (meaningful for SGD).

    Parameters absent from ``fixed_masks`` (or with an all-zero mask) are fully free. Buffers (BatchNorm
    running stats) are never masked. Use a fresh instance (or call :meth:`snapshot`) after loading new
    weights into the model, since the restore copies the values seen at attach time.

    Example::

        with MaskedTraining(model, pfn_mask(model, 0.4, seed)) as mt:
            train(model, x, y, momentum=0.9, after_step=mt.after_step)
    """

    def __init__(
        self,
        model: nn.Module,
        fixed_masks: Mapping[str, torch.Tensor],
        mode: Literal["freeze", "slow"] = "freeze",
        slow_scale: float = 0.1,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is invalid; allowed: {', '.join(MODES)}")
        if isinstance(slow_scale, bool) or not isinstance(slow_scale, (int, float)) or not 0.0 <= slow_scale <= 1.0:
            raise ConfigError(f"slow_scale={slow_scale!r} is invalid; allowed: a number with 0 <= slow_scale <= 1")
        params = dict(model.named_parameters())
        unknown = sorted(set(fixed_masks) - set(params))
        if unknown:
            raise ConfigError(f"fixed_masks name unknown parameters {unknown}; the model has {sorted(params)}")
        self.model = model
        self.mode = mode
        self.slow_scale = float(slow_scale)
        # only parameters with at least one fixed entry need hooks / restores; masks kept as bool
        self._fixed: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        for name, mask in fixed_masks.items():
            param = params[name]
            if tuple(mask.shape) != tuple(param.shape):
                raise ConfigError(
                    f"fixed mask for {name!r} has shape {tuple(mask.shape)}; the parameter has {tuple(param.shape)}"
                )
            fixed = mask.detach().to(device=param.device) != 0
            if bool(fixed.any()):
                self._fixed[name] = (param, fixed)
        self._saved: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _grad_hook(self, fixed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.mode == "freeze":
            return lambda grad: grad.masked_fill(fixed, 0)
        scale = self.slow_scale
        return lambda grad: torch.where(fixed, grad * scale, grad)

    def snapshot(self) -> None:
        """Copy the current values of the fixed entries; :meth:`restore` writes them back."""
        self._saved = {name: param.detach()[fixed].clone() for name, (param, fixed) in self._fixed.items()}

    @torch.no_grad()
    def restore(self) -> None:
        """Write the snapshot back into the fixed entries (no-op in ``"slow"`` mode)."""
        if self.mode != "freeze":
            return
        for name, (param, fixed) in self._fixed.items():
            param[fixed] = self._saved[name]

    @property
    def after_step(self) -> Callable[[], None]:
        """Zero-argument callable for ``fedfuse.train.train(..., after_step=...)``: restores fixed entries."""
        return self.restore

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> MaskedTraining:
        """Snapshot fixed entries, hook their gradients and, given ``optimizer``, restore after each of its steps."""
        self.detach()
        self.snapshot()
        for param, fixed in self._fixed.values():
            self._handles.append(param.register_hook(self._grad_hook(fixed)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore()))
        return self

    def detach(self) -> None:
        """Remove every hook this object registered (the model keeps its current values)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MaskedTraining:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach()


@torch.no_grad()
def prune_at_init(model: nn.Module, fixed_masks: Mapping[str, torch.Tensor]) -> None:
    """Random pruning at init: ``p <- p ⊙ (1 - fixed)`` in place; train with :class:`MaskedTraining` on the
    same masks (attached after this call) to keep the pruned entries at exactly 0."""
    params = dict(model.named_parameters())
    for name, mask in fixed_masks.items():
        if name not in params:
            raise ConfigError(f"fixed mask names unknown parameter {name!r}")
        param = params[name]
        param.masked_fill_(mask.to(device=param.device) != 0, 0)


# ----------------------------------------------------------------------------- federated-side helpers


def mask_ratio(masks: Mapping[str, torch.Tensor], over: Literal["all", "masked"] = "all") -> float:
    """Fraction of fixed entries, ``sum(fixed) / numel``: over all tensors (``"all"``) or only over tensors
    with at least one fixed entry (``"masked"``). 0.0 for no entries."""
    if over not in ("all", "masked"):
        raise ConfigError(f"over={over!r} is invalid; allowed: all, masked")
    fixed = total = 0
    for mask in masks.values():
        count = int(torch.count_nonzero(mask))
        if over == "masked" and count == 0:
            continue
        fixed += count
        total += mask.numel()
    return fixed / total if total else 0.0


def fixed_distance(state_a: Mapping[str, Any], state_b: Mapping[str, Any], masks: Mapping[str, torch.Tensor]) -> float:
    """L2 distance on fixed entries, ``sqrt(sum_name ||(a - b) ⊙ fixed||^2)`` in float64.

    States are state dicts (tensors or numpy arrays) holding every masked name; FedPFN keeps this at 0.
    """
    total = 0.0
    for name, mask in masks.items():
        if name not in state_a or name not in state_b:
            raise KeyError(f"fixed_distance: parameter {name!r} is missing from a state")
        a = torch.as_tensor(state_a[name]).detach().to("cpu", torch.float64)
        b = torch.as_tensor(state_b[name]).detach().to("cpu", torch.float64)
        fixed = mask.detach().to("cpu") != 0
        total += float(((a - b)[fixed] ** 2).sum())
    return math.sqrt(total)
