"""The post-fusion statistics round (bn-repair reset/repair) through Flower messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfuse import protocol
from fedfuse.errors import ConfigError
from fedfuse.runners.inline import InlineGrid
from strategies import FedWB


def _simulate(tmp_path, name: str, *extra: str) -> dict:
    args = ["--backend", "inline", "--one-shot", "--rounds", "1", "--num-clients", "3", "--strategy", "wb"]
    out = tmp_path / name
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", *args, *extra, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())["rounds"][-1]


def test_federated_repair_reaches_every_client_and_beats_plain_fusion(tmp_path) -> None:
    base = _simulate(tmp_path, "none", "--local-epochs", "5")
    rep = _simulate(tmp_path, "repair", "--local-epochs", "5", "--bn-repair", "repair")
    assert "repair_replies" not in base  # off by default: nothing extra is sent
    assert rep["repair_replies"] == 3 and rep["repair_up_bytes"] > 0 and rep["repair_down_bytes"] > 0
    assert rep["central_accuracy"] > base["central_accuracy"] + 0.02, (base, rep)


def test_federated_bn_reset_acts_on_a_batch_norm_model(tmp_path) -> None:
    common = ("--local-epochs", "2", "--model", "cnn", "--batch-norm", "--width", "32")
    base = _simulate(tmp_path, "bn-none", *common)
    reset = _simulate(tmp_path, "bn-reset", *common, "--bn-repair", "reset")
    assert reset["repair_replies"] == 3
    assert reset["central_accuracy"] != base["central_accuracy"], (base, reset)
    model = torch.load(tmp_path / "bn-reset" / "model.pt")
    other = torch.load(tmp_path / "bn-none" / "model.pt")
    assert not torch.equal(model["features.1.running_var"], other["features.1.running_var"])
    assert torch.equal(model["features.0.weight"], other["features.0.weight"])  # only statistics changed


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _users_app() -> ClientApp:
    """A user's own ClientApp: train only, no repair handler."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = _net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid = int(context.node_config["partition-id"])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(pid)))
        content = {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": 10 + pid})}
        return Message(RecordDict(content), reply_to=msg)

    return app


def _run(strategy: FedWB, grid: InlineGrid) -> dict[str, torch.Tensor]:
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(_net().state_dict()), num_rounds=1,
                            train_config=ConfigRecord({"lr": 0.1}))  # fmt: skip
    return result.arrays.to_torch_state_dict()


@pytest.mark.parametrize("mode", ["none", "repair", "reset"])
def test_a_client_app_without_the_handler_still_works(mode: str, caplog) -> None:
    sent: list[str] = []
    grid = InlineGrid(_users_app(), 3)
    deliver = grid._deliver
    grid._deliver = lambda m: (sent.append(m.metadata.message_type), deliver(m))[1]  # type: ignore[method-assign]
    x = torch.zeros(2, 8)
    kwargs = {"min_available_nodes": 3, "min_train_nodes": 3}
    plain = _run(FedWB(model=_net(), example_input=x, **kwargs), InlineGrid(_users_app(), 3))
    with caplog.at_level("WARNING", logger="fedfuse"):
        state = _run(FedWB(model=_net(), example_input=x, bn_repair=mode, **kwargs), grid)
    if mode == "none":
        assert protocol.REPAIR_MESSAGE_TYPE not in sent
    else:
        assert sent.count(protocol.REPAIR_MESSAGE_TYPE) == 3
        assert "no client returned statistics" in caplog.text
    assert all(torch.equal(state[k], plain[k]) for k in plain)  # degraded to plain fusion, nothing lost


def test_repair_options_are_validated() -> None:
    x = torch.zeros(2, 8)
    with pytest.raises(ConfigError, match="bn_repair='auto' is not allowed; allowed: none, reset, repair"):
        FedWB(model=_net(), example_input=x, bn_repair="auto")
    with pytest.raises(ConfigError, match="repair_rounds=-1 is out of range"):
        FedWB(model=_net(), example_input=x, bn_repair="repair", repair_rounds=-1)
    from strategies import FedGWB

    with pytest.raises(ConfigError, match="alpha=2.0 is out of range"):
        FedGWB(model=_net(), example_input=x, alpha=2.0)
    assert FedGWB(model=_net(), example_input=x, alpha=0.25).fuse_kwargs == {"alpha": 0.25}


class _TrainLog(InlineGrid):
    """An InlineGrid that keeps the model of every train message it delivers, per delivery call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[dict[str, torch.Tensor]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == "train"]
        if train:
            self.sent.append(next(iter(train[0].content.array_records.values())).to_torch_state_dict())
        return super().send_and_receive(messages, timeout=timeout)


def _run_digits(tmp_path, name: str, rounds: int, bn_repair: str, grid: InlineGrid | None = None, **extra):
    from clients.client_app import app
    from strategies.server_app import run_server

    cfg = {
        "strategy": "wb", "dataset": "digits", "model": "mlp", "num-clients": 3, "num-rounds": rounds,
        "partition": "dirichlet", "alpha": 0.3, "local-epochs": 1, "seed": 0, "bn-repair": bn_repair,
        "out": str(tmp_path / name), **extra,
    }  # fmt: skip
    resume = bool(cfg.pop("_resume", False))
    run_server(grid or InlineGrid(app, 3), cfg, resume=resume)
    return torch.load(tmp_path / name / "model.pt")


def test_clients_train_on_from_the_unrepaired_fused_model(tmp_path) -> None:
    """REPAIR corrects the served model only: feeding it back compounded and diverged (module docstring)."""
    from clients.client_app import app

    plain1 = _run_digits(tmp_path, "plain1", 1, "none")
    served1 = _run_digits(tmp_path, "repair1", 1, "repair")
    log = _TrainLog(app, 3)
    _run_digits(tmp_path, "repair2", 2, "repair", grid=log)
    assert len(log.sent) == 2
    round2 = log.sent[1]
    assert any(not torch.equal(served1[k], plain1[k]) for k in plain1)  # REPAIR acted on the served model
    for k in plain1:  # ... and round 2 trains from the fused model without it
        torch.testing.assert_close(round2[k], plain1[k], rtol=0, atol=0)


class _Stop(Exception):
    pass


def test_resume_after_repair_rounds_is_bit_identical(tmp_path) -> None:
    """The unrepaired fused model clients train on is checkpoint state: an interrupted run resumes identically."""
    from clients.client_app import app
    from strategies.server_app import run_server

    straight = _run_digits(tmp_path, "straight", 3, "repair")

    def stop_after_round_2(row: dict) -> None:
        if row.get("round") == 2:
            raise _Stop

    cfg = {
        "strategy": "wb", "dataset": "digits", "model": "mlp", "num-clients": 3, "num-rounds": 3,
        "partition": "dirichlet", "alpha": 0.3, "local-epochs": 1, "seed": 0, "bn-repair": "repair",
        "out": str(tmp_path / "split"),
    }  # fmt: skip
    with pytest.raises(_Stop):
        run_server(InlineGrid(app, 3), cfg, on_round=stop_after_round_2)
    resumed = _run_digits(tmp_path, "split", 3, "repair", _resume=True)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
