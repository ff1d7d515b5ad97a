"""The names run options may take — data sets, partitions, models, attacks — without importing torch.

:mod:`fedfuse.config` checks options against these, so ``fedfuse --help`` and a bad option exit without loading
torch; the modules that build the things (:mod:`fedfuse.data`, :mod:`fedfuse.models`, :mod:`fedfuse.attacks`)
hold the same names (``tests/test_startup.py`` checks they agree).
"""

from __future__ import annotations

import math

__all__ = [
    "ATTACKS",
    "PRETRAIN_TASKS",
    "LORA_ALPHA",
    "LORA_SCALES",
    "SYNTHETIC_REASON",
    "dataset_problem",
    "positive_ints_reason",
    "synthetic_params",
    "OMNISCIENT",
    "DATASET_NAMES",
    "LIBRARY_PREFIXES",
    "MODEL_NAMES",
    "PARTITIONS",
    "attack_reason",
    "model_name_problem",
    "parse_attack",
]

DATASET_NAMES = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10", "mnist10k", "synthetic")
SYNTHETIC_REASON = (
    "is not a synthetic data set; allowed: synthetic or synthetic:ALPHA,BETA with two finite numbers >= 0 "
    "(e.g. synthetic:0.5,0.5)"
)
PRETRAIN_TASKS = ("none", "low-classes")  # --pretrain: how a LoRA run's base is made (fedfuse.lora.run)
LORA_ALPHA = 4.0  # --lora-alpha: the LoRA scale numerator, s = alpha / r (a run's, merge's and the strategies' default)
LORA_SCALES = ("standard", "rslora")  # --lora-scale: s = alpha / r, s = alpha / √r (PEFT's use_rslora)
PARTITIONS = ("iid", "dirichlet", "pathological", "quantity")
MODEL_NAMES = ("mlp", "cnn", "resnet20", "rnn", "lstm", "gru")
LIBRARY_PREFIXES = ("torchvision:", "timm:", "hf:")
LIBRARY_NAMES = (
    "torchvision:NAME (a torchvision classifier), timm:NAME (a timm model) or hf:ARCH (a Hugging Face architecture)"
)
ATTACKS = (
    "scale", "signflip", "num-examples", "extra-bytes", "alie", "ipm", "adaptive", "evade", "lowkey", "freeride",
    "labelflip", "noise",
)  # fmt: skip
OMNISCIENT = ("alie", "ipm", "adaptive", "evade", "lowkey", "freeride")  # attacks that need the honest clients' updates


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


def positive_ints_reason(value: str) -> str | None:
    """Why a comma-separated list of positive integers (client widths, LoRA ranks) is refused, or None (empty: off)."""
    ok = not value.strip() or all(w.strip().isdigit() and int(w) > 0 for w in value.split(","))
    return None if ok else "is not a comma-separated list of positive integers"


def synthetic_params(name: str) -> tuple[float, float] | None:
    """``(α, β)`` of ``synthetic`` (= Synthetic(1, 1), FedProx's most heterogeneous) or ``synthetic:ALPHA,BETA``;
    None when ``name`` is not one of those (two finite numbers >= 0)."""
    if name == "synthetic":
        return 1.0, 1.0
    head, _, args = name.partition(":")
    parts = args.split(",")
    try:
        alpha, beta = float(parts[0]), float(parts[1]) if len(parts) == 2 else float("nan")
    except ValueError:
        return None
    ok = head == "synthetic" and all(math.isfinite(v) and v >= 0 for v in (alpha, beta))
    return (alpha, beta) if ok else None


def dataset_problem(name: str) -> str | None:
    """Why a ``synthetic:ALPHA,BETA`` data set name is malformed, or None (other names are checked as choices)."""
    if not name.startswith("synthetic:"):
        return None
    return None if synthetic_params(name) is not None else SYNTHETIC_REASON


def parse_attack(text: str) -> tuple[str, float] | None:
    """``"KIND:VALUE"`` → (kind, value); ``""`` → None. ValueError naming what is allowed otherwise."""
    text = str(text).strip()
    if not text:
        return None
    kind, sep, raw = text.partition(":")
    if kind == "labelflip" and not sep:
        return kind, 1.0
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
    if kind in ("adaptive", "lowkey", "freeride") and not 0 < value <= 1:
        raise ValueError("needs a ratio in (0, 1] (the fraction of each bound it goes up to, e.g. 0.99)")
    if kind == "noise" and not value > 0:
        raise ValueError("needs a scale > 0 (the noise's norm as a multiple of the attacker's own update, e.g. 4)")
    if kind == "evade" and not 0 <= value < 1:
        raise ValueError("needs a cosine in [0, 1) (how far against the honest mean it points, e.g. 0.4)")
    return kind, value


def attack_reason(text: str) -> str | None:
    """Why ``text`` is not a valid ``attack`` option (for :class:`fedfuse.config.Option`), or None."""
    try:
        parse_attack(text)
    except ValueError as exc:
        return str(exc)
    return None
