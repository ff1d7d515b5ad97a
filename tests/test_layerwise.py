"""LayerwiseAvg (partial averaging, personal layers in Context.state) and the LMC monitor, on the inline backend."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp

from clients import client_app as capp
from fedfuse import protocol
from fedfuse.errors import ConfigError
from fedfuse.experiment import dataset_for, model_for
from fedfuse.lmc import layerwise_barriers
from fedfuse.lmc.monitor import lmc_round_stats
from fedfuse.runners.inline import InlineGrid
from fedfuse.selection import head_keys, shared_keys
from strategies.registry import validate_config
from strategies.server_app import run_server

BASE = {"dataset": "digits", "width": 16, "num-clients": 3, "num-rounds": 2, "seed": 1, "local-epochs": 1}


class RecordingGrid(InlineGrid):
    """InlineGrid that keeps a decoded copy of every message and reply that crosses the wire."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        super().__init__(client_app, num_nodes)
        self.log: list[dict] = []

    def _deliver(self, message: Message) -> Message:
        entry = {"type": message.metadata.message_type, "node": message.metadata.dst_node_id}
        content = message.content
        if "arrays" in content.array_records:
            entry["sent"] = content.array_records["arrays"].to_torch_state_dict()
        if "config" in content.config_records:
            entry["round"] = int(content.config_records["config"].get("server-round", 0))
        reply = super()._deliver(message)
        if not reply.has_error():
            if reply.content.array_records:
                entry["reply"] = next(iter(reply.content.array_records.values())).to_torch_state_dict()
            if reply.content.metric_records:
                entry["metrics"] = dict(next(iter(reply.content.metric_records.values())))
        self.log.append(entry)
        return reply


def _cfg(tmp_path, **kw) -> dict:
    return validate_config({**BASE, "out": str(tmp_path), **kw})


@pytest.fixture(scope="module")
def body_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("body")
    cfg = _cfg(out, strategy="layerwise", **{"layerwise-preset": "body"})
    grid = RecordingGrid(capp.app, 3)
    run_server(grid, cfg)
    init = model_for(cfg, dataset_for(cfg)).state_dict()
    return cfg, grid, init, out


def _weighted_average(entries: list[dict]) -> dict[str, torch.Tensor]:
    w = [e["metrics"]["num-examples"] for e in entries]
    total = sum(w)
    return {
        k: sum(e["reply"][k].double() * (wi / total) for e, wi in zip(entries, w, strict=True))
        for k in entries[0]["reply"]
    }


def test_personal_layers_never_cross_the_wire(body_run) -> None:
    cfg, grid, init, _ = body_run
    head = set(head_keys(model_for(cfg, dataset_for(cfg))))
    shared = set(init) - head
    assert head == {"net.5.weight", "net.5.bias"}
    train = [e for e in grid.log if e["type"] == MessageType.TRAIN]
    evals = [e for e in grid.log if e["type"] == MessageType.EVALUATE]
    assert len(train) == 6 and len(evals) == 6  # 3 clients × 2 rounds, every client evaluates every round
    for e in train + evals:
        assert set(e["sent"]) == shared  # server → client: shared keys only
    for e in train:
        assert set(e["reply"]) == shared  # client → server: shared keys only
    for e in evals:
        assert "reply" not in e  # evaluate replies carry metrics only


def test_shared_keys_are_the_weighted_average_of_the_replies(body_run) -> None:
    _, grid, init, out = body_run
    train = [e for e in grid.log if e["type"] == MessageType.TRAIN]
    r1, r2 = [e for e in train if e["round"] == 1], [e for e in train if e["round"] == 2]
    avg1 = _weighted_average(r1)
    for e in r2:  # round 2 sends the aggregate of round 1
        for k, v in avg1.items():
            torch.testing.assert_close(e["sent"][k].double(), v, atol=1e-6, rtol=0)
    final = torch.load(out / "model.pt")
    for k, v in _weighted_average(r2).items():
        torch.testing.assert_close(final[k].double(), v, atol=1e-6, rtol=0)
    for k in ("net.5.weight", "net.5.bias"):  # the global model keeps the initial personal layers
        assert torch.equal(final[k], init[k])


def test_personal_layers_live_in_context_state_and_metrics_report_personal_accuracy(body_run) -> None:
    _, grid, init, out = body_run
    heads = []
    for ctx in grid.contexts.values():
        personal = ctx.state.array_records[protocol.PERSONAL_STATE].to_torch_state_dict()
        assert set(personal) == {"net.5.weight", "net.5.bias"}
        assert not torch.equal(personal["net.5.weight"], init["net.5.weight"])  # trained locally
        heads.append(personal["net.5.weight"])
    assert not torch.equal(heads[0], heads[1])  # each client has its own head
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    for row in rows[1:]:
        assert 0.0 <= row["personal_accuracy"] <= 1.0 and 0.0 <= row["central_accuracy"] <= 1.0
        assert 0.8 < row["shared_fraction"] < 1.0
    assert rows[2]["personal_accuracy"] > 0.3  # a trained body + local head beats chance (0.1) on the holdout


def test_client_loads_its_stored_personal_layers_and_keeps_them_local() -> None:
    cfg = validate_config({**BASE, "lr": 1e-9})  # lr ≈ 0: the stored values survive training unchanged
    model = model_for(cfg, dataset_for(cfg))
    head = head_keys(model)
    shared = [k for k in model.state_dict() if k not in head]
    grid = InlineGrid(capp.app, 2)
    ctx = grid.contexts[1]
    sentinel = {k: torch.full_like(model.state_dict()[k], 7.0) for k in head}
    ctx.state[protocol.PERSONAL_STATE] = ArrayRecord(sentinel)
    config = ConfigRecord({**cfg, "server-round": 3, "shared-keys": ",".join(shared)})
    arrays = ArrayRecord({k: v for k, v in model.state_dict().items() if k in shared})
    msg = Message(RecordDict({"arrays": arrays, "config": config}), 1, MessageType.TRAIN)
    reply = grid._deliver(msg)
    assert not reply.has_error(), reply.error
    assert set(reply.content["arrays"].keys()) == set(shared)
    stored = ctx.state.array_records[protocol.PERSONAL_STATE].to_torch_state_dict()
    for k in head:
        torch.testing.assert_close(stored[k], sentinel[k], atol=1e-4, rtol=0)


def test_a_reply_with_personal_keys_is_rejected(tmp_path) -> None:
    sneaky = ClientApp()
    sneaky.query()(capp.query)
    sneaky.evaluate()(capp.evaluate)

    @sneaky.train()
    def train(msg: Message, context) -> Message:
        reply = capp.train(msg, context)
        if context.node_config["partition-id"] == 0:  # leaks its head to the server
            state = reply.content["arrays"].to_torch_state_dict()
            state["net.5.bias"] = torch.zeros(10)
            reply.content["arrays"] = ArrayRecord(state)
        return reply

    cfg = _cfg(tmp_path, strategy="layerwise", **{"num-rounds": 1})
    row = run_server(InlineGrid(sneaky, 3), cfg)
    assert row["rejected"] == 1.0 and row["replies"] == 2.0


def test_no_bn_keeps_batchnorm_parameters_and_statistics_local(tmp_path) -> None:
    cfg = _cfg(tmp_path, strategy="layerwise", model="cnn", width=8, **{"batch-norm": True, "num-rounds": 1})
    cfg["layerwise-preset"] = "no-bn"
    cfg["num-clients"] = 2
    grid = RecordingGrid(capp.app, 2)
    run_server(grid, cfg)
    model = model_for(cfg, dataset_for(cfg))
    bn = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for k in m.state_dict()}
    assert "features.1.running_mean" in bn and "features.1.num_batches_tracked" in bn
    for e in grid.log:
        for part in ("sent", "reply"):
            assert not bn & set(e.get(part, {})), part
    personal = grid.contexts[1].state.array_records[protocol.PERSONAL_STATE].to_torch_state_dict()
    assert set(personal) == bn


def test_presets_resolve_to_the_expected_keys() -> None:
    cfg = validate_config(BASE)
    mlp = model_for(cfg, dataset_for(cfg))
    assert shared_keys(mlp, "body") == ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]
    assert shared_keys(mlp, "head") == ["net.5.weight", "net.5.bias"]
    assert shared_keys(mlp, "layers=net.1,net.5.bias") == ["net.1.weight", "net.1.bias", "net.5.bias"]
    with pytest.raises(ConfigError, match="match no state-dict key"):
        shared_keys(mlp, "layers=nope.*")
    with pytest.raises(ConfigError, match="no BatchNorm"):
        shared_keys(mlp, "no-bn")
    with pytest.raises(ConfigError, match="layerwise-preset='tail' is not allowed"):
        validate_config({"layerwise-preset": "tail"})
    cnn = model_for(validate_config({**BASE, "model": "cnn", "batch-norm": True}), dataset_for(cfg))
    keys = shared_keys(cnn, "no-bn")
    assert "features.0.weight" in keys and not any("running" in k or "features.1." in k for k in keys)


def test_lmc_monitor_logs_barriers_and_plots(tmp_path) -> None:
    cfg = _cfg(tmp_path, strategy="fedavg", **{"lmc-monitor": True})
    run_server(InlineGrid(capp.app, 3), cfg)
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    for row in rows[1:]:
        for key in (
            "lmc_full_loss_barrier",
            "lmc_full_error_barrier",
            "lmc_net_1_loss_barrier",
            "lmc_net_5_loss_barrier",
        ):
            assert math.isfinite(row[key])
    assert (tmp_path / "lmc.png").stat().st_size > 0


def test_lmc_round_stats_definitions() -> None:
    cfg = validate_config(BASE)
    ds = dataset_for(cfg)
    a, b = (model_for(cfg, ds, seed=s).state_dict() for s in (1, 2))
    x, y = ds.x_test[:128], ds.y_test[:128]
    template = model_for(cfg, ds)
    same = lmc_round_stats(template, [a, a, a], [1, 2, 3], x, y)
    assert all(v == 0.0 for v in same.values())  # identical clients: no barrier anywhere
    two = lmc_round_stats(template, [a, b], [1, 1], x, y)
    lw = layerwise_barriers(template, a, b, x, y, num_points=3)
    for g in lw.groups:  # N = 2, equal weights: mean of the base-A and base-B midpoint barriers
        expected = 0.5 * (g.base_a.mid_loss + g.base_b.mid_loss)
        assert two[f"lmc_{g.group.replace('.', '_')}_loss_barrier"] == pytest.approx(expected, abs=1e-5)
    assert two["lmc_full_loss_barrier"] == pytest.approx(lw.full.mid_loss, abs=1e-5)
