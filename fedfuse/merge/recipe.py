"""A mergekit-style YAML recipe for ``fedfuse merge`` (``mergekit-yaml recipe.yml out/``, the habit carried over).

Read with PyYAML's ``safe_load`` (no tags that build objects)::

    models:                      # the parents, as in mergekit
      - model: a.pt              # a state dict file (a path, relative to the working directory as in mergekit)
        parameters:
          weight: 1.0            # λ before normalisation (a scalar; default 1)
      - model: b.pt
        parameters: {weight: 0.5}
    merge_method: linear         # mergekit's `linear` = fedfuse's `average`; or a fedfuse method, a list, or `all`
    base_model: a.pt             # optional: one of the models, the reference the others are aligned to
    parameters: {normalize: true}  # mergekit's default; `false` only if the weights already sum to 1
    dtype: float32               # the saved model's dtype (float32, float16, bfloat16); `out_dtype` wins if given
    fedfuse:                     # what a state dict does not say: the architecture and the data
      model: mlp                 # as --model (with width, depth, batch-norm, group-norm, num-classes)
      test-data: digits          # as --test-data, data, distill-data, data-root, repair, seed, save, ...

mergekit's other methods (slerp, ties, dare_*, task_arithmetic, model_stock, …) and ``slices`` are refused with
one line listing what is supported: fedfuse merges models trained apart, whose units must be aligned first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedfuse.errors import ConfigError

__all__ = ["load_recipe", "build_request", "MERGEKIT_METHODS", "FEDFUSE_KEYS"]

#: mergekit ``merge_method`` names fedfuse honours, and the fedfuse method each one is.
MERGEKIT_METHODS = {"linear": "average"}
_TOP_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "fedfuse")
#: keys of the recipe's ``fedfuse:`` mapping → ``MergeRequest`` fields (the CLI flag names)
FEDFUSE_KEYS = {
    "model": "model", "width": "width", "depth": "depth", "batch-norm": "batch_norm", "group-norm": "group_norm",
    "num-classes": "num_classes",
    "test-data": "test_data", "data": "data", "distill-data": "distill_data", "data-root": "data_root",
    "repair": "repair", "seed": "seed", "data-samples": "data_samples", "save": "save",
    "distill-epochs": "distill_epochs", "distill-lr": "distill_lr", "distill-batch-size": "distill_batch_size",
    "lora-alpha": "lora_alpha", "lora-scale": "lora_scale", "lora-base": "lora_base",
}  # fmt: skip


def _supported() -> str:
    from fedfuse.align.fusion import METHODS

    return f"{', '.join(f'{k} (= {v})' for k, v in MERGEKIT_METHODS.items())}, {', '.join(METHODS)}, all"


def _method(value: Any) -> list[str]:
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"recipe merge_method={value!r} must be a name or a list of names; supported: {_supported()}")
    from fedfuse.align.fusion import METHODS

    out = []
    for n in names:
        m = MERGEKIT_METHODS.get(n, n)
        if m != "all" and m not in METHODS:
            raise ConfigError(f"recipe merge_method={n!r} is not supported; supported: {_supported()}")
        out.append(m)
    return out


def _weight(entry: dict[str, Any], i: int) -> float:
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"recipe models[{i}].parameters must be a mapping (weight: W)")
    unknown = [k for k in params if k != "weight"]
    if unknown:
        raise ConfigError(f"recipe models[{i}].parameters.{unknown[0]} is not supported; allowed: weight")
    w = params.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ConfigError(
            f"recipe models[{i}].parameters.weight={w!r} must be one number >= 0 (per-layer gradients: not supported)"
        )
    return float(w)


def load_recipe(path: str) -> dict[str, Any]:
    """The ``MergeRequest`` fields a recipe sets (``parents``, ``weights``, ``methods``, ``reference``, ``dtype``
    and those of its ``fedfuse:`` mapping); one-line ConfigError on anything it cannot honour."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"recipe={path!r}: no such file")
    try:
        doc = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"recipe={path!r} is not valid YAML{at}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"recipe={path!r} must be a mapping with models and merge_method")
    if "slices" in doc:
        raise ConfigError(f"recipe={path!r}: slices (layer ranges) are not supported; list whole models under models")
    unknown = [k for k in doc if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(f"recipe key {unknown[0]!r} is not supported; allowed: {', '.join(_TOP_KEYS)}")
    models = doc.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("model"), str) for m in models):
        raise ConfigError(f"recipe={path!r}: models must be a list of {{model: PATH, parameters: {{weight: W}}}}")
    for i, m in enumerate(models):
        extra = [k for k in m if k not in ("model", "parameters")]
        if extra:
            raise ConfigError(f"recipe models[{i}].{extra[0]} is not supported; allowed: model, parameters")
    if "merge_method" not in doc:
        raise ConfigError(f"recipe={path!r} has no merge_method; supported: {_supported()}")
    parents = [m["model"] for m in models]
    weights = [_weight(m, i) for i, m in enumerate(models)]
    req: dict[str, Any] = {"parents": parents, "weights": weights, "methods": _method(doc["merge_method"])}
    params = doc.get("parameters") or {}
    if not isinstance(params, dict) or any(k != "normalize" for k in params):
        raise ConfigError(f"recipe parameters={params!r} is not supported; allowed: normalize")
    if params.get("normalize", True) is not True and not math.isclose(sum(weights), 1.0, rel_tol=1e-6):
        raise ConfigError(
            f"recipe normalize: false with weights summing to {sum(weights):g}: fedfuse always normalises; "
            "use weights that sum to 1 or normalize: true"
        )
    if doc.get("base_model") is not None:
        if doc["base_model"] not in parents:
            raise ConfigError(f"recipe base_model={doc['base_model']!r} must be one of the models listed")
        req["reference"] = parents.index(doc["base_model"])
    dtype = doc.get("out_dtype") or doc.get("dtype")
    if dtype is not None:
        req["dtype"] = str(dtype)
    own = doc.get("fedfuse") or {}
    if not isinstance(own, dict):
        raise ConfigError("recipe fedfuse: must be a mapping (model: NAME, test-data: FILE|DATASET, ...)")
    for key, value in own.items():
        if key not in FEDFUSE_KEYS:
            raise ConfigError(f"recipe fedfuse.{key} is not supported; allowed: {', '.join(FEDFUSE_KEYS)}")
        req[FEDFUSE_KEYS[key]] = value
    return req


_TYPES: dict[str, type] = {
    "model": str, "test_data": str, "data": str, "distill_data": str, "data_root": str, "save": str, "dtype": str,
    "width": int, "depth": int, "group_norm": int, "num_classes": int, "seed": int, "data_samples": int,
    "distill_epochs": int, "distill_batch_size": int, "reference": int, "distill_lr": float, "repair": bool,
    "batch_norm": bool, "lora_alpha": float, "lora_scale": str, "lora_base": str,
}  # fmt: skip


def _checked(name: str, value: Any) -> Any:
    want = _TYPES.get(name)
    if want is None or value is None:
        return value
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"recipe {name.replace('_', '-')}={value!r} must be a {want.__name__}")
    return value


def build_request(given: dict[str, Any], recipe: str | None = None) -> Any:
    """A :class:`~fedfuse.merge.parents.MergeRequest` from the CLI's ``given`` fields (None = not given) and,
    optionally, a recipe; a field both set differently is refused (one line), never silently overridden."""
    from fedfuse.merge.parents import MergeRequest

    fields = {k: v for k, v in given.items() if v is not None}
    if recipe is not None:
        if fields.get("parents"):
            raise ConfigError("give the parents either on the command line or in the recipe's models, not both")
        fields.pop("parents", None)
        for key, value in load_recipe(recipe).items():
            value = _checked(key, value)
            if key in fields and fields[key] != value:
                flag = "method" if key == "methods" else key.replace("_", "-")
                raise ConfigError(f"--{flag}={fields[key]!r} disagrees with the recipe's {value!r}; give it once")
            fields[key] = value
    seed = fields.get("seed")
    if seed is not None and int(seed) < 0:
        raise ConfigError(f"seed={seed!r} is out of range; allowed: an integer >= 0")
    for key, value in fields.items():  # nan passes every comparison further on
        if _TYPES.get(key) is float and not math.isfinite(float(value)):
            raise ConfigError(f"{key.replace('_', '-')}={value!r} is not a finite number")
    if "out" not in fields:
        raise ConfigError("--out DIR is required")
    if "test_data" not in fields:
        raise ConfigError("--test-data FILE.npz|DATASET is required: the labelled data every model is measured on")
    fields.setdefault("parents", [])
    return MergeRequest(**fields)
