"""fedfuse ClientApp (Flower Message API).

The server sends the whole validated run config in every message's ConfigRecord, so the same
ClientApp works under ``fedfuse simulate``, ``flwr run`` and a deployed SuperNode. The client's
identity comes from Flower's ``node_config`` (``partition-id``, ``num-partitions``), or in a pooled run
(``client-pool``) from the message, which names the client this node serves for it. Data sets and
partitions are cached per process, so an actor loads its data once, not once per round.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.personal import holdout_split, keep_personal, load_personal, shared_keys_of
from fedfuse import protocol
from fedfuse.attacks import (
    OMNISCIENT,
    claimed_examples,
    flip_labels,
    is_attacker,
    omniscient_reply,
    parse_attack,
    poison_state,
)
from fedfuse.config import OPTIONS
from fedfuse.experiment import (
    apart_model,
    client_data,
    client_model,
    dataset_for,
    derive_seed,
    init_mode,
    inject_faults,
    local_plan,
    local_train,
    round_mask,
)
from fedfuse.lora.run import adapter_state, load_received, lora_on
from fedfuse.replies import decode_arrays
from fedfuse.state import state_bytes, torch_threads
from fedfuse.subspace import MaskedTraining, mask_ratio
from fedfuse.train import evaluate as evaluate_model

app = ClientApp()
log = logging.getLogger("flwr")


def _identity(context: Context, run: dict[str, Any] | None = None) -> tuple[int, int]:
    """(client id, number of clients): in a pooled run (``client-pool`` > 0) the client the message names for this
    node (:data:`fedfuse.protocol.POOL_CLIENTS`) of ``num-clients``; else the node config's partition."""
    if run is not None and int(run.get("client-pool", 0) or 0):
        nodes, me = list(run.get(protocol.POOL_NODES, [])), str(context.node_id)
        if me not in nodes:
            raise ValueError(
                f"client-pool={run['client-pool']}: the message names no client for node {me}; a pooled run needs a "
                "strategy that samples clients and sends their ids (fedfuse's strategies, pool_clients=N)"
            )
        return int(list(run[protocol.POOL_CLIENTS])[nodes.index(me)]), int(run["num-clients"])
    cfg = context.node_config
    if protocol.PARTITION_ID not in cfg or protocol.NUM_PARTITIONS not in cfg:
        raise ValueError("node_config needs 'partition-id' and 'num-partitions' (e.g. --node-config)")
    return int(cfg[protocol.PARTITION_ID]), int(cfg[protocol.NUM_PARTITIONS])


def _local_xy(cfg: dict[str, Any], context: Context) -> tuple[Any, Any]:
    """This client's training data: node_config ``data-dir`` (local files), else its simulated partition."""
    data_dir = context.node_config.get(protocol.DATA_DIR)
    if data_dir:
        from fedfuse.data.local import load_local_data

        ds = dataset_for(cfg)
        return load_local_data(str(data_dir), ds.input_shape, ds.num_classes)
    pid, num_parts = _identity(context, cfg)
    return client_data(cfg, pid, num_parts)


def _apart_model(cfg: dict[str, Any], context: Context, ds: Any, pid: int) -> torch.nn.Module | None:
    """This client's round-1 model when the run starts clients apart (:func:`fedfuse.experiment.apart_model`):
    the node config's ``init-from`` file if set, else its ``client-init-from`` file, else its own seed. A node's
    ``init-from`` in a shared-init run is left unused (the run config decides; logged once per node)."""
    node_file = str(context.node_config.get(protocol.INIT_FROM, "") or "") or None
    if node_file and init_mode(cfg) == "shared" and "init-from-ignored" not in context.state:
        log.warning("node config init-from=%r is unused: the run has client-init='shared' (set 'own')", node_file)
        context.state["init-from-ignored"] = ConfigRecord({"file": node_file})
    return apart_model(cfg, ds, pid, node_file)


def _run_config(msg: Message) -> dict[str, Any]:
    """The message's one ConfigRecord (the run config + round keys), whatever the strategy named it.

    Every core run option must be there (fedfuse's ServerApp sends them all); a missing one is an error
    reply naming it, never a KeyError deep inside training.
    """
    records = list(msg.content.config_records.values())
    cfg = dict(records[0]) if len(records) == 1 else {}
    missing = [key for key in OPTIONS if key not in cfg]
    if len(records) != 1 or missing:
        found = f"{len(records)} ConfigRecords" if len(records) != 1 else f"lacks {', '.join(map(repr, missing[:6]))}"
        raise ValueError(
            f"fedfuse ClientApp: the {msg.metadata.message_type} message's config {found}"
            f"{' ...' if len(missing) > 6 else ''}; send the whole run config, e.g. "
            "train_config=ConfigRecord(strategies.registry.validate_config({...}))"
        )
    return cfg


def _received_state(msg: Message) -> dict[str, torch.Tensor]:
    """The message's one ArrayRecord as a state dict, whatever the strategy named it."""
    return decode_arrays(next(iter(msg.content.array_records.values())))


def _info(partition_id: int) -> ConfigRecord:
    return ConfigRecord({protocol.PARTITION_ID: partition_id})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (the server orders and samples clients by it)."""
    pid, _ = _identity(context)
    return Message(RecordDict({protocol.CLIENT_INFO: _info(pid)}), reply_to=msg)


@app.query(protocol.REPAIR_ACTION)
def repair_statistics(msg: Message, context: Context) -> Message:
    """Statistics for the server's post-fusion ``bn-repair`` round, on this client's training data.

    ``bn-stats``: the fused model's BatchNorm running statistics recomputed locally; ``unit-stats``: per-unit
    (mean, std) at the requested sites of the fused model and, when sent, of this client's own model aligned
    to it (:mod:`fedfuse.align.repair`). Only these statistics leave the client.
    """
    from fedfuse.align.repair import bn_statistics, unit_statistics  # here: the alignment engine loads POT/scipy

    cfg = _run_config(msg)
    with torch_threads(int(cfg.get("client-threads", 1))):
        pid, _ = _identity(context, cfg)
        ds = dataset_for(cfg)
        x, _ = _local_xy(cfg, context)
        arrays = msg.content.array_records
        fused = client_model(cfg, ds, pid)
        fused.load_state_dict(arrays[protocol.ARRAYS].to_torch_state_dict())
        kind = str(cfg.get(protocol.REPAIR_KIND, ""))
        if kind == "bn-stats":
            records = {protocol.REPAIR_FUSED: ArrayRecord(bn_statistics(fused, x))}
        elif kind == "unit-stats":
            sites = [s for s in str(cfg.get(protocol.REPAIR_SITES, "")).split(",") if s]
            records = {protocol.REPAIR_FUSED: ArrayRecord(unit_statistics(fused, x, sites))}
            if protocol.REPAIR_OWN in arrays:
                own = client_model(cfg, ds, pid)
                own.load_state_dict(arrays[protocol.REPAIR_OWN].to_torch_state_dict())
                records[protocol.REPAIR_OWN] = ArrayRecord(unit_statistics(own, x, sites))
        else:
            raise ValueError(f"{protocol.REPAIR_KIND}={kind!r} is not supported; allowed: bn-stats, unit-stats")
    metrics = MetricRecord({protocol.NUM_EXAMPLES: len(x)})
    return Message(RecordDict({**records, protocol.METRICS: metrics, protocol.CLIENT_INFO: _info(pid)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train on the local partition, reply with weights and metrics."""
    cfg = _run_config(msg)
    with torch_threads(int(cfg.get("client-threads", 1))):
        return _train(msg, context, cfg)


def _train(msg: Message, context: Context, cfg: dict[str, Any]) -> Message:
    pid, num_parts = _identity(context, cfg)
    server_round = int(cfg.get(protocol.SERVER_ROUND, 0))
    if inject_faults(cfg, pid, server_round):  # a simulated straggler: the server counts this reply as late
        late = MetricRecord({protocol.INJECTED_LATE: 1})
        return Message(RecordDict({protocol.METRICS: late, protocol.CLIENT_INFO: _info(pid)}), reply_to=msg)
    ds = dataset_for(cfg)
    x, y = _local_xy(cfg, context)
    shared = shared_keys_of(cfg)
    if shared is not None:
        x, y = holdout_split(int(cfg["seed"]), pid, x, y, "train")
    apart = _apart_model(cfg, context, ds, pid) if server_round == 1 else None
    if apart is not None:  # clients start apart (client-init=own / one-shot / client-init-from): received unused
        model = apart
    else:
        model = client_model(cfg, ds, pid)  # the global architecture at this client's width (LoRA: rank)
        if lora_on(cfg):  # adapters (and folded base weights) only; the frozen base is the client's own
            load_received(model, _received_state(msg))
        elif shared is None:
            model.load_state_dict(_received_state(msg))
        else:
            load_personal(model, _received_state(msg), context, shared)
    plan = local_plan(cfg, pid, server_round, len(x))
    attack = parse_attack(str(cfg.get("attack", ""))) if is_attacker(cfg, pid) else None
    if attack is not None:  # a simulated Byzantine client (fedfuse.attacks): labelflip trains on flipped labels
        y = flip_labels(attack[0], y, ds.num_classes)
    masks = round_mask(cfg, model, server_round)
    extra: dict[str, float] = {}
    mu = float(cfg.get(protocol.PROXIMAL_MU, 0.0))  # FedProx: (μ/2)‖w − w_received‖² (Flower's FedProx key)
    if masks is None:
        result = local_train(cfg, model, x, y, plan, proximal_mu=mu)
    else:  # FedPFN/FedPNU: fixed entries keep the global values, bit for bit
        with MaskedTraining(model, masks) as masked:
            result = local_train(cfg, model, x, y, plan, after_step=masked.after_step, proximal_mu=mu)
        extra["pfn-mask-ratio"] = mask_ratio(masks)
    metrics = MetricRecord(
        {
            **extra,
            protocol.NUM_EXAMPLES: result.num_examples,
            protocol.TRAIN_LOSS: result.loss,
            protocol.TRAIN_ACCURACY: result.accuracy,
            "local-epochs": plan.epochs,
            "local-steps": result.steps,
            "straggler": int(plan.straggler),
        }
    )
    state = model.state_dict() if shared is None else keep_personal(model, context, shared)
    if lora_on(cfg):  # only the adapters travel
        state = adapter_state(model)
        metrics["bytes-sent"] = state_bytes(state)
    if attack is not None and attack[0] in OMNISCIENT:  # it knows the honest updates (alie, ipm, adaptive, evade…)
        state, claim, steps = omniscient_reply(*attack, cfg, _received_state(msg), server_round, result.num_examples,
                                               result.steps, own=pid)  # fmt: skip
        metrics[protocol.NUM_EXAMPLES], metrics["local-steps"] = claim, steps
    elif attack is not None:
        state = poison_state(
            *attack, state, _received_state(msg), seed=derive_seed(int(cfg["seed"]), pid, server_round, 13)
        )
        metrics[protocol.NUM_EXAMPLES] = claimed_examples(*attack, result.num_examples)
    content = {protocol.ARRAYS: ArrayRecord(state), protocol.METRICS: metrics, protocol.CLIENT_INFO: _info(pid)}
    return Message(RecordDict(content), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's training partition; in layer-wise mode, the client's
    personal model (received shared keys + its personal layers) on its 20 % holdout."""
    cfg = _run_config(msg)
    pid, num_parts = _identity(context, cfg)
    ds = dataset_for(cfg)
    x, y = _local_xy(cfg, context)
    model = client_model(cfg, ds, pid)
    shared = shared_keys_of(cfg)
    if lora_on(cfg):
        load_received(model, _received_state(msg))
    elif shared is None:
        model.load_state_dict(_received_state(msg))
    else:
        x, y = holdout_split(int(cfg["seed"]), pid, x, y, "test")
        load_personal(model, _received_state(msg), context, shared)
    loss, acc = evaluate_model(model, x, y)
    metrics = MetricRecord({protocol.NUM_EXAMPLES: len(x), protocol.EVAL_LOSS: loss, protocol.EVAL_ACCURACY: acc})
    return Message(RecordDict({protocol.METRICS: metrics, protocol.CLIENT_INFO: _info(pid)}), reply_to=msg)
