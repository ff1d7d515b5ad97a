"""Every key shared by the fedfuse ClientApp and the server side, in one place.

Both ``clients/`` and ``strategies/`` import these names (the client never imports ``strategies``),
so a key cannot drift between the two ends of the wire. Plain strings only: no Flower import.

Messages: a TRAIN/EVALUATE message carries one ArrayRecord (the model, or its shared part) and one
ConfigRecord (the whole validated run config plus the round keys below); a reply carries one
ArrayRecord (TRAIN only), one MetricRecord (``num-examples`` and the client's metrics) and a
ConfigRecord :data:`CLIENT_INFO` naming the client's partition. Readers take *the* ArrayRecord /
ConfigRecord of a message whatever its key, so strategies may rename them (FedAvg's
``arrayrecord_key``/``configrecord_key``); writers use :data:`ARRAYS`, :data:`METRICS`, :data:`CONFIG`.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS",
    "METRICS",
    "CONFIG",
    "CLIENT_INFO",
    "PARTITION_ID",
    "NUM_PARTITIONS",
    "DATA_DIR",
    "INIT_FROM",
    "NUM_EXAMPLES",
    "TRAIN_LOSS",
    "TRAIN_ACCURACY",
    "EVAL_LOSS",
    "EVAL_ACCURACY",
    "INJECTED_LATE",
    "SERVER_ROUND",
    "SHARED_KEYS",
    "PFN_MODE",
    "PFN_RATIO",
    "PFN_SEED",
    "PFN_GRANULARITY",
    "PERSONAL_STATE",
    "REPAIR_ACTION",
    "REPAIR_MESSAGE_TYPE",
    "REPAIR_KIND",
    "REPAIR_SITES",
    "REPAIR_OWN",
    "REPAIR_FUSED",
    "PROXIMAL_MU",
    "POOL_NODES",
    "POOL_CLIENTS",
    "RUN_DONE_DIR",
    "PARTITION_CACHE",
    "run_done_marker",
]

# record names inside a Message's RecordDict
ARRAYS = "arrays"  # the model (ArrayRecord)
METRICS = "metrics"  # a reply's MetricRecord
CONFIG = "config"  # the round's ConfigRecord
CLIENT_INFO = "client"  # a reply's ConfigRecord with the client's PARTITION_ID (deterministic ordering)

# node_config keys (Flower simulation sets the first two; a deployed SuperNode gets them from --node-config)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_DIR = "data-dir"  # a deployed SuperNode's own data directory (train.pt / train.npz)
INIT_FROM = "init-from"  # a SuperNode's own round-1 model (a state dict file) when the run has client-init=own

# MetricRecord keys of replies
NUM_EXAMPLES = "num-examples"  # FedAvg's weighted_by_key
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
# a simulated straggler's reply (``straggle-prob``): sent at once, counted by the server as a late reply and
# dropped, so the injected lateness never occupies a simulation actor (honest clients are not delayed)
INJECTED_LATE = "injected-late"

# round keys the strategies add to the run config they send
SERVER_ROUND = "server-round"
SHARED_KEYS = "shared-keys"  # LayerwiseAvg: comma-joined state-dict keys that travel; the rest stay personal
PFN_MODE = "pfn-mode"  # "pfn" (one mask all run) or "pnu" (a mask per round)
PFN_RATIO = "pfn-ratio"
PFN_SEED = "pfn-seed"
PFN_GRANULARITY = "pfn-granularity"
PROXIMAL_MU = "proximal-mu"  # FedProx: μ of the clients' proximal term (Flower 1.41 FedProx's train-config key)
# a pooled run (``client-pool`` K > 0: K SuperNodes serve ``num-clients`` clients): node ``POOL_NODES[i]`` (its id
# as a string: Flower node ids are unsigned 64-bit) serves client ``POOL_CLIENTS[i]`` for this message
POOL_NODES = "pool-nodes"
POOL_CLIENTS = "pool-clients"

# Context.state record of a client
PERSONAL_STATE = "layerwise-personal"  # LayerwiseAvg: this client's personal layers (ArrayRecord)

# Post-fusion statistics round (strategies' bn-repair option; the ClientApp's ``@app.query(REPAIR_ACTION)``).
# Request: the fused model (ARRAYS), the run config (CONFIG) with REPAIR_KIND, and for "unit-stats" the
# comma-joined REPAIR_SITES and optionally the client's own model aligned to the fused one (REPAIR_OWN).
# Reply: ArrayRecords REPAIR_FUSED (and REPAIR_OWN) of statistics + METRICS with NUM_EXAMPLES. No raw data.
REPAIR_ACTION = "repair"
REPAIR_MESSAGE_TYPE = "query.repair"  # Flower routes "query.<action>" to @app.query("<action>")
REPAIR_KIND = "repair-kind"  # "bn-stats": BatchNorm statistics recomputed locally; "unit-stats": per-unit (mean, std)
REPAIR_SITES = "repair-sites"
REPAIR_OWN = "own"
REPAIR_FUSED = "fused"

# ``fedfuse simulate`` (fedfuse/runners/ray.py) ↔ the ServerApp it submits. The SuperLink's environment names a
# directory; when the ServerApp has written every result of run R it creates ``run_done_marker(dir, R)`` there, so the
# CLI can end the run's processes at once instead of waiting for the simulation engine to shut Ray down and for
# the run's status to read ``finished`` (Flower's own path, ~4-6 s after the last round).
RUN_DONE_DIR = "FEDFUSE_RUN_DONE_DIR"
# A directory the processes of one run share (the CLI's preflight, the ServerApp, every Ray worker): the first to
# partition the data writes the indices there (fedfuse.data.partition), the others read them instead of importing
# flwr-datasets and datasets (~2 s a process) and partitioning again.
PARTITION_CACHE = "FEDFUSE_PARTITION_CACHE"


def run_done_marker(directory: str, run_id: int | str) -> str:
    """Path of the file that says run ``run_id``'s ServerApp returned with every result written."""
    return f"{directory.rstrip('/')}/done-{int(run_id)}"
