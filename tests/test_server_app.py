"""The ServerApp reports what any strategy returns: a user's plain FedAvg subclass gets real client metrics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

USER_STRATEGY = '''
"""A user's own strategy: Flower only, nothing from fedfuse."""
from flwr.serverapp.strategy import FedAvg


class LoudFedAvg(FedAvg):
    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics["server-note"] = float(server_round)  # a strategy statistic, not a client metric
        return arrays, metrics
'''


def test_a_users_plain_fedavg_subclass_reports_client_metrics(tmp_path: Path) -> None:
    (tmp_path / "user_strategies.py").write_text(textwrap.dedent(USER_STRATEGY))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", "--backend", "inline",
           "--strategy", "user_strategies:LoudFedAvg", "--dataset", "digits", "--num-clients", "3",
           "--rounds", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert math.isfinite(row["client_train_loss"]) and 0.0 <= row["client_train_accuracy"] <= 1.0
        assert row["replies"] == 3 and row["failures"] == 0 and row["timeouts"] == 0
        assert row["server_note"] == row["round"]  # the strategy's own key, kept apart from client metrics
    assert rows[2]["client_train_loss"] < rows[1]["client_train_loss"]


def test_fedfuse_clientapp_names_a_missing_config_key_in_its_error_reply() -> None:
    """A user's ServerApp that sends fedfuse's ClientApp no run config gets an error reply naming the keys."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.app.message_type import MessageType

    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid

    grid = InlineGrid(app, 2)
    content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}), "config": ConfigRecord({"lr": 0.1})})
    msg = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error()
    assert "config lacks 'strategy', 'dataset'" in reply.error.reason and "validate_config" in reply.error.reason


def test_an_error_reply_is_summarised_in_one_line() -> None:
    """Under Ray an error reply's reason is a traceback wrapped twice; logs and the run's error show the
    client's own exception line."""
    from fedfuse.replies import error_summary

    ray_reason = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
        '  File "/x/client_app.py", line 96, in train\n'
        "RuntimeError: injected fault: partition 1 failed in round 1\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "flwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: injected fault: partition 1 failed in round 1'>"
    )
    assert error_summary(ray_reason) == "RuntimeError: injected fault: partition 1 failed in round 1"
    assert error_summary("Traceback (most recent call last):\n  File x\nKeyError: 'seed'") == "KeyError: 'seed'"
    assert error_summary(None) == "no reason given"


def test_a_relative_out_resolves_under_fedfuse_home_never_the_working_directory(tmp_path, monkeypatch) -> None:
    """`flwr run .`: the ServerApp's working directory is wherever the (shared) SuperLink started, so a relative
    run-config `out` is taken under $FEDFUSE_HOME, else ~/.fedfuse; an absolute one as given."""
    from fedfuse.results import fedfuse_home, resolve_out

    monkeypatch.chdir(tmp_path)  # the SuperLink's directory: must not matter
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_out("runs/x", {}) == tmp_path / "home" / ".fedfuse" / "runs" / "x"
    assert resolve_out("runs/x", {"FEDFUSE_HOME": str(tmp_path / "fh")}) == tmp_path / "fh" / "runs" / "x"
    assert resolve_out("../y", {"FEDFUSE_HOME": str(tmp_path / "fh")}) == tmp_path / "y"  # resolved, absolute
    assert resolve_out(tmp_path / "abs", {"FEDFUSE_HOME": "/elsewhere"}) == tmp_path / "abs"
    assert fedfuse_home({"FEDFUSE_HOME": "  "}) == tmp_path / "home" / ".fedfuse"  # blank: the default
