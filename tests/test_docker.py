"""The project's docker-compose.yml in a real Docker engine: built, brought up, run, faulted, torn down.

What runs (marker ``docker``; about 10 minutes on 2 cores with warm image caches):

1. ``deploy/install-docker.sh`` installs and starts the engine if none answers (needs root and the
   Debian packages); if the engine cannot start the module is SKIPPED with the reason, never passed.
   A daemon this test started is stopped at the end, one that was running is left alone.
2. ``tests/docker/build-standin-base.sh`` builds the TEST FIXTURE stand-in for ``flwr/base`` (Docker
   Hub is unreachable here), tagged with the Dockerfile's FROM name; then the project's Dockerfile is
   built unchanged (``TORCH_INDEX_URL`` pointed at the host's Python index, the CPU wheel comes from the
   fixture's pip find-links).
3. ``docker compose up`` on the shipped docker-compose.yml (TLS, SuperNode auth, Fleet gateway, Control
   API on 127.0.0.1) plus a test override that gives supernode-1..3 each a host directory of its own
   data (``data-dir``), as docs/deployment.md shows. Certificates from ``deploy/gen-certs.sh`` with
   ``CONTAINER_UID=49999`` (0600 files, 0700 directories, owned by the containers' user).
4. ``flwr run`` from the host (FedWB, 3 SuperNodes, 3 rounds): accuracy rises, results in the
   ``fedfuse-results`` volume under ``/app/<out>`` (copied out with ``docker cp``). supernode-3 is
   ``docker kill``-ed during round 2: the run completes and the missing replies are counted.
5. ``docker restart`` of the SuperLink: runs and registered nodes survive (named volume), a second run is
   accepted and completes.
6. Refusals: an unregistered SuperNode key, a SuperNode and a ``flwr`` client with another CA, and a
   client holding only ca.crt on another network: the SuperLink's port is closed to it and the
   gateway refuses ``flwr supernode register`` / ``flwr ls``; ``flwr run`` through the gateway fails.

Everything the test creates (containers, networks, volumes) is removed in finalizers, also on failure;
the images stay as build cache. ``FEDFUSE_DOCKER_KEEP=1`` skips the teardown for debugging.
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
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_compose import BIN, COMPOSE, GEN_CERTS, ROOT, command_of, load_compose

pytestmark = pytest.mark.docker

IMAGE = "fedfuse/flower:0.1.0"
CONTAINER_UID = "49999"  # the base image's `app` user (official flwr/base and the stand-in)
ROUNDS = 3
RUN_TIMEOUT = float(os.environ.get("FEDFUSE_DOCKER_RUN_TIMEOUT", 900))
TIMES: dict[str, float] = {}
_NO_ENGINE: list[str] = []  # why the engine could not start, once known


def _sh(cmd: list[str], timeout: float = 600, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _skip(reason: str) -> None:
    """Skip (with the reason) where no engine can run; fail instead where CI says one must (FEDFUSE_REQUIRE_DOCKER=1:
    `.ci/run` sets it as root with apt-get, where the fixtures can install everything they need)."""
    if os.environ.get("FEDFUSE_REQUIRE_DOCKER") == "1":
        pytest.fail(f"FEDFUSE_REQUIRE_DOCKER=1 but the docker tests cannot run: {reason}", pytrace=False)
    print(f"\nSKIPPED test_docker: {reason}", file=sys.stderr)
    pytest.skip(reason)


# ---------------------------------------------------------------- engine and images


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    """A Docker engine that answers; started (and later stopped) here if none was running."""
    if _NO_ENGINE:  # a skip is not cached with the fixture: do not try (and wait) again for every test
        _skip(_NO_ENGINE[0])
    if not shutil.which("docker") and os.geteuid() != 0:
        _NO_ENGINE.append("no docker CLI and not root: cannot install a Docker engine")
        _skip(_NO_ENGINE[0])
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            ["bash", str(ROOT / "deploy" / "install-docker.sh")], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        _NO_ENGINE.append("deploy/install-docker.sh did not finish in 600 s")
        _skip(_NO_ENGINE[0])
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        _NO_ENGINE.append(f"the Docker engine cannot start here: {lines[-1] if lines else f'exit {res.returncode}'}")
        _skip(_NO_ENGINE[0])
    m = re.search(r"started-dockerd (\d+)", res.stdout)
    TIMES["engine"] = time.monotonic() - t0
    yield
    if m:  # stop exactly the daemon this test started
        pid = int(m.group(1))
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(60):
                os.kill(pid, 0)
                time.sleep(0.5)
        except ProcessLookupError:
            pass


def _torch_index_url() -> str:
    """The Python index the host's pip uses (stands in for download.pytorch.org/whl/cpu offline)."""
    if url := os.environ.get("FEDFUSE_TORCH_INDEX_URL"):
        return url
    res = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
    )
    url = res.stdout.strip()
    return url if res.returncode == 0 and url.startswith("http") else "https://pypi.org/simple"


@pytest.fixture(scope="module")
def images(engine: None) -> None:
    t0 = time.monotonic()
    env = {**os.environ, "PYTHON": sys.executable}  # its pip config names the CA bundle and find-links
    res = _sh(["bash", str(ROOT / "tests" / "docker" / "build-standin-base.sh")], timeout=1200, env=env, check=False)
    if res.returncode == 3:  # a prerequisite (debootstrap, the Debian mirror) is missing and cannot be installed
        lines = res.stderr.strip().splitlines()
        _NO_ENGINE.append(f"the stand-in base image cannot be built here: {lines[-1] if lines else 'exit 3'}")
        _skip(_NO_ENGINE[0])
    assert res.returncode == 0, f"build-standin-base.sh -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    TIMES["base_image"] = time.monotonic() - t0
    t0 = time.monotonic()
    # the stand-in has only the offline CPU torch wheel: drop the lock's torch pins for it (users keep them)
    args = ["--build-arg", f"TORCH_INDEX_URL={_torch_index_url()}", "--build-arg", "UNLOCK=torch torchvision"]
    _sh(["docker", "build", "-q", "-t", IMAGE, *args, str(ROOT)], 1800)
    TIMES["project_image"] = time.monotonic() - t0
    for tag in (IMAGE, _base_tag()):
        size = _sh(["docker", "image", "inspect", "-f", "{{.Size}}", tag]).stdout.strip()
        TIMES[f"size_mb[{tag}]"] = int(size) / 1e6


def _base_tag() -> str:
    m = re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert m
    return m.group(1)


# ---------------------------------------------------------------- the federation


class Federation:
    """One compose project in a temporary project directory (certs, client data, override file)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.project = f"fedfusetest{uuid.uuid4().hex[:8]}"
        self.extra_containers: list[str] = []
        self.extra_networks: list[str] = []
        self.override = tmp / "docker-compose.test.yml"
        self.override.write_text("services: {}\n")
        self.cli_home = tmp / "flwr-home"
        self.ca = tmp / "deploy" / "certs" / "ca.crt"

    def prepare(self) -> None:
        """A network for outsiders, certificates (its gateway address in the SANs), the flwr connection."""
        tmp = self.tmp
        # "another network": where the outsider of test_ca_only_client... runs; its gateway is this host
        self.outside = f"{self.project}-outside"
        _sh(["docker", "network", "create", self.outside])
        self.extra_networks.append(self.outside)
        res = _sh(["docker", "network", "inspect", self.outside, "-f", "{{(index .IPAM.Config 0).Gateway}}"])
        self.host_ip = res.stdout.strip()
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", self.host_ip), self.host_ip
        (tmp / "deploy").mkdir()
        env = {**os.environ, "CONTAINER_UID": CONTAINER_UID, "SUPERLINK_SANS": f"IP:{self.host_ip}"}
        _sh(["bash", str(GEN_CERTS), str(tmp / "deploy")], env=env, timeout=120)
        self._write_cli_config(self.cli_home, "fedfuse", "127.0.0.1:9093", self.ca)

    @staticmethod
    def _write_cli_config(home: Path, name: str, address: str, ca: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
            f'root-certificates = "{ca}"\n'
        )

    def write_client_data(self) -> None:
        """supernode-I trains on the digits partition it would have had, from its own host directory."""
        from fedfuse.data.local import save_local_data
        from fedfuse.experiment import client_data

        cfg = {"dataset": "digits", "seed": 0, "partition": "dirichlet", "alpha": 0.3, "classes-per-client": 2}
        services = load_compose(COMPOSE)
        override: dict[str, Any] = {"services": {}}
        for i in (1, 2, 3):
            d = self.tmp / "data" / f"client-{i}"
            save_local_data(d, *client_data(cfg, i - 1, 3))
            os.chmod(d, 0o755)
            for f in d.iterdir():
                os.chmod(f, 0o644)
            cmd = command_of(services[f"supernode-{i}"], {"NUM_PARTITIONS": "3"})
            k = cmd.index("--node-config") + 1
            cmd[k] = f'data-dir="/data" {cmd[k]}'
            override["services"][f"supernode-{i}"] = {"command": cmd}
            # with --isolation process the ClientApp runs in the SuperExec's container: the data goes there
            vols = [*services[f"superexec-clientapp-{i}"]["volumes"], f"{d}:/data:ro"]
            override["services"][f"superexec-clientapp-{i}"] = {"volumes": vols}
        self.override.write_text(yaml.safe_dump(override, sort_keys=False))

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        base = ["docker", "compose", "-p", self.project, "--project-directory", str(self.tmp)]
        files = ["-f", str(COMPOSE), "-f", str(self.override)]
        return _sh([*base, *files, *args], timeout=timeout, check=check)

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def logs(self, service: str, tail: int = 60) -> str:
        res = self.compose("logs", "--no-color", "--tail", str(tail), service, check=False)
        return res.stdout + res.stderr

    def flwr(self, *args: str, home: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "FLWR_HOME": str(home or self.cli_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        return _sh([str(BIN / "flwr"), *args], cwd=ROOT, env=env, timeout=timeout, check=False)

    def json_of(self, res: subprocess.CompletedProcess[str]) -> Any:
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout[res.stdout.index("{") :])

    def nodes(self) -> list[dict[str, Any]]:
        return self.json_of(self.flwr("supernode", "ls", "fedfuse", "--format", "json"))["nodes"]

    def wait_online(self, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            res = self.flwr("supernode", "ls", "fedfuse", "--format", "json")
            if res.returncode == 0:
                online = [x for x in self.json_of(res)["nodes"] if x["status"] == "online"]
                if len(online) >= n:
                    return
            assert time.monotonic() < deadline, f"fewer than {n} SuperNodes online:\n{res.stdout}\n{res.stderr}"
            time.sleep(3)

    def submit(self, run_config: str) -> int:
        res = self.flwr("run", ".", "fedfuse", "--run-config", run_config, "--format", "json", timeout=300)
        return int(self.json_of(res)["run-id"])

    def status(self, run_id: int) -> str:
        res = self.flwr("ls", "fedfuse", "--run-id", str(run_id), "--format", "json")
        return str(self.json_of(res)["runs"][0]["status"]) if res.returncode == 0 else "?"

    def read_results(self, out: str, dest: Path) -> Path:
        """``docker cp`` of /app/<out> from the ServerApp container (the fedfuse-results volume)."""
        _sh(["docker", "cp", f"{self.container('superexec-serverapp')}:/app/{out}", str(dest)])
        return dest

    def metrics_rows(self, out: str) -> list[dict[str, Any]]:
        res = _sh(
            ["docker", "exec", self.container("superexec-serverapp"), "cat", f"/app/{out}/metrics.json"], check=False
        )
        return json.loads(res.stdout)["rounds"] if res.returncode == 0 and res.stdout.strip() else []

    def wait_finished(self, run_id: int, timeout: float = RUN_TIMEOUT) -> str:
        deadline, status = time.monotonic() + timeout, "?"
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(5)
        return status

    def teardown(self) -> None:
        for c in self.extra_containers:
            subprocess.run(["docker", "rm", "-f", c], capture_output=True, timeout=120)
        self.compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout=300, check=False)
        for n in self.extra_networks:
            subprocess.run(["docker", "network", "rm", n], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def federation(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Compose up, run 1 with a SuperNode killed in round 2; the tests below inspect what it recorded."""
    fed = Federation(tmp_path_factory.mktemp("compose"))
    state: dict[str, Any] = {"fed": fed}
    try:
        fed.prepare()
        fed.write_client_data()
        busy = [p for p in (9092, 9093) if not _port_free(p)]
        assert not busy, f"host ports {busy} are in use: the compose file publishes 9092 and 9093"
        t0 = time.monotonic()
        fed.compose("up", "-d", "--no-build", timeout=600)
        fed.wait_online(3)
        TIMES["compose_up"] = time.monotonic() - t0

        t0 = time.monotonic()
        out = "runs/docker-run-1"
        run_config = (
            f"strategy='wb' dataset='digits' num-clients=3 num-rounds={ROUNDS} local-epochs=10 "
            f"round-timeout=120.0 seed=0 out='{out}'"
        )
        run_id = fed.submit(run_config)
        # kill supernode-3 once round 1's row is written, i.e. while round 2 trains
        deadline = time.monotonic() + RUN_TIMEOUT
        while not any(r["round"] >= 1 for r in fed.metrics_rows(out)):
            assert time.monotonic() < deadline, fed.logs("superexec-serverapp")
            assert not fed.status(run_id).startswith("finished"), fed.flwr(
                "log", str(run_id), "fedfuse", "--show"
            ).stdout
            time.sleep(0.5)
        victim = fed.container("supernode-3")
        _sh(["docker", "kill", victim])
        state["killed_after_rounds"] = max(r["round"] for r in fed.metrics_rows(out))
        state["status"] = fed.wait_finished(run_id)
        TIMES["run_1"] = time.monotonic() - t0
        state["run_id"], state["out"] = run_id, out
        state["log"] = fed.flwr("log", str(run_id), "fedfuse", "--show").stdout
        state["results"] = fed.read_results(out, fed.tmp / "results-1")
        state["victim_state"] = _sh(["docker", "inspect", "-f", "{{.State.Status}}", victim]).stdout.strip()
        yield state
    finally:
        if os.environ.get("FEDFUSE_DOCKER_KEEP") != "1":
            fed.teardown()
        print("\ndocker timings/sizes: " + json.dumps({k: round(v, 1) for k, v in TIMES.items()}), file=sys.stderr)


# ---------------------------------------------------------------- tests


def test_run_completes_accuracy_rises_results_where_docs_say(federation: dict[str, Any]) -> None:
    assert federation["status"] == "finished:completed", f"{federation['status']}\n{federation['log'][-4000:]}"
    results: Path = federation["results"]
    for name in ("metrics.json", "metrics.csv", "model.pt", "accuracy.png"):
        assert (results / name).is_file(), f"{name} not in /app/{federation['out']} ({sorted(results.iterdir())})"
    rows = json.loads((results / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    acc = [r["central_accuracy"] for r in rows]
    assert acc[-1] > acc[0] + 0.1, acc
    assert rows[1]["replies"] == 3 and rows[1]["failures"] == 0, rows[1]  # all three data-dir clients
    print(f"FedWB accuracy per round: {[round(a, 3) for a in acc]}")


def test_killed_supernode_is_counted_and_the_run_goes_on(federation: dict[str, Any]) -> None:
    rows = json.loads((federation["results"] / "metrics.json").read_text())["rounds"]
    assert federation["killed_after_rounds"] == 1, "the kill must land while round 2 trains"
    r2 = rows[2]
    # round 2 lost supernode-3's reply: counted as an error reply (failures) or a missing one (timeouts)
    assert r2["replies"] == 2 and r2["failures"] + r2["timeouts"] == 1, r2
    assert all(r["replies"] == 2 for r in rows[3:]), rows[3:]  # later rounds go on with the two left
    print(
        f"kill: round 2 replies={r2['replies']} failures={r2['failures']} timeouts={r2['timeouts']} "
        f"(round wall {r2['wall_time'] - rows[1]['wall_time']:.0f} s); killed container afterwards: "
        f"{federation['victim_state']}"
    )


def test_superlink_restart_keeps_state_and_accepts_a_second_run(federation: dict[str, Any]) -> None:
    fed: Federation = federation["fed"]
    nodes_before = {n["node-id"] for n in fed.nodes()}
    t0 = time.monotonic()
    fed.compose("restart", "superlink", timeout=300)
    deadline = time.monotonic() + 180
    while fed.flwr("ls", "fedfuse", "--format", "json").returncode != 0:
        assert time.monotonic() < deadline, fed.logs("superlink")
        time.sleep(2)
    runs = fed.json_of(fed.flwr("ls", "fedfuse", "--format", "json"))["runs"]
    assert any(int(r["run-id"]) == federation["run_id"] for r in runs), runs  # the state DB survived
    assert {n["node-id"] for n in fed.nodes()} == nodes_before  # registrations too
    fed.wait_online(2)
    out = "runs/docker-run-2"
    run_id = fed.submit(f"strategy='wb' dataset='digits' num-clients=2 num-rounds=1 round-timeout=300.0 out='{out}'")
    status = fed.wait_finished(run_id)
    TIMES["restart_and_run_2"] = time.monotonic() - t0
    log = fed.flwr("log", str(run_id), "fedfuse", "--show").stdout
    assert status == "finished:completed", f"{status}\n{log[-3000:]}"
    assert [r["round"] for r in fed.metrics_rows(out)] == [0, 1]


def _run_in_image(
    fed: Federation, network: str, *cmd: str, mounts: Sequence[str] = (), timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    name = f"{fed.project}-probe-{uuid.uuid4().hex[:6]}"
    fed.extra_containers.append(name)
    vols = [a for m in [f"{fed.tmp}/probe:/probe:ro", *mounts] for a in ("-v", m)]
    return _sh(
        ["docker", "run", "--rm", "--name", name, "--network", network, *vols, IMAGE, *cmd], timeout, check=False
    )


def _probe_files(fed: Federation, ca_from: Path) -> None:
    """/probe in a container: a fresh SuperNode key and a CA certificate, readable by uid 49999."""
    probe = fed.tmp / "probe"
    if probe.exists():
        shutil.rmtree(probe)
    probe.mkdir(mode=0o755)
    _sh(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(probe / "key")])
    shutil.copy(ca_from, probe / "ca.crt")
    for f in probe.iterdir():
        os.chmod(f, 0o644)


def _supernode_probe(fed: Federation, ca: str, key: str) -> tuple[list[str], list[str]]:
    """supernode-1's shipped command and mounts, with another CA / key and bounded retries."""
    svc = load_compose(COMPOSE)["supernode-1"]
    cmd = command_of(svc, {"NUM_PARTITIONS": "3"})
    cmd[cmd.index("--root-certificates") + 1] = ca
    cmd[cmd.index("--auth-supernode-private-key") + 1] = key
    cmd[cmd.index("--max-retries") + 1] = "2"
    cmd[cmd.index("--max-wait-time") + 1] = "15"
    mounts = [f"{fed.tmp}/{v[2:]}" if v.startswith("./") else v for v in svc["volumes"]]
    return cmd, mounts


def test_unregistered_supernode_key_is_refused(federation: dict[str, Any]) -> None:
    fed: Federation = federation["fed"]
    _probe_files(fed, fed.ca)
    network = f"{fed.project}_default"
    cmd, mounts = _supernode_probe(fed, "/probe/ca.crt", "/probe/key")
    res = _run_in_image(fed, network, *cmd, mounts=mounts)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Failed to activate SuperNode" in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]


def test_wrong_ca_is_refused_by_supernode_and_client(federation: dict[str, Any], tmp_path: Path) -> None:
    fed: Federation = federation["fed"]
    other = tmp_path / "other-ca"
    _sh(["bash", str(GEN_CERTS), str(other)], env={**os.environ, "NUM_SUPERNODES": "0"}, timeout=120)
    _probe_files(fed, other / "certs" / "ca.crt")
    shutil.copy(fed.tmp / "deploy" / "keys" / "supernode-1", fed.tmp / "probe" / "key")  # a registered key
    os.chmod(fed.tmp / "probe" / "key", 0o644)
    network = f"{fed.project}_default"
    cmd, mounts = _supernode_probe(fed, "/probe/ca.crt", "/probe/key")
    res = _run_in_image(fed, network, *cmd, mounts=mounts)
    assert res.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in res.stdout + res.stderr, (res.stdout + res.stderr)[
        -3000:
    ]
    home = tmp_path / "wrong-ca-home"
    fed._write_cli_config(home, "fedfuse", "127.0.0.1:9093", other / "certs" / "ca.crt")
    ls = fed.flwr("ls", "fedfuse", home=home)
    # flwr hides the TLS error behind "Connection to the SuperLink is unavailable"; the same call with
    # the right CA (the operator's connection) succeeds, so the CA is what differs
    assert ls.returncode != 0 and "Connection to the SuperLink" in ls.stdout + ls.stderr, ls.stdout + ls.stderr
    assert fed.flwr("ls", "fedfuse").returncode == 0


def test_ca_only_client_can_neither_register_nor_submit(federation: dict[str, Any], tmp_path: Path) -> None:
    """A client on another network with ca.crt: the Control port is closed to it, the gateway refuses."""
    fed: Federation = federation["fed"]
    _probe_files(fed, fed.ca)
    outside, ip = fed.outside, fed.host_ip
    # 1. the SuperLink's own port is published on 127.0.0.1 only: closed on the host's other addresses
    probe = (
        "import socket,sys; s=socket.socket(); s.settimeout(5); sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"
    )
    closed = _run_in_image(fed, outside, "python", "-c", probe, ip, "9093")
    opened = _run_in_image(fed, outside, "python", "-c", probe, ip, "9092")
    assert closed.returncode != 0, "Control API port reachable from another network"
    assert opened.returncode == 0, f"Fleet gateway not reachable at {ip}:9092 ({opened.returncode})"
    # 2. through the gateway, the Control API calls fail: register a key, list runs
    script = (
        'set -u; mkdir -p /tmp/h; printf \'[superlink]\\ndefault = "x"\\n\\n[superlink.x]\\n'
        f'address = "{ip}:9092"\\nroot-certificates = "/probe/ca.crt"\\n'
        "' > /tmp/h/config.toml; export FLWR_HOME=/tmp/h; "
        "flwr supernode register /probe/key.pub x; echo REGISTER_RC=$?; flwr ls x; echo LS_RC=$?"
    )
    res = _run_in_image(fed, outside, "bash", "-c", script)
    text = res.stdout + res.stderr
    assert "REGISTER_RC=0" not in text and "REGISTER_RC=" in text, text[-3000:]
    assert "LS_RC=0" not in text and "LS_RC=" in text, text[-3000:]
    # 3. `flwr run` of an app through the gateway (from the host, the same port): refused
    home = tmp_path / "outsider-home"
    fed._write_cli_config(home, "fedfuse", "127.0.0.1:9092", fed.ca)
    run = fed.flwr("run", ".", "fedfuse", "--run-config", "num-rounds=1", home=home)
    assert run.returncode != 0, run.stdout + run.stderr
    gw = fed.logs("fleet-gateway", tail=200)
    assert re.search(r"refused \(40[34]\) POST b?'?/v1/control/", gw), gw[-3000:]  # the gateway's refusal line
    assert len(fed.nodes()) == 5  # only the operator's five registrations


def test_engine_unavailable_is_a_skip_with_reason(tmp_path: Path) -> None:
    """Without root and without a running engine, install-docker.sh exits 1 with one line saying why."""
    if os.geteuid() == 0:
        nobody = shutil.which("setpriv")
        if not nobody:
            pytest.skip("needs setpriv to drop root")
        cmd = [
            nobody,
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "bash",
            str(ROOT / "deploy" / "install-docker.sh"),
        ]
    else:
        cmd = ["bash", str(ROOT / "deploy" / "install-docker.sh")]
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "not root" in res.stderr and "cannot install or start" in res.stderr, res.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
