"""The docker-compose deployment, started as real processes on 127.0.0.1 (no Docker engine needed).

Every command comes from docker-compose.yml (or the insecure override) through
``tests.test_compose.localize``: service names become 127.0.0.1, ports become free ports, container
paths become the generated certificates/keys and temporary volume directories. So the compose file
and this test cannot drift apart.

The TLS run: SuperLink (TLS, SuperNode auth, --isolation process, database on disk), the
supernode-register one-shot, a ServerApp SuperExec, supernode-1..3 with their ClientApp SuperExecs
(supernode-3 reads its own local data via node_config ``data-dir``) and supernode-4 (the
``more-nodes`` profile) with a missing ``data-dir``; ``flwr run . fedfuse`` submits a 2-round digits
run through a connection made from deploy/flwr-config.toml.

Select with ``-m deployment``; ``FEDFUSE_DEPLOY_KEEP=1`` prints where the logs are. The local-data
unit tests at the end are fast and unmarked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_compose import (
    BIN,
    COMPOSE,
    COMPOSE_INSECURE,
    FLWR_CONFIG,
    GEN_CERTS,
    ROOT,
    flag_value,
    free_port,
    load_compose,
    localize,
)

deployment = pytest.mark.deployment
needs_tools = pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="deploy/gen-certs.sh needs openssl, ssh-keygen"
)

RUN_TIMEOUT = float(os.environ.get("FEDFUSE_DEPLOY_RUN_TIMEOUT", 300))
START_TIMEOUT = 90.0
ROUNDS = 2


def _model_bytes() -> int:
    """Bytes of the model the runs here train (digits, the default MLP): the gateway's FLEET_MODEL_BYTES."""
    from fedfuse.experiment import dataset_for, model_for
    from strategies.registry import validate_config

    cfg = validate_config({"dataset": "digits", "num-clients": 3})
    return sum(t.numel() * t.element_size() for t in model_for(cfg, dataset_for(cfg)).state_dict().values())


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # several ClientApps share 2 cores here: no thread oversubscription
    )
    home.mkdir(parents=True, exist_ok=True)
    return env


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Deployment:
    """Processes of one compose variant on 127.0.0.1; :meth:`stop` ends every one it started."""

    def __init__(self, tmp: Path, files: tuple[Path, ...], tls: bool) -> None:
        self.tmp, self.tls = tmp, tls
        self.services = load_compose(*files)
        self.deploy_dir = tmp / "deploy"
        self.ports = {n: free_port() for n in self.services}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: set[str] = set()  # long-running services (a one-off process may exit)
        self.logs: dict[str, Path] = {}
        self._files: list[Any] = []
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        if tls:
            subprocess.run(["bash", str(GEN_CERTS), str(self.deploy_dir)], check=True, capture_output=True, timeout=120)
        else:
            secrets = self.deploy_dir / "secrets"
            secrets.mkdir(parents=True, exist_ok=True)
            (secrets / "superexec.secret").write_text(os.urandom(16).hex())
        self.cli_home = tmp / "cli-home"
        text = FLWR_CONFIG.read_text().replace("@CA_CERT@", str(self.deploy_dir / "certs" / "ca.crt"))
        text = text.replace('address = "127.0.0.1:9093"', f'address = "127.0.0.1:{self.ports["superlink"]}"')
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(text)
        self.connection = "fedfuse" if tls else "fedfuse-insecure"

    def command(self, name: str, extra_node_config: str = "") -> tuple[list[str], dict[str, str]]:
        env = {"NUM_PARTITIONS": "3", "FLEET_MODEL_BYTES": str(_model_bytes())}  # the gateway caps every reply
        cmd, environment = localize(self.services, name, self.ports, self.deploy_dir, self.tmp / "volumes", env=env)
        if cmd[0] == "register-supernodes.sh":  # installed into the image from deploy/
            cmd[0] = str(ROOT / "deploy" / "register-supernodes.sh")
        if cmd[:2] == ["python", "/usr/local/bin/fleet_gateway.py"]:  # likewise
            cmd[:2] = [sys.executable, str(ROOT / "deploy" / "fleet_gateway.py")]
        if extra_node_config:
            i = cmd.index("--node-config") + 1
            cmd[i] = f"{cmd[i]} {extra_node_config}"
        return cmd, environment

    def start(
        self, name: str, extra_node_config: str = "", cmd: list[str] | None = None, label: str | None = None
    ) -> subprocess.Popen[bytes]:
        environment: dict[str, str] = {}
        if cmd is None:
            cmd, environment = self.command(name, extra_node_config)
        label = label or name
        workdir = self.tmp / "work" / label  # like the container's /app: the ServerApp writes `out` relative to it
        workdir.mkdir(parents=True, exist_ok=True)
        log = self.tmp / "logs" / f"{label}.log"
        fh = open(log, "wb")  # noqa: SIM115 — closed in stop()
        self._files.append(fh)
        env = {**_env(self.tmp / "home" / label), **environment}
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[label], self.logs[label] = proc, log
        if label == name:
            self.started.add(label)
        return proc

    def log(self, label: str) -> str:
        return self.logs[label].read_text(errors="replace")

    def wait_port(self, name: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not _port_open(self.ports[name]):
            proc = self.procs[name]
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, (
                f"{name} did not open port {self.ports[name]}:\n{self.log(name)[-3000:]}"
            )
            time.sleep(0.3)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=ROOT,
            env=_env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def wait_log(self, label: str, text: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``text`` is in ``label``'s log (cheap; every `flwr` call starts a Python process)."""
        deadline = time.monotonic() + timeout
        while text not in self.log(label):
            dead = {k: p.returncode for k, p in self.procs.items() if p.poll() is not None and k in self.started}
            assert not dead, f"exited: {dead}\n" + "\n".join(f"--- {k}\n{self.log(k)[-2000:]}" for k in dead)
            assert time.monotonic() < deadline, f"{label}: no {text!r} after {timeout:.0f} s\n{self.log(label)[-2000:]}"
            time.sleep(0.5)

    def wait_nodes(self, labels: list[str], timeout: float = START_TIMEOUT) -> None:
        """Every SuperNode in ``labels`` activated (its log names its id), then checked with `flwr supernode ls`."""
        for label in labels:
            self.wait_log(label, "SuperNode ID:", timeout)
        res = self.flwr("supernode", "ls", self.connection, "--format", "json", timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        online = sum(n["status"] == "online" for n in json.loads(res.stdout[res.stdout.index("{") :])["nodes"])
        assert online == len(labels), res.stdout

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: SuperExecs' app processes too
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, even if the leader is gone
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=10)
        for fh in self._files:
            fh.close()


def _keep_or_clean(tmp: Path) -> None:
    if os.environ.get("FEDFUSE_DEPLOY_KEEP") == "1":
        print(f"deployment logs kept in {tmp / 'logs'}")


# ---------------------------------------------------------------- TLS deployment with a fedfuse run


@pytest.fixture(scope="class")
def tls_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("deploy-tls")
    dep = Deployment(tmp, (COMPOSE,), tls=True)
    t0 = time.monotonic()
    try:
        # SuperExecs retry until their Runtime API is up, so they start alongside the SuperLink
        dep.start("superlink")
        dep.start("superexec-serverapp")
        for i in (1, 2, 3, 4):
            dep.start(f"superexec-clientapp-{i}")

        # meanwhile: supernode-3 trains on its own files (the digits partition it would get, as train.pt)
        from fedfuse.data.local import save_local_data
        from fedfuse.experiment import client_data

        cfg = {"dataset": "digits", "seed": 0, "partition": "dirichlet", "alpha": 0.3, "classes-per-client": 2}
        local_dir = save_local_data(tmp / "client-3", *client_data(cfg, 2, 3)).parent
        missing_dir = tmp / "no-such-client-data"

        dep.wait_port("superlink")
        dep.start("fleet-gateway")
        dep.wait_port("fleet-gateway")
        cmd, environment = dep.command("supernode-register")  # an unregistered SuperNode exits at once
        reg = subprocess.run(
            cmd, env={**_env(tmp / "home" / "register"), **environment}, capture_output=True, text=True, timeout=180
        )
        assert reg.returncode == 0, reg.stdout + reg.stderr
        for i in (1, 2, 3, 4):
            extra = {3: f'data-dir="{local_dir}"', 4: f'data-dir="{missing_dir}"'}.get(i, "")
            dep.start(f"supernode-{i}", extra_node_config=extra)
        for i in (1, 2, 3, 4):
            dep.wait_log(f"supernode-{i}", "SuperNode ID:")  # activated (`flwr run` below checks the CLI side)
        t_up = time.monotonic() - t0

        out = tmp / "results"  # absolute: the ServerApp resolves `out` against its own working directory
        run_config = f"dataset='digits' num-clients=3 num-rounds={ROUNDS} out='{out}'"
        sub = dep.flwr("run", ".", dep.connection, "--run-config", run_config, "--format", "json", timeout=180)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        run_id = json.loads(sub.stdout[sub.stdout.index("{") :])["run-id"]

        # the SuperLink logs "Finished task … of run <id>" when the ServerApp ends (success or not); a
        # `flwr ls` every 30 s covers a ServerApp that dies without reporting
        deadline, status, last_ls = time.monotonic() + RUN_TIMEOUT, "?", time.monotonic()
        while time.monotonic() < deadline:
            done = re.search(rf"Finished task \d+ of run {run_id}\b", dep.log("superlink")) is not None
            if done or time.monotonic() - last_ls > 30:
                last_ls = time.monotonic()
                res = dep.flwr("ls", dep.connection, "--run-id", str(run_id), "--format", "json", timeout=60)
                if res.returncode == 0:
                    status = json.loads(res.stdout[res.stdout.index("{") :])["runs"][0]["status"]
                    if status.startswith("finished"):
                        break
            time.sleep(1.0)
        log = dep.flwr("log", str(run_id), dep.connection, "--show", timeout=60).stdout
        alive = {k: p.poll() is None for k, p in dep.procs.items()}
        yield {
            "deployment": dep,
            "status": status,
            "out": out,
            "log": log,
            "alive": alive,
            "missing_dir": missing_dir,
            "startup_s": t_up,
            "total_s": time.monotonic() - t0,
        }
    finally:
        dep.stop()
        _keep_or_clean(tmp)


def _exits_nonzero(proc: subprocess.Popen[bytes], within: float) -> int:
    try:
        rc = proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process still running after {within:.0f} s: it must give up (bounded retries)")
    assert rc != 0
    return rc


def _bounded(cmd: list[str]) -> list[str]:
    cmd = list(cmd)
    cmd[cmd.index("--max-retries") + 1] = "2"
    cmd[cmd.index("--max-wait-time") + 1] = "10"
    return cmd


@deployment
@needs_tools
class TestTLSDeployment:
    """One TLS deployment (class-scoped: stopped before the insecure test starts its own)."""

    def test_tls_run_completes_with_results(self, tls_run: dict[str, Any]) -> None:
        assert tls_run["status"] == "finished:completed", f"{tls_run['status']}\n{tls_run['log'][-4000:]}"
        out: Path = tls_run["out"]
        for name in ("metrics.json", "metrics.csv", "model.pt", "accuracy.png"):
            assert (out / name).is_file(), f"{name} missing in {out}"
        rows = json.loads((out / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
        assert rows[-1]["central_accuracy"] > rows[0]["central_accuracy"] + 0.1
        # three good clients (supernode-3 on its local train.pt) reply in every round
        assert all(r["replies"] == 3 for r in rows[1:]), rows
        print(f"deployment up in {tls_run['startup_s']:.1f} s, run done after {tls_run['total_s']:.1f} s")

    def test_missing_data_dir_is_an_error_reply_and_node_survives(self, tls_run: dict[str, Any]) -> None:
        rows = json.loads((tls_run["out"] / "metrics.json").read_text())["rounds"]
        assert all(r["failures"] == 1 for r in rows[1:]), rows
        log = tls_run["log"]
        assert "DataUnavailableError" in log and str(tls_run["missing_dir"]) in log, log[-4000:]
        assert all(tls_run["alive"].values()), tls_run["alive"]  # supernode-4 too, after two failing rounds

    def test_supernode_wrong_address_exits(self, tls_run: dict[str, Any]) -> None:
        dep: Deployment = tls_run["deployment"]
        cmd, _ = dep.command("supernode-1")
        cmd = _bounded(cmd)
        cmd[cmd.index("--superlink") + 1] = f"127.0.0.1:{free_port()}"  # nobody listens there
        cmd[cmd.index("--port") + 1] = str(free_port())
        t0 = time.monotonic()
        _exits_nonzero(dep.start("supernode-1", cmd=cmd, label="bad-address"), within=60)
        assert "could not establish a connection" in dep.log("bad-address"), dep.log("bad-address")[-2000:]
        print(f"wrong address: gave up after {time.monotonic() - t0:.1f} s")

    def test_supernode_wrong_ca_exits(self, tls_run: dict[str, Any], tmp_path: Path) -> None:
        dep: Deployment = tls_run["deployment"]
        subprocess.run(
            ["bash", str(GEN_CERTS), str(tmp_path)], check=True, capture_output=True, timeout=120,
            env={**os.environ, "NUM_SUPERNODES": "1"},
        )  # fmt: skip
        cmd, _ = dep.command("supernode-1")
        cmd = _bounded(cmd)
        cmd[cmd.index("--root-certificates") + 1] = str(tmp_path / "certs" / "ca.crt")  # a CA that signed nothing here
        cmd[cmd.index("--port") + 1] = str(free_port())
        t0 = time.monotonic()
        _exits_nonzero(dep.start("supernode-1", cmd=cmd, label="bad-ca"), within=60)
        assert "CERTIFICATE_VERIFY_FAILED" in dep.log("bad-ca"), dep.log("bad-ca")[-2000:]
        print(f"wrong CA: gave up after {time.monotonic() - t0:.1f} s")

    def test_unregistered_supernode_is_rejected(self, tls_run: dict[str, Any], tmp_path: Path) -> None:
        dep: Deployment = tls_run["deployment"]
        key = tmp_path / "stranger"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)
        cmd, _ = dep.command("supernode-1")
        cmd = _bounded(cmd)
        cmd[cmd.index("--auth-supernode-private-key") + 1] = str(key)
        cmd[cmd.index("--port") + 1] = str(free_port())
        _exits_nonzero(dep.start("supernode-1", cmd=cmd, label="unregistered"), within=60)
        assert "Failed to activate SuperNode" in dep.log("unregistered"), dep.log("unregistered")[-2000:]

    def test_ca_only_client_cannot_use_the_fleet_port(self, tls_run: dict[str, Any], tmp_path: Path) -> None:
        """Through the Fleet gateway (the port other hosts reach) a client with ca.crt can neither submit
        a run nor register a SuperNode key; the same commands on the SuperLink's own port (the operator's)
        are served."""
        dep: Deployment = tls_run["deployment"]
        key = tmp_path / "intruder"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)
        home = tmp_path / "outsider-home"
        home.mkdir()
        ca = dep.deploy_dir / "certs" / "ca.crt"
        address = f"127.0.0.1:{dep.ports['fleet-gateway']}"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "outside"\n\n[superlink.outside]\naddress = "{address}"\n'
            f'root-certificates = "{ca}"\n'
        )
        env = _env(home)
        flwr = str(BIN / "flwr")
        opts = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        reg = subprocess.run([flwr, "supernode", "register", f"{key}.pub", "outside"], **opts)  # type: ignore[call-overload]
        run = subprocess.run([flwr, "run", ".", "outside", "--run-config", "num-rounds=1"], **opts)  # type: ignore[call-overload]
        ls = subprocess.run([flwr, "ls", "outside"], **opts)  # type: ignore[call-overload]
        for res in (reg, run, ls):
            assert res.returncode != 0, res.stdout + res.stderr
        assert "refused" in dep.log("fleet-gateway") and "/v1/control/" in dep.log("fleet-gateway")
        nodes = dep.flwr("supernode", "ls", dep.connection, "--format", "json", timeout=60)
        assert nodes.returncode == 0, nodes.stdout + nodes.stderr
        # the five keys of the operator's one-shot, not the intruder's
        assert len(json.loads(nodes.stdout[nodes.stdout.index("{") :])["nodes"]) == 5, nodes.stdout


# ---------------------------------------------------------------- insecure override


@deployment
@needs_tools
def test_insecure_override_connects(tmp_path: Path) -> None:
    """docker-compose.insecure.yml: the same processes connect in plain text (local testing only)."""
    dep = Deployment(tmp_path, (COMPOSE, COMPOSE_INSECURE), tls=False)
    try:
        cmd, _ = dep.command("superlink")
        assert "--insecure" in cmd and flag_value(cmd, "--ssl-certfile") is None
        # SuperExecs first: they retry until their API is up, then log "Connection successful after …",
        # which a wrong scheme (TLS vs plain) would never reach
        dep.start("superexec-serverapp")
        dep.start("superexec-clientapp-1")
        dep.wait_log("superexec-serverapp", "Connection attempt failed")
        dep.start("superlink")
        dep.wait_port("superlink")
        dep.start("fleet-gateway")
        dep.wait_port("fleet-gateway")
        dep.start("supernode-1")
        dep.wait_nodes(["supernode-1"])
        dep.wait_log("superexec-serverapp", "Connection successful")
        dep.wait_log("superexec-clientapp-1", "Connection successful")
        assert all(p.poll() is None for p in dep.procs.values())
    finally:
        dep.stop()


# ---------------------------------------------------------------- local data (node_config data-dir), no processes


def _context(node_config: dict[str, Any]) -> Any:
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


DIGITS_CFG = {
    "dataset": "digits",
    "data-root": "",
    "seed": 0,
    "partition": "dirichlet",
    "alpha": 0.3,
    "classes-per-client": 2,
}


def test_local_data_round_trip_pt_and_npz(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from fedfuse.data.local import load_local_data, save_local_data

    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 10
    save_local_data(tmp_path / "pt", x, y)
    lx, ly = load_local_data(tmp_path / "pt", (1, 8, 8), 10)
    assert torch.equal(lx, x) and torch.equal(ly, y) and ly.dtype == torch.int64
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "train.npz", x=x.reshape(20, -1).numpy().astype(np.float64), y=y.numpy())
    lx, ly = load_local_data(tmp_path / "npz", (1, 8, 8), 10)  # flat rows are reshaped, dtypes normalised
    assert lx.shape == (20, 1, 8, 8) and lx.dtype == torch.float32 and torch.equal(ly, y)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "directory not found"),
        (lambda d: d.mkdir(), "no train.pt or train.npz"),
        (lambda d: (d.mkdir(), (d / "train.pt").write_bytes(b"not a tensor file")), "cannot be read"),
        (lambda d: _save(d, {"x": [[0.0] * 64] * 3}), "missing key(s) ['y']"),
        (lambda d: _save(d, {"x": [[0.0] * 64] * 3, "y": [1, 2]}), "one label per sample"),
        (lambda d: _save(d, {"x": [[0.0] * 64] * 3, "y": [1, 2, 10]}), "labels span [1, 10]"),
        (lambda d: _save(d, {"x": [[0.0] * 10] * 3, "y": [1, 2, 3]}), "needs (1, 8, 8)"),
        (lambda d: _save(d, {"x": [[0.0] * 64] * 3, "y": [0.5, 1.0, 2.0]}), "integer class labels"),
        (lambda d: _save(d, {"x": [[float("nan")] * 64] * 3, "y": [0, 1, 2]}), "NaN"),
    ],
)
def test_local_data_errors_name_the_path(tmp_path: Path, make: Any, message: str) -> None:
    from fedfuse.data.local import load_local_data
    from fedfuse.errors import DataUnavailableError

    d = tmp_path / "client"
    make(d)
    with pytest.raises(DataUnavailableError) as err:
        load_local_data(d, (1, 8, 8), 10)
    assert str(d) in str(err.value) and message in str(err.value), str(err.value)


def _save(d: Path, arrays: dict[str, Any]) -> None:
    import torch

    d.mkdir()
    torch.save({k: torch.tensor(v) for k, v in arrays.items()}, d / "train.pt")


def test_client_reads_data_dir_else_its_partition(tmp_path: Path) -> None:
    import torch

    from clients.client_app import _local_xy
    from fedfuse.data.local import save_local_data
    from fedfuse.errors import DataUnavailableError
    from fedfuse.experiment import client_data

    px, py = client_data(DIGITS_CFG, 1, 3)
    x, y = _local_xy(DIGITS_CFG, _context({"partition-id": 1, "num-partitions": 3}))
    assert torch.equal(x, px) and torch.equal(y, py)
    save_local_data(tmp_path / "mine", px[:7], py[:7])
    ctx = _context({"partition-id": 1, "num-partitions": 3, "data-dir": str(tmp_path / "mine")})
    x, y = _local_xy(DIGITS_CFG, ctx)
    assert torch.equal(x, px[:7]) and torch.equal(y, py[:7])
    ctx = _context({"partition-id": 1, "num-partitions": 3, "data-dir": str(tmp_path / "absent")})
    with pytest.raises(DataUnavailableError, match=str(tmp_path / "absent")):
        _local_xy(DIGITS_CFG, ctx)
