"""What ``fedfuse merge`` reads, checked before anything runs: the model, the parents, the data.

Every problem is a :class:`~fedfuse.errors.ConfigError` with one line naming the bad value (the CLI's exit 2):
a missing file, a file holding pickled code (parents are read with ``torch.load(weights_only=True)``, which
never runs code), a parent whose keys or shapes do not fit the model (the first mismatch named), a data file
without ``x``/``y``, data whose samples do not fit the model.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fedfuse.catalog import LORA_ALPHA
from fedfuse.checkpoint import read_state_dict
from fedfuse.errors import ConfigError

__all__ = ["Inputs", "load_inputs", "build_template", "load_parent", "load_peft_parent", "lora_folder", "check_fits"]


@dataclass(frozen=True)
class Inputs:
    """Samples ``x`` (float32) and, for test data, labels ``y`` (int64); ``label`` names where they came from."""

    x: Tensor
    y: Tensor | None
    label: str
    num_classes: int | None = None  # a built-in data set's class count


def load_inputs(
    spec: str, *, flag: str, labelled: bool, split: str = "test", data_root: str = "", seed: int = 0
) -> Inputs:
    """``spec`` = a user's ``.npz`` (arrays ``x`` and, when ``labelled``, ``y``; read without pickle) or a
    built-in data set's name (its ``split``: ``"test"`` or ``"train"``, standardised as fedfuse trains on it)."""
    from fedfuse.data import DATASETS, load_dataset

    if spec in DATASETS:
        ds = load_dataset(spec, data_root or None, seed)
        x, y = (ds.x_test, ds.y_test) if split == "test" else (ds.x_train, ds.y_train)
        return Inputs(x, y if labelled else None, f"{spec} ({split} split)", ds.num_classes)
    path = Path(spec).expanduser()
    if not path.suffix == ".npz":
        raise ConfigError(
            f"{flag}={spec!r} is neither an .npz file (arrays x{', y' if labelled else ''}) nor a data set; "
            f"allowed data sets: {', '.join(DATASETS)}"
        )
    if not path.is_file():
        raise ConfigError(f"{flag}={spec!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in ("x", "y")}
    except Exception as exc:  # noqa: BLE001 — any unreadable file is bad input, named
        raise ConfigError(f"{flag}={spec!r} is not a readable .npz ({type(exc).__name__}: {exc})") from None
    need = ("x", "y") if labelled else ("x",)
    missing = [k for k in need if k not in arrays]
    if missing:
        raise ConfigError(f"{flag}={spec!r} lacks array(s) {', '.join(missing)}; expected {', '.join(need)}")
    x = arrays["x"]
    if x.ndim < 2 or len(x) == 0 or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ConfigError(f"{flag}={spec!r}: x must be a non-empty real array of samples (N×…), got {x.shape}")
    xt = torch.as_tensor(x.astype(np.float32))
    if not torch.isfinite(xt).all():
        raise ConfigError(f"{flag}={spec!r}: x contains NaN or infinite values")
    yt = None
    if labelled:
        y = arrays["y"]
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)) or y.min() < 0:
            raise ConfigError(f"{flag}={spec!r}: y must hold one integer label >= 0 per sample (x has {len(x)})")
        yt = torch.as_tensor(y.astype(np.int64))
    return Inputs(xt, yt, str(path))


def _import_factory(spec: str) -> object:
    """``package.module:factory`` imported as ``--strategy package.module:Class`` is: from the working directory."""
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"model={spec!r} cannot be imported ({exc})") from None
    if not callable(factory):
        raise ConfigError(f"model={spec!r} is not callable; expected a function or class returning an nn.Module")
    return factory


def build_template(
    spec: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int = 0,
    depth: int = 0,
    batch_norm: bool = False,
    seed: int = 0,
    group_norm: int = 0,
) -> nn.Module:
    """The architecture the parents share: a name ``simulate`` takes (``mlp``, ``cnn``, …, ``torchvision:NAME``,
    ``timm:NAME``) built for the data's ``input_shape`` and ``num_classes``, or a user's ``package.module:factory``
    called as ``factory()`` or, when it takes arguments, ``factory(input_shape, num_classes)``."""
    from fedfuse.models import build_model, library_of, model_name_problem

    if ":" in spec and library_of(spec) is None:
        factory = _import_factory(spec)
        asked = [f"{k}={v}" for k, v in (("width", width), ("depth", depth)) if v]
        asked += ["batch-norm=True"] if batch_norm else []
        asked += [f"group-norm={group_norm}"] if group_norm else []
        if asked:
            raise ConfigError(
                f"{', '.join(asked)} does not apply to model={spec!r}; the factory fixes the architecture"
            )
        try:
            takes_args = bool(inspect.signature(factory).parameters)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            takes_args = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                net = factory(tuple(input_shape), num_classes) if takes_args else factory()  # type: ignore[operator]
            except Exception as exc:  # noqa: BLE001 — the user's code: one line naming it
                raise ConfigError(f"model={spec!r} failed to build ({type(exc).__name__}: {exc})") from None
        if not isinstance(net, nn.Module):
            raise ConfigError(f"model={spec!r} returned {type(net).__name__}, not a torch.nn.Module")
        return net
    problem = model_name_problem(spec)
    if problem:
        raise ConfigError(f"model={spec!r} {problem} or package.module:factory")
    return build_model(
        spec,
        input_shape,
        num_classes,
        width=width or None,
        depth=depth or None,
        batch_norm=batch_norm,
        group_norm=group_norm,
        seed=seed,
    )


def load_parent(
    path: str,
    template: nn.Module,
    model: str,
    input_shape: Sequence[int] = (),
    lora_alpha: float = LORA_ALPHA,
    lora_scale: str = "standard",
    folded: list[bool] | None = None,
    lora_base: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """A parent's state dict (or a fedfuse checkpoint's ``model``), read without running pickled code
    (:func:`fedfuse.checkpoint.read_state_dict`), checked key by key and shape by shape against ``template``,
    with floating tensors in float32. A LoRA model's state dict (fedfuse's adapters or PEFT's) is folded into the
    plain model's first, W = W₀ + s·B·A (:func:`fedfuse.lora.fold.fold_adapters`, s from ``lora_alpha``,
    ``lora_scale``), so ``template`` is the plain model; ``folded`` gets whether this file was. A PEFT
    ``save_pretrained`` directory (adapters only, alpha and scale in its adapter_config.json) is folded onto
    ``lora_base``, the plain model's state dict it adapts."""
    hint = "pass the --model (and --width/--depth/--batch-norm/--group-norm) the parents were built with"
    if input_shape:
        hint += f" (built here for test-data samples of shape {tuple(input_shape)})"
    ref = template.state_dict()
    from fedfuse.lora.fold import has_adapters, is_peft_dir

    fold, seen = lora_folder(lora_alpha, lora_scale, template), []

    def adapt(state: dict[str, Tensor]) -> dict[str, Tensor]:
        seen.append(has_adapters(state))
        return fold(state)

    if is_peft_dir(path):
        obj = load_peft_parent(path, template, lora_base, f"does not fit model={model!r}", hint)
        seen.append(True)
    else:
        obj = read_state_dict(path, ref, model=f"model={model!r}", hint=hint, adapt=adapt)
    if folded is not None:
        folded.append(any(seen))
    return {k: (obj[k].float() if obj[k].is_floating_point() else obj[k]).clone() for k in ref}


def load_peft_parent(
    path: str,
    template: nn.Module,
    base: dict[str, Tensor] | None,
    misfit: str = "does not fit the model",
    hint: str = "pass the --model it adapts",
) -> dict[str, Tensor]:
    """A PEFT adapter directory folded onto ``base`` (:func:`fedfuse.lora.fold.with_base`), checked against
    ``template``."""
    from fedfuse.checkpoint import fit_error
    from fedfuse.lora.fold import fold_adapters, read_peft_adapter, with_base
    from fedfuse.lora.layers import conv1d_layers

    if base is None:
        raise ConfigError(
            f"{path!r} is a PEFT adapter directory (adapters only, no base); pass --lora-base FILE: the state dict "
            "of the model the adapters were trained on"
        )
    adapter, alpha, scale = read_peft_adapter(path)
    try:
        obj = fold_adapters(with_base(adapter, base), alpha, scale, conv1d_layers(template))
    except ConfigError as exc:
        raise ConfigError(f"{path!r}: {exc}") from None
    why = fit_error(obj, template.state_dict())
    if why:
        raise ConfigError(f"{path!r} {misfit}: {why}; {hint}")
    return obj


def lora_folder(
    alpha: float, scale: str = "standard", template: nn.Module | None = None
) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """What :func:`fedfuse.checkpoint.read_state_dict` applies to a file it reads: a LoRA model's state dict folded
    into the plain model's (:func:`fedfuse.lora.fold.fold_adapters`; ``template``, the plain model, says which
    layers store their weight in × out), any other left as it is."""
    from fedfuse.lora.fold import fold_adapters, has_adapters
    from fedfuse.lora.layers import check_alpha, check_scale, conv1d_layers

    check_alpha(alpha), check_scale(scale)
    flipped = conv1d_layers(template) if template is not None else set()
    return lambda state: fold_adapters(state, alpha, scale, flipped) if has_adapters(state) else state


def check_fits(template: nn.Module, data: Inputs, flag: str, model: str, input_shape: Sequence[int]) -> Inputs:
    """``data`` with samples shaped ``input_shape`` (a flat N×D reshaped), checked by a forward pass of two
    samples and, for labels, against the model's number of outputs."""
    shape = tuple(int(s) for s in input_shape)
    x = data.x
    if tuple(x.shape[1:]) != shape:
        if x[0].numel() == int(np.prod(shape)):  # the same numbers per sample: flat ↔ shaped (C order)
            x = x.reshape(len(x), *shape)
        else:
            raise ConfigError(
                f"{flag}={data.label!r}: samples have shape {tuple(x.shape[1:])}, the test data's are {shape}"
            )
    net = copy.deepcopy(template).eval()
    try:
        with torch.no_grad():
            out = net(x[:2])
    except Exception as exc:  # noqa: BLE001 — a model/data mismatch: one line naming both
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{flag}={data.label!r}: samples of shape {shape} do not fit model={model!r} ({why})"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ConfigError(f"model={model!r} does not return logits (batch × classes) on {flag}={data.label!r}")
    if data.y is not None and int(data.y.max()) >= out.shape[1]:
        raise ConfigError(
            f"{flag}={data.label!r}: labels reach {int(data.y.max())}, model={model!r} has {out.shape[1]} outputs"
        )
    return Inputs(x, data.y, data.label, data.num_classes)
