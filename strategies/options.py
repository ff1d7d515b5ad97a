"""Every registered strategy's run options, as data: the table the CLI, ``flwr run`` and the ServerApp validate
against (:mod:`strategies.registry`), readable without importing the strategies (no torch, Flower or POT).

Each strategy class takes its ``options`` from here (``FedWB.options is STRATEGY_OPTIONS["wb"]``); the few
names the options allow that the core also defines (robust methods, norm actions, layer-wise presets, GWB's α)
are repeated here, and ``tests/test_startup.py`` checks both agree.
"""

from __future__ import annotations

from fedfuse.catalog import LORA_ALPHA, LORA_SCALES, positive_ints_reason
from fedfuse.config import SERVER_OPTIONS, Option
from fedfuse.screening_options import ROBUST_OPTIONS

__all__ = [
    "FUSION_OPTIONS",
    "LORA_OPTIONS",
    "PFN_OPTIONS",
    "REPAIR_OPTIONS",
    "ROBUST_OPTIONS",
    "SERVER_OPTIONS",
    "STRATEGY_OPTIONS",
    "WIDTHS_OPTION",
]

LAYERWISE_PRESETS = ("body", "head", "no-bn")  # = fedfuse.selection.LAYERWISE_PRESETS
DEFAULT_ALPHA = 0.5  # = fedfuse.align.gw.DEFAULT_ALPHA
SOLVERS = ("emd", "sinkhorn")
REPAIR_MODES = ("none", "reset", "repair")


def _preset_reason(preset: str) -> str | None:
    if preset in LAYERWISE_PRESETS or (preset.startswith("layers=") and preset[7:].strip(", ")):
        return None
    return f"is not allowed; allowed: {', '.join(LAYERWISE_PRESETS)} or layers=<glob,glob>"


REPAIR_OPTIONS = (
    Option(
        "bn-repair", str, "none",
        "after fusion: none; reset = the sampled clients recompute the fused model's BatchNorm statistics on their "
        "data; repair = federated REPAIR (clients report per-unit mean/std of the fused and of their aligned "
        "model; the server rescales each unit). reset/repair add a query.repair message round",
        choices=REPAIR_MODES,
    ),
    Option(
        "repair-rounds", int, 0,
        "bn-repair=repair: statistics rounds (0 = one per repaired layer: exact sequential REPAIR; fewer = Jacobi "
        "approximation, cheaper)", low=0,
    ),
)  # fmt: skip
FUSION_OPTIONS = (
    Option("fusion-solver", str, "emd", "wb: exact OT (emd) or entropic (sinkhorn)", choices=SOLVERS),
    Option("fusion-epsilon", float, 0.01, "sinkhorn regularisation, relative to the cost range", low=0, low_open=True),
    Option("fusion-iters", int, 0, "barycenter iterations (0 = the method's default)", low=0),
    Option(
        "bn-fold",
        bool,
        False,
        "BN-aware fusion: fold each BatchNorm into its conv/linear for the alignment cost and the average, "
        "unfold onto the clients' averaged BN parameters after (no effect without BatchNorm)",
    ),
    *REPAIR_OPTIONS,
    *SERVER_OPTIONS,
)
WIDTHS_OPTION = Option(
    "client-widths",
    str,
    "",
    "wb/gwb/heterofl: comma-separated hidden widths cycled over clients (heterogeneity)",
    check_value=positive_ints_reason,
)
GWB_ALPHA_OPTION = Option(
    "gwb-alpha", float, DEFAULT_ALPHA, "gwb: structure weight α (0 = WB, 1 = pure GW)", low=0, high=1
)
# trusted-data trains every entry of the sent model: not for strategies whose clients keep entries fixed (FedPFN)
# or receive only part of the model (layerwise)
NO_TRUST = tuple(o for o in ROBUST_OPTIONS if o.name != "trusted-data")
PFN_OPTIONS = (
    *NO_TRUST,  # not SERVER_OPTIONS: distillation would move the entries this strategy keeps apart
    Option("pfn-ratio", float, 0.4, "fedpfn/fedpnu: fraction of each tensor fixed at init", low=0.0, high=0.99),
    Option(
        "pfn-granularity", str, "weight", "fedpfn/fedpnu: fix single weights or whole neurons",
        choices=("weight", "neuron"),
    ),
    Option(
        "pfn-fusion", str, "average", "fedpfn/fedpnu: aggregation (wb = FedPFN + FedWB)",
        choices=("average", "wb", "match", "gwb"),
    ),
    *REPAIR_OPTIONS,
)  # fmt: skip
LORA_OPTIONS = (
    Option("lora-rank", int, 0, "LoRA: adapter rank of every client (0 = off; LoRA strategies need it or lora-ranks)",
           low=0),
    Option("lora-ranks", str, "", "LoRA: comma-separated ranks cycled over clients (e.g. 4,8,16); the server's "
           "adapters have the largest", check_value=positive_ints_reason),
    Option("lora-targets", str, "", "LoRA: comma-separated module-name globs of the Linear/Conv2d layers to adapt, "
           "PAT:R for a rank of its own (empty = every Linear/Conv2d but the lora-head)"),
    Option("lora-alpha", float, LORA_ALPHA, "LoRA: the update is (alpha / rank)·B·A", low=0.0, low_open=True),
    Option("lora-scale", str, "standard", "LoRA: the scale of the update s·B·A: standard = alpha / rank (PEFT's "
           "default), rslora = alpha / sqrt(rank) (rank-stabilised, PEFT's use_rslora)",
           choices=LORA_SCALES),
    Option("lora-head", str, "auto", "LoRA: modules trained fully and sent with the adapters, averaged plainly "
           "(PEFT's modules_to_save): auto = the output layer (the classifier head, so classes new to the base can "
           "be learnt; unless lora-targets adapts it), none = frozen, or comma-separated module-name globs"),
    Option("lora-bias", str, "none", "LoRA: trainable biases, sent and averaged plainly (PEFT's bias): none, "
           "lora_only (the adapted layers') or all", choices=("none", "lora_only", "all")),
)  # fmt: skip
LORA_REFACTOR_OPTION = Option(
    "lora-refactor", str, "update", "fedex-lora/svd-lora: what the truncated SVD re-factorises: update = the global "
    "product plus the clients' mean change from the adapters each was sent (clients that change nothing leave the "
    "model as it was), product = the mean of the clients' products s·B·A (with mixed ranks a lower-rank client "
    "counts the global components it never received as 0); the same with one rank", choices=("update", "product"),
)  # fmt: skip
# LoRA strategies screen updates but reduce adapters with their own rule (no robust reduction); the trusted
# reference trains the server's copy of the LoRA model like a client (adapters and dense keys only)
LORA_STRATEGY_OPTIONS = (
    *(o for o in ROBUST_OPTIONS if o.name not in ("robust", "robust-fraction")),
    *LORA_OPTIONS,
)
BASE_OPTIONS = (*ROBUST_OPTIONS, *SERVER_OPTIONS)
FUSION_BASE = (*ROBUST_OPTIONS, *FUSION_OPTIONS)

# registered name → its class's ``options`` (the order of strategies.registry.STRATEGIES)
STRATEGY_OPTIONS: dict[str, tuple[Option, ...]] = {
    "fedavg": BASE_OPTIONS,
    "fedprox": (
        *BASE_OPTIONS,
        Option(
            "proximal-mu", float, 0.01, "fedprox: weight μ of the clients' proximal term (μ/2)·‖w − w_global‖²", low=0.0
        ),
    ),  # fmt: skip
    "fedpfn": PFN_OPTIONS,
    "fedpnu": PFN_OPTIONS,
    "match": FUSION_BASE,
    "wb": (*FUSION_BASE, WIDTHS_OPTION),
    "gwb": (*FUSION_BASE, WIDTHS_OPTION, GWB_ALPHA_OPTION),
    "cca": FUSION_BASE,
    "zip": FUSION_BASE,
    "heterofl": (*ROBUST_OPTIONS, WIDTHS_OPTION),
    "layerwise": (
        *NO_TRUST,  # not SERVER_OPTIONS: distillation would move the entries this strategy keeps apart
        Option(
            "layerwise-preset",
            str,
            "body",
            "layerwise: shared (averaged) layers: body (FedPer), head, no-bn (FedBN) or layers=<glob,glob>",
            check_value=_preset_reason,
        ),
    ),
    "fedavg-lora": LORA_STRATEGY_OPTIONS,
    "fedex-lora": (*LORA_STRATEGY_OPTIONS, LORA_REFACTOR_OPTION),
    "aligned-lora": LORA_STRATEGY_OPTIONS,
    "svd-lora": (*LORA_STRATEGY_OPTIONS, LORA_REFACTOR_OPTION),
    "hetlora": LORA_STRATEGY_OPTIONS,
    "flora": LORA_STRATEGY_OPTIONS,
}
