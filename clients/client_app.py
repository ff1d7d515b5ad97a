"""fedfuse ClientApp (Flower Message API).

The server sends the whole validated run config in every message's ConfigRecord, so the same
ClientApp works under ``fedfuse simulate``, ``flwr run`` and a deployed SuperNode. The client's
identity comes from Flower's ``node_config`` (``partition-id``, ``num-partitions``). Data sets and
partitions are cached per process, so an actor loads its data once, not once per round.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfuse.experiment import (
    client_data,
    dataset_for,
    derive_seed,
    inject_faults,
    local_plan,
    local_train,
    model_for,
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
    if cfg.get("one-shot", False):  # one-shot fusion: an independent init per client, the global model unused
        model = model_for(cfg, ds, seed=derive_seed(int(cfg["seed"]), pid, 13))
    else:
        model = model_for(cfg, ds)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
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
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, CLIENT_INFO_KEY: _info(pid)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's training partition (no local test split yet)."""
    cfg = _run_config(msg)
    pid, num_parts = _identity(context)
    ds = dataset_for(cfg)
    x, y = _local_xy(cfg, context)
    model = model_for(cfg, ds)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, acc = evaluate_model(model, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-accuracy": acc})
    return Message(RecordDict({"metrics": metrics, CLIENT_INFO_KEY: _info(pid)}), reply_to=msg)
