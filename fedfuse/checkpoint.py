"""Round checkpoints: written atomically every round, read back for an exact resume.

A checkpoint holds the round number, the run config, the global model, the strategy's state,
the RNG states of this process (torch, numpy, random) and the metrics history — only tensors and plain
types (dict, list, tuple, str, int, float, bool, None), so it is read with ``torch.load(weights_only=True)``:
loading a checkpoint never runs code, whoever wrote the file.
"""

from __future__ import annotations

import io
import pickle
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfuse.errors import ConfigError
from fedfuse.results import atomic_write_bytes

__all__ = [
    "CHECKPOINT",
    "save_checkpoint",
    "checkpoint_bytes",
    "load_checkpoint",
    "rng_states",
    "restore_rng_states",
    "config_mismatch",
    "check_resumable",
    "check_model_fits",
    "read_state_dict",
    "plain",
]

CHECKPOINT = "checkpoint.pt"

# Options that may differ between a run and its resumption (they do not change the result).
RESUMABLE_OVERRIDES = frozenset({"out"})
_SAVED = "allowed: a state dict saved with torch.save (e.g. torch.save(model.state_dict(), path))"


def rng_states() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (what ``weights_only`` loading allows)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },  # fmt: skip
        "random": {"version": int(version), "state": [int(v) for v in internal], "gauss_next": gauss_next},
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Restore :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    npy = states["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    rnd = states["random"]
    random.setstate((rnd["version"], tuple(rnd["state"]), rnd["gauss_next"]))


def plain(obj: Any) -> Any:
    """``obj`` as tensors and plain types (numpy scalars/arrays converted); TypeError for anything else."""
    if obj is None or isinstance(obj, (bool, str, torch.Tensor)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, Mapping):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(plain(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    raise TypeError(f"a checkpoint holds tensors and plain types only, not {type(obj).__name__}")


def checkpoint_bytes(payload: Mapping[str, Any]) -> bytes:
    """``payload`` (tensors and plain types, :func:`plain`) as the bytes of a ``checkpoint.pt``."""
    buf = io.BytesIO()
    torch.save(plain(dict(payload)), buf)
    return buf.getvalue()


def save_checkpoint(out: Path, payload: Mapping[str, Any]) -> Path:
    """``torch.save`` into memory, then temp file + rename: a crash mid-write keeps the previous one."""
    path = Path(out) / CHECKPOINT
    atomic_write_bytes(path, checkpoint_bytes(payload))
    return path


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The last complete checkpoint in ``out``; ConfigError when there is none or it is unreadable."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume={str(out)!r} holds no {CHECKPOINT}; allowed: an --out directory of an earlier run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as exc:  # noqa: BLE001 — unreadable, or it holds something other than tensors/plain types
        raise ConfigError(
            f"resume={str(out)!r}: {path} cannot be read as a fedfuse checkpoint ({type(exc).__name__}); "
            "only tensors and plain types are loaded"
        ) from None
    if not isinstance(ckpt, dict) or not {"round", "config", "model"} <= set(ckpt):
        raise ConfigError(f"resume={str(out)!r}: {CHECKPOINT} is not a fedfuse checkpoint")
    rnd, config = ckpt["round"], ckpt["config"]
    if type(rnd) is not int or rnd < 0:
        _damaged(path, "round", f"is {rnd!r}, not a round number >= 0")
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        _damaged(path, "config", "is not a mapping of option names to values")
    return ckpt


def _damaged(path: Path, field: str, why: str) -> None:
    raise ConfigError(f"resume: {path}: {field} {why}; the checkpoint is damaged or was not written by fedfuse")


def check_resumable(ckpt: Mapping[str, Any], path: Path) -> None:
    """Every field a resume reads (model, metrics, RNG states, strategy state) has the type and range a round
    checkpoint gives it, and the model is finite: else one ConfigError naming the first bad field. The RNG
    states are tried on fresh generators, so nothing global changes here."""
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        _damaged(path, "model", "is not a state dict (parameter names to tensors)")
    for key, value in model.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            _damaged(path, f"model[{key!r}]", "holds NaN or infinite values")
    rows = ckpt.get("metrics")
    numbers = (int, float)
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and all(isinstance(k, str) and isinstance(v, numbers) for k, v in r.items()) for r in rows
    ):
        _damaged(path, "metrics", "is not a list of rows of numbers")
    rounds = [r.get("round") for r in rows]
    if rounds != list(range(ckpt["round"] + 1)) or not all("wall_time" in r for r in rows):
        _damaged(path, "metrics", f"holds rounds {rounds[:5]}{'…' if len(rounds) > 5 else ''}, not 0..{ckpt['round']}")
    if not isinstance(ckpt.get("strategy", {}), dict):
        _damaged(path, "strategy", "is not a mapping")
    rng = ckpt.get("rng")
    try:
        if not isinstance(rng, dict):
            raise TypeError(type(rng).__name__)
        torch.Generator().set_state(rng["torch"])
        npy = rng["numpy"]
        keys = npy["keys"].numpy().astype(np.uint32)
        np.random.RandomState().set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
        rnd = rng["random"]
        random.Random().setstate((rnd["version"], tuple(rnd["state"]), rnd["gauss_next"]))
    except Exception:  # noqa: BLE001 — any malformed state: missing keys, wrong types, sizes or values
        _damaged(path, "rng", "is not a set of torch/numpy/random generator states")


def fit_error(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not have exactly ``expected``'s parameter names and shapes (the first difference), or None."""
    for key, want in expected.items():
        if key not in state:
            return f"key {key!r} is missing"
        if tuple(state[key].shape) != tuple(want.shape):
            return f"{key!r} has shape {tuple(state[key].shape)}, the model's is {tuple(want.shape)}"
        if want.is_floating_point() and not state[key].is_floating_point():
            got = str(state[key].dtype).removeprefix("torch.")
            return f"{key!r} holds {got}, the model's {str(want.dtype).removeprefix('torch.')} is floating point"
    extra = next((k for k in state if k not in expected), None)
    return None if extra is None else f"unexpected key {extra!r}"


def check_model_fits(ckpt_model: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path) -> None:
    """The checkpoint's model has exactly the parameter names and shapes the run's config builds."""
    why = fit_error(ckpt_model, expected)
    if why:
        _damaged(path, "model", f"does not fit the config's model ({why})")


def read_state_dict(
    path: str | Path,
    template: Mapping[str, torch.Tensor],
    *,
    what: str = "",
    model: str = "the model",
    hint: str = "pass the --model/--width/--depth/--batch-norm/--group-norm it was built with",
    fixed: Mapping[str, torch.Tensor] | None = None,
    adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict saved in ``path`` (or a fedfuse checkpoint's ``model``), read with
    ``torch.load(weights_only=True)`` — pickled code is refused, never run — and checked name by name and shape by
    shape against ``template`` (a state dict). ``fixed``: entries the run fixes (a LoRA run's frozen base): the file
    may leave them out (the run's values fill in) and, where it holds one, must hold exactly the run's value.
    ``adapt``: applied to what was read before any check (e.g. :func:`fedfuse.lora.fold.fold_adapters`). Bad input
    is one ConfigError line, prefixed with ``what``."""
    where = f"{what}: {str(path)!r}" if what else repr(str(path))
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{where} is not a file; {_SAVED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # the weights-only unpickler met a class or function: code, not tensors
            raise ConfigError(
                f"{where} holds pickled code or objects, not just tensors; refused (files are read with "
                "torch.load(weights_only=True); save model.state_dict() instead)"
            ) from None
        raise ConfigError(f"{where} is not a torch file; {_SAVED}") from None
    except Exception:  # noqa: BLE001 — any unreadable file is bad input
        raise ConfigError(f"{where} is not a torch file; {_SAVED}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a fedfuse checkpoint.pt
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"{where} does not hold a state dict of tensors; allowed: torch.save(model.state_dict())")
    if adapt is not None:
        try:
            obj = adapt(obj)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return check_read_state(obj, template, where=where, model=model, hint=hint, fixed=fixed)


def check_read_state(
    obj: dict[str, torch.Tensor],
    template: Mapping[str, torch.Tensor],
    *,
    where: str,
    model: str = "the model",
    hint: str = "",
    fixed: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`read_state_dict`'s checks on a state dict already read (``obj``, completed in place with ``fixed``
    entries it leaves out); ConfigError, one line beginning with ``where``."""
    for key, value in (fixed or {}).items():
        if key not in obj:
            obj[key] = value
        elif tuple(obj[key].shape) == tuple(value.shape) and not torch.equal(obj[key].to(value.dtype), value):
            delta = (obj[key].double() - value.double()).abs().max().item()
            raise ConfigError(
                f"{where}: {key!r} differs from the run's (max |difference| {delta:.3g}), which stays frozen; "
                f"allowed: the run's values or none (only what trains); {hint}"
            )
    why = fit_error(obj, template)
    if why:
        raise ConfigError(f"{where} does not fit {model}: {why}; {hint}")
    return obj


def config_mismatch(saved: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """The first option whose value in ``given`` differs from the checkpoint's, as a message, or None."""
    for key, value in given.items():
        if key in RESUMABLE_OVERRIDES:
            continue
        if key in saved and saved[key] != value:
            return f"{key}={value!r} differs from the checkpoint's {key}={saved[key]!r}"
    return None
