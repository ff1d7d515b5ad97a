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

from fedfuse.experiment import client_data, dataset_for, local_plan, local_train, model_for, round_mask
from fedfuse.subspace import MaskedTraining, mask_ratio
from fedfuse.train import evaluate as evaluate_model

app = ClientApp()

CLIENT_INFO_KEY = "client"  # mirrors strategies.base.CLIENT_INFO_KEY (clients must not import strategies)


def _identity(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError("node_config needs 'partition-id' and 'num-partitions' (e.g. --node-config)")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


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
    pid, num_parts = _identity(context)
    server_round = int(cfg.get("server-round", 0))
    ds = dataset_for(cfg)
    x, y = client_data(cfg, pid, num_parts)
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
    x, y = client_data(cfg, pid, num_parts)
    model = model_for(cfg, ds)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, acc = evaluate_model(model, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-accuracy": acc})
    return Message(RecordDict({"metrics": metrics, CLIENT_INFO_KEY: _info(pid)}), reply_to=msg)
