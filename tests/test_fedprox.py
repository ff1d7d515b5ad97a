"""FedProx: Flower's ``proximal-mu`` key in the train config, the proximal term in fedfuse's local training."""

from __future__ import annotations

import copy
import math

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp.strategy import FedProx as FlowerFedProx

from clients import client_app as capp
from fedfuse.data import load_dataset
from fedfuse.errors import ConfigError
from fedfuse.experiment import dataset_for, model_for
from fedfuse.models import build_model
from fedfuse.runners.inline import InlineGrid
from fedfuse.train import train
from strategies.registry import build_strategy, validate_config
from strategies.server_app import run_server

BASE = {"dataset": "digits", "width": 16, "num-clients": 3, "num-rounds": 2, "seed": 1, "local-epochs": 2}


def _update_norm(mu: float) -> float:
    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, ds.num_classes, width=16, seed=0)
    start = copy.deepcopy(model.state_dict())
    train(model, ds.x_train[:300], ds.y_train[:300], epochs=3, lr=0.05, momentum=0.9, seed=3, proximal_mu=mu)
    return math.sqrt(sum(float((v - start[k]).double().pow(2).sum()) for k, v in model.state_dict().items()))


def test_proximal_term_pulls_the_update_toward_the_received_weights():
    free, prox, strong = _update_norm(0.0), _update_norm(0.1), _update_norm(1.0)
    assert free > 0
    assert strong < prox < free  # same seed, same batches: only μ differs
    assert _update_norm(0.0) == free  # μ = 0 is plain SGD, bit for bit (no anchor kept)
    with pytest.raises(ValueError, match="proximal_mu"):
        _update_norm(-0.1)


def test_client_reads_flower_fedprox_key(tmp_path):
    """The ClientApp applies μ from the train ConfigRecord under Flower's own key ``proximal-mu``."""
    cfg = validate_config({**BASE, "out": str(tmp_path)})
    model = model_for(cfg, dataset_for(cfg))
    start = model.state_dict()
    norms = {}
    grid = InlineGrid(capp.app, 3)  # sets the task identity a Message needs
    for mu in (0.0, 0.5):
        content = RecordDict(
            {"arrays": ArrayRecord(start), "config": ConfigRecord({**cfg, "server-round": 1, "proximal-mu": mu})}
        )
        msg = Message(content, 1, MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = "m"
        reply = grid._deliver(msg)
        assert not reply.has_error(), reply.error
        state = reply.content["arrays"].to_torch_state_dict()
        norms[mu] = math.sqrt(sum(float((state[k] - start[k]).double().pow(2).sum()) for k in start))
    assert 0 < norms[0.5] < norms[0.0]


def test_fedprox_strategy_runs_inline_and_sends_mu(tmp_path):
    cfg = validate_config({**BASE, "out": str(tmp_path), "strategy": "fedprox", "proximal-mu": 0.05})
    strategy = build_strategy(cfg, model=model_for(cfg, dataset_for(cfg)))
    assert isinstance(strategy, FlowerFedProx) and strategy.proximal_mu == 0.05

    sent: list[float] = []

    class Recording(InlineGrid):
        def _deliver(self, message: Message) -> Message:
            if message.metadata.message_type == MessageType.TRAIN:
                sent.append(float(message.content["config"]["proximal-mu"]))
            return super()._deliver(message)

    row = run_server(Recording(capp.app, 3), cfg)
    assert sent == [0.05] * 6  # 3 clients × 2 rounds
    assert row["round"] == 2 and 0.0 <= row["central_accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="proximal-mu"):
        validate_config({**BASE, "strategy": "fedavg", "proximal-mu": 0.05})
