"""Flower's own CLI path: `flwr run` against a local SuperLink in simulation mode (Ray), as a Flower user runs.

One SuperLink for the module (a private FLWR_HOME, a free loopback port; stopped at the end):
- fedfuse's app (`flwr run <repo>`): results in a fresh directory per run (never overwritten), the log
  says where; a bad value is one error line and a failed run; a round in which every client errors
  fails the run with one line; an unknown key is refused (by Flower itself, before the app starts).
- a user-written ServerApp + ClientApp (imports: flwr, torch, sklearn, `from strategies import FedWB`):
  no exception or error in the logs, accuracy rises.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfuse.runners.ray import local_superlink, wait_finished

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).parent / "flwr")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
FED = ["--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]


@pytest.fixture(scope="module")
def fedfuse_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fedfuse-home")


@pytest.fixture(scope="module")
def superlink(tmp_path_factory, fedfuse_home) -> Iterator[dict[str, str]]:
    """A SuperLink started in its own directory, with $FEDFUSE_HOME set (the ServerApp inherits its environment)."""
    with local_superlink(tmp_path_factory.mktemp("superlink"), {"FEDFUSE_HOME": str(fedfuse_home)}) as env:
        yield env


def flwr_run(env: dict[str, str], app: Path, run_config: str, *extra: str) -> tuple[int, str, str, str]:
    """(exit code, the streamed log without colours, the run's final status and its details).

    `flwr run --stream` can return before the run ends (seen under load), so the status is polled."""
    cmd = [FLWR, "run", str(app), "--run-config", run_config, *FED, "--stream", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = ANSI.sub("", proc.stdout + proc.stderr)
    status = details = ""
    if m := re.search(r"Successfully started run (\d+)", log):
        status, details = wait_finished(env, m.group(1), timeout=600)
    return proc.returncode, log, status, details


def error_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "ERROR" in ln or "Traceback" in ln or "Exception" in ln]


def test_fedfuse_app_never_overwrites_and_says_where_results_went(superlink, fedfuse_home, tmp_path) -> None:
    """A relative out lands under $FEDFUSE_HOME, not in the SuperLink's working directory, and the first line the
    app logs is the absolute path."""
    out = fedfuse_home / "runs" / "flwr-run"
    config = "num-rounds=1 num-clients=2 dataset='mnist1d' out='runs/flwr-run'"
    first = flwr_run(superlink, ROOT, config)
    second = flwr_run(superlink, ROOT, config)
    for code, log, status, _ in (first, second):
        assert code == 0 and status == "finished:completed", log[-3000:]
        assert not error_lines(log), error_lines(log)
    ours = [
        [ln.split("fedfuse: ", 1)[1] for ln in log.splitlines() if "fedfuse: " in ln]
        for _, log, _, _ in (first, second)
    ]
    relative = f" (out='runs/flwr-run' under {fedfuse_home})"
    assert ours[0][0] == f"results go to {out}/{relative}", ours[0]
    assert ours[1][0] == f"results go to {out}-2/{relative}", ours[1]
    assert f"{out} already holds results; this run writes to {out}-2" in second[1]
    for d in (out, Path(f"{out}-2")):
        rows = json.loads((d / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["replies"] == 2


def test_flwr_run_serves_many_clients_from_a_pool_of_supernodes(superlink, tmp_path) -> None:
    """`client-pool=2` on Flower's 2-SuperNode federation serves 8 clients: each round's 2 sampled clients (seeded,
    from all 8) train on the 2 nodes, and over 3 rounds more clients than nodes take part."""
    out = tmp_path / "pool"
    config = f"num-rounds=3 num-clients=8 fraction-train=0.25 client-pool=2 dataset='mnist1d' out='{out}'"
    code, log, status, _ = flwr_run(superlink, ROOT, config)
    assert code == 0 and status == "finished:completed", log[-3000:]
    assert not error_lines(log), error_lines(log)
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["replies"] for r in rows[1:]] == [2, 2, 2], rows
    from fedfuse.experiment import sample_clients

    assert len({c for r in (1, 2, 3) for c in sample_clients(0, r, 8, 0.25, 2)}) > 2  # the run's seed is 0


def test_a_bad_value_is_one_line_and_a_failed_run(superlink, tmp_path) -> None:
    code, log, status, details = flwr_run(superlink, ROOT, f"strategy='wbb' num-clients=2 out='{tmp_path / 'x'}'")
    message = "strategy='wbb' is not allowed; allowed: fedavg"
    assert status == "finished:failed" and message in details, (status, details, log[-3000:])
    ours = [ln for ln in log.splitlines() if "fedfuse: error:" in ln]
    assert len(ours) == 1 and message in ours[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (tmp_path / "x").exists()
    print(f"flwr run exit code for a failed run: {code} (Flower's CLI; the run's status is {status})")


def test_an_unknown_key_is_refused_before_the_run(superlink) -> None:
    """Flower itself checks run-config keys against pyproject.toml before any app code runs: the message is
    Flower's and cannot name our nearest key; `fedfuse simulate` and the ServerApp do (see test_cli)."""
    code, log, status, _ = flwr_run(superlink, ROOT, "num-round=3")
    assert code != 0 and status == "", log[-3000:]
    assert "Invalid run configuration" in log


def test_a_round_in_which_every_client_errors_fails_the_run(superlink, tmp_path) -> None:
    out = tmp_path / "fail"
    code, log, status, details = flwr_run(superlink, ROOT, f"num-rounds=3 num-clients=2 fail-prob=1.0 out='{out}'")
    line = "round 1: every client failed (2 of 2); first error: RuntimeError: injected fault: partition"
    assert status == "finished:failed" and line in details, (status, details)
    # one line of ours (Flower itself logs each ClientApp exception with its traceback, under Ray)
    assert len([ln for ln in log.splitlines() if f"fedfuse: error: {line}" in ln]) == 1, log[-3000:]
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"]] == [0, 1]


USER_SERVER = '''
"""A Flower user's ServerApp: FedAvg swapped for FedWB, nothing else from fedfuse."""
import json

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from strategies import FedWB
from user_app.task import Net, load_test, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    net = Net()
    x_test, y_test = load_test()

    history = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        history.append(test(net, x_test, y_test))
        with open(context.run_config["results-file"], "w") as f:
            json.dump(history, f)
        return MetricRecord({"accuracy": history[-1]})

    # was: FedAvg(fraction_evaluate=0.0, min_available_nodes=2)
    strategy = FedWB(model=net, fraction_evaluate=0.0, min_available_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(net.state_dict()),
                   num_rounds=int(context.run_config["num-server-rounds"]), evaluate_fn=evaluate)
'''

USER_CLIENT = '''
"""A Flower user's ClientApp: @app.train and @app.evaluate only (no query handler)."""
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from user_app.task import Net, load_partition, test, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train(net, x, y)
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(context.node_config["partition-id"], context.node_config["num-partitions"])
    content = RecordDict({"metrics": MetricRecord({"accuracy": test(net, x, y), "num-examples": len(y)})})
    return Message(content=content, reply_to=msg)
'''

USER_TASK = '''
"""Model and data of the user's app: an MLP on scikit-learn's bundled digits."""
import torch
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x)


def _data():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target)


def load_partition(pid: int, n: int):
    x, y = _data()
    x, y = x[:1400], y[:1400]
    return x[pid::n], y[pid::n]


def load_test():
    x, y = _data()
    return x[1400:], y[1400:]


def train(net, x, y, epochs: int = 2) -> float:
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(y), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            opt.step()
    return float(loss)


def test(net, x, y) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())
'''

USER_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "user-app"
version = "1.0.0"
dependencies = ["flwr[simulation]", "torch", "scikit-learn"]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "user_app.server:app"
clientapp = "user_app.client:app"

[tool.flwr.app.config]
num-server-rounds = 3
results-file = "accuracy.json"
"""


def write_user_app(root: Path) -> Path:
    pkg = root / "user_app"
    pkg.mkdir(parents=True)
    (root / "pyproject.toml").write_text(USER_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    for name, text in (("server.py", USER_SERVER), ("client.py", USER_CLIENT), ("task.py", USER_TASK)):
        (pkg / name).write_text(textwrap.dedent(text))
    return root


def test_a_users_own_server_and_client_app_with_fedwb(superlink, tmp_path) -> None:
    """FedWB as a drop-in for FedAvg in an app that knows nothing else of fedfuse: the clients get no message
    they did not register (no query), the logs hold no error, and the global model learns."""
    app = write_user_app(tmp_path / "user-app")
    results = tmp_path / "accuracy.json"
    code, log, status, _ = flwr_run(superlink, app, f"num-server-rounds=3 results-file='{results}'")
    assert code == 0 and status == "finished:completed", log[-4000:]
    assert not error_lines(log), "\n".join(error_lines(log))
    acc = json.loads(results.read_text())
    assert len(acc) == 4, acc  # central evaluation after rounds 0..3
    assert acc[-1] > acc[0] + 0.3 and acc[-1] > 0.6, acc
    print(f"user app with FedWB: central accuracy by round {acc}")
