"""The names run options may take — data sets, partitions, models, attacks — without importing torch.

:mod:`fedfuse.config` checks options against these, so ``fedfuse --help`` and a bad option exit without loading
torch; the modules that build the things (:mod:`fedfuse.data`, :mod:`fedfuse.models`, :mod:`fedfuse.attacks`)
hold the same names (``tests/test_startup.py`` checks they agree).
"""

from __future__ import annotations

import math

__all__ = [
    "ATTACKS",
    "DATASET_NAMES",
    "LIBRARY_PREFIXES",
    "MODEL_NAMES",
    "PARTITIONS",
    "attack_reason",
    "model_name_problem",
    "parse_attack",
]

DATASET_NAMES = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10", "mnist10k")
PARTITIONS = ("iid", "dirichlet", "pathological", "quantity")
MODEL_NAMES = ("mlp", "cnn", "resnet20", "rnn", "lstm", "gru")
LIBRARY_PREFIXES = ("torchvision:", "timm:", "hf:")
LIBRARY_NAMES = (
    "torchvision:NAME (a torchvision classifier), timm:NAME (a timm model) or hf:ARCH (a Hugging Face architecture)"
)
ATTACKS = ("scale", "signflip", "num-examples", "extra-bytes")


def model_name_problem(name: str) -> str | None:
    """Why ``name`` is not a model fedfuse can build (one of :data:`MODEL_NAMES`, ``torchvision:NAME``, ``timm:NAME``
    or ``hf:ARCH``); only a library name imports torch (and the library) to look the name up."""
    if name in MODEL_NAMES:
        return None
    if name.startswith("torchvision:"):
        from fedfuse.models.torchvision_models import check_torchvision_name

        return check_torchvision_name(name[len("torchvision:") :])
    if name.startswith("timm:"):
        from fedfuse.models.timm_models import check_timm_name

        return check_timm_name(name[len("timm:") :])
    if name.startswith("hf:"):
        from fedfuse.models.hf_models import check_hf_name

        return check_hf_name(name[len("hf:") :])
    return f"is not allowed; allowed: {', '.join(MODEL_NAMES)}, {LIBRARY_NAMES}"


def parse_attack(text: str) -> tuple[str, float] | None:
    """``"KIND:VALUE"`` → (kind, value); ``""`` → None. ValueError naming what is allowed otherwise."""
    text = str(text).strip()
    if not text:
        return None
    kind, sep, raw = text.partition(":")
    if not sep or kind not in ATTACKS:
        raise ValueError(f"is not KIND:VALUE with KIND one of {', '.join(ATTACKS)} (e.g. scale:1e6)")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"has a value {raw!r} that is not a number") from None
    if kind != "num-examples" and not math.isfinite(value):
        raise ValueError("needs a finite value (only num-examples may be nan/inf)")
    if kind == "extra-bytes" and not value >= 1:
        raise ValueError("needs a byte count >= 1")
    return kind, value


def attack_reason(text: str) -> str | None:
    """Why ``text`` is not a valid ``attack`` option (for :class:`fedfuse.config.Option`), or None."""
    try:
        parse_attack(text)
    except ValueError as exc:
        return str(exc)
    return None
