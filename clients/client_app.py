"""fedfuse ClientApp (Flower Message API).

The server sends the whole validated run config in every message's ConfigRecord, so the same
ClientApp works under ``fedfuse simulate``, ``flwr run`` and a deployed SuperNode. The client's
identity comes from Flower's ``node_config`` (``partition-id``, ``num-partitions``). Data sets and
partitions are cached per process, so an actor loads its data once, not once per round.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfuse.experiment import (
    client_data,
    client_model,
    dataset_for,
    derive_seed,
    inject_faults,
    local_plan,
    local_train,
    round_mask,
)
from fedfuse.subspace import MaskedTraining, mask_ratio
from fedfuse.train import evaluate as evaluate_model
from fedfuse.train import torch_threads

app = ClientApp()

CLIENT_INFO_KEY = "client"  # mirrors strategies.base.CLIENT_INFO_KEY (clients must not import strategies)


def _identity(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError("node_config needs 'partition-id' and 'num-partitions' (e.g. --node-config)")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def _local_xy(cfg: dict[str, Any], context: Context) -> tuple[Any, Any]:
    """This client's training data: node_config ``data-dir`` (local files), else its simulated partition."""
    data_dir = context.node_config.get("data-dir")
    if data_dir:
        from fedfuse.data.local import load_local_data

        ds = dataset_for(cfg)
        return load_local_data(str(data_dir), ds.input_shape, ds.num_classes)
    pid, num_parts = _identity(context)
    return client_data(cfg, pid, num_parts)


def _run_config(msg: Message) -> dict[str, Any]:
    return dict(msg.content["config"])


def _info(partition_id: int) -> ConfigRecord:
    return ConfigRecord({"partition-id": partition_id})


# ---- layer-wise mode (strategies.layerwise.LayerwiseAvg): personal layers never leave the client -------------
PERSONAL_STATE_KEY = "layerwise-personal"  # Context.state ArrayRecord holding this client's personal layers


def _shared_keys(cfg: dict[str, Any]) -> list[str] | None:
    """The keys the server averages (round config ``shared-keys``), or None outside layer-wise mode."""
    keys = str(cfg.get("shared-keys", ""))
    return keys.split(",") if keys else None


def _layerwise_split(cfg: dict[str, Any], pid: int, x: Any, y: Any, part: str) -> tuple[Any, Any]:
    """``part`` = "train" (80 %) or "test" (a seeded 20 % holdout, >= 1 sample) of this client's partition."""
    n = len(x)
    perm = np.random.default_rng(derive_seed(int(cfg["seed"]), pid, 17)).permutation(n)
    n_test = max(1, round(0.2 * n)) if n >= 2 else 0
    idx = np.sort(perm[:n_test] if part == "test" else perm[n_test:])
    if len(idx) == 0:  # a one-sample partition: train and evaluate on it
        idx = np.arange(n)
    t = torch.as_tensor(idx)
    return x[t], y[t]


def _load_personal(model: Any, msg: Message, context: Context, shared: list[str]) -> None:
    """Model = this client's personal layers (Context.state; the initial model before its first round) + the
    received shared keys, which must be exactly ``shared``."""
    received = msg.content["arrays"].to_torch_state_dict()
    if set(received) != set(shared):
        raise ValueError(f"layer-wise mode: received keys {sorted(received)[:3]}... differ from shared-keys")
    state = model.state_dict()
    if PERSONAL_STATE_KEY in context.state.array_records:
        state.update(context.state.array_records[PERSONAL_STATE_KEY].to_torch_state_dict())
    state.update(received)
    model.load_state_dict(state)


def _keep_personal(model: Any, context: Context, shared: list[str]) -> dict[str, Any]:
    """Store the personal layers in Context.state; return the shared part (all that goes to the server)."""
    state = model.state_dict()
    keep = set(shared)
    context.state[PERSONAL_STATE_KEY] = ArrayRecord({k: v for k, v in state.items() if k not in keep})
    return {k: state[k] for k in shared}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (the server orders and samples clients by it)."""
    pid, _ = _identity(context)
    return Message(RecordDict({CLIENT_INFO_KEY: _info(pid)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train on the local partition, reply with weights and metrics."""
    cfg = _run_config(msg)
    with torch_threads(int(cfg.get("client-threads", 1))):
        return _train(msg, context, cfg)


def _train(msg: Message, context: Context, cfg: dict[str, Any]) -> Message:
    pid, num_parts = _identity(context)
    server_round = int(cfg.get("server-round", 0))
    inject_faults(cfg, pid, server_round)
    ds = dataset_for(cfg)
    x, y = _local_xy(cfg, context)
    shared = _shared_keys(cfg)
    if shared is not None:
        x, y = _layerwise_split(cfg, pid, x, y, "train")
    if cfg.get("one-shot", False):  # one-shot fusion: an independent init per client, the global model unused
        model = client_model(cfg, ds, pid, seed=derive_seed(int(cfg["seed"]), pid, 13))
    else:
        model = client_model(cfg, ds, pid)  # the global architecture at this client's width
        if shared is None:
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        else:
            _load_personal(model, msg, context, shared)
    plan = local_plan(cfg, pid, server_round, len(x))
    masks = round_mask(cfg, model, server_round)
    extra: dict[str, float] = {}
    if masks is None:
        result = local_train(cfg, model, x, y, plan)
    else:  # FedPFN/FedPNU: fixed entries keep the global values, bit for bit
        with MaskedTraining(model, masks) as masked:
            result = local_train(cfg, model, x, y, plan, after_step=masked.after_step)
        extra["pfn-mask-ratio"] = mask_ratio(masks)
    metrics = MetricRecord(
        {
            **extra,
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "train-accuracy": result.accuracy,
            "local-epochs": plan.epochs,
            "local-steps": result.steps,
            "straggler": int(plan.straggler),
        }
    )
    state = model.state_dict() if shared is None else _keep_personal(model, context, shared)
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics, CLIENT_INFO_KEY: _info(pid)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's training partition; in layer-wise mode, the client's
    personal model (received shared keys + its personal layers) on its 20 % holdout."""
    cfg = _run_config(msg)
    pid, num_parts = _identity(context)
    ds = dataset_for(cfg)
    x, y = _local_xy(cfg, context)
    model = client_model(cfg, ds, pid)
    shared = _shared_keys(cfg)
    if shared is None:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    else:
        x, y = _layerwise_split(cfg, pid, x, y, "test")
        _load_personal(model, msg, context, shared)
    loss, acc = evaluate_model(model, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-accuracy": acc})
    return Message(RecordDict({"metrics": metrics, CLIENT_INFO_KEY: _info(pid)}), reply_to=msg)
