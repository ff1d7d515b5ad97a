"""FedWB / FedGWB / FedMatch as Flower strategies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedfuse.errors import ConfigError
from fedfuse.models import build_model


def test_one_shot_fusion_beats_plain_averaging(tmp_path) -> None:
    """Clients from independent inits: averaging mixes unaligned neurons, wb/match align them first."""
    args = ["--backend", "inline", "--one-shot", "--rounds", "1", "--num-clients", "4", "--local-epochs", "5"]
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", *args]
    cmd += ["--compare", "fedavg,wb,gwb,match", "--no-plot", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(tmp_path.rglob("*.png"))  # --no-plot: neither compare.png nor a run's accuracy.png
    acc = {k: v["central_accuracy"] for k, v in json.loads((tmp_path / "compare.json").read_text()).items()}
    assert acc["wb"] > acc["fedavg"] + 0.1, acc
    assert acc["match"] > acc["fedavg"] + 0.1, acc
    # gwb (fused GW, warm-started from WB) now aligns like wb; plain GW (fuse(method="gw")) loses here
    assert acc["gwb"] > acc["fedavg"] + 0.1, acc


def test_fusion_strategy_arguments_are_validated() -> None:
    from strategies import FedWB

    model = build_model("mlp", (1, 8, 8), 10)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="solver='lp' is not allowed; allowed: emd, sinkhorn"):
        FedWB(model=model, example_input=x, solver="lp")
    with pytest.raises(ConfigError, match="epsilon=0 is out of range"):
        FedWB(model=model, example_input=x, epsilon=0)

    class Sorted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.sort(self.fc(x), dim=1).values)

    with pytest.raises(ConfigError, match="sort"):
        FedWB(model=Sorted(), example_input=torch.zeros(2, 4))


PLUGIN = '''
"""A Flower user's own apps: only flwr imports, plus fedfuse's FedWB strategy."""
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from sklearn.datasets import load_digits

from strategies import FedWB

X, Y = load_digits(return_X_y=True)
X = torch.tensor(X, dtype=torch.float32) / 16.0
Y = torch.tensor(Y)


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def accuracy(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float((model(X[1500:]).argmax(1) == Y[1500:]).float().mean())


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    x, y = X[pid:1500:3], Y[pid:1500:3]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    metrics = MetricRecord({"num-examples": len(x)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    model = net()
    strategy = FedWB(model=model, example_input=X[:2], fraction_evaluate=0.0, min_available_nodes=3)
    history = []

    def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        history.append(accuracy(model))
        return MetricRecord({"accuracy": history[-1]})

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=2, evaluate_fn=central)
    print("HISTORY", history)


run_simulation(server_app=server, client_app=client, num_supernodes=3,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
'''


@pytest.mark.ray
def test_fedwb_plugs_into_a_users_own_serverapp(tmp_path) -> None:
    script = tmp_path / "user_app.py"
    script.write_text(PLUGIN)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Traceback" not in log and "ClientAppException" not in log, log[-3000:]  # no QUERY to a user's app
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HISTORY"))
    history = json.loads(line.split(" ", 1)[1])
    assert len(history) == 3 and history[2] > history[0] + 0.3, history


def test_width_heterogeneous_clients_fuse_into_the_global_width(tmp_path) -> None:
    """Clients of widths 32/48/64 get the global model transported to their width; wb fuses them back."""
    args = ["--backend", "inline", "--strategy", "wb", "--client-widths", "32,48,64", "--width", "64"]
    args += ["--num-clients", "3", "--rounds", "3", "--local-epochs", "2", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert all(r["replies"] == 3 and r["rejected"] == 0 for r in rows[1:])  # every width-w reply fit its width
    assert rows[-1]["central_accuracy"] > rows[0]["central_accuracy"] + 0.3
    final = torch.load(tmp_path / "model.pt")
    assert final["net.1.weight"].shape == (64, 64) and final["net.3.weight"].shape == (64, 64)


def test_client_widths_need_a_barycenter_strategy(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedfuse.cli", "simulate", "--strategy", "fedavg", "--client-widths", "32,64",
         "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "client-widths='32,64' needs strategy wb or gwb" in proc.stderr
