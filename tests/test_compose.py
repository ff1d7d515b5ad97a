"""docker-compose.yml against the installed Flower: flags, addresses, mounted paths, base image tag.

No Docker engine is needed: the compose files are parsed with pyyaml and every Flower command is
checked against the ``--help`` of the installed binaries. The helpers here (compose loading,
interpolation, localisation to 127.0.0.1) are shared with ``tests/test_deployment.py``, which starts
the same commands as real processes.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_INSECURE = ROOT / "docker-compose.insecure.yml"
DOCKERFILE = ROOT / "Dockerfile"
GEN_CERTS = ROOT / "deploy" / "gen-certs.sh"
FLWR_CONFIG = ROOT / "deploy" / "flwr-config.toml"
BIN = Path(sys.executable).parent  # the venv's flower-* entry points

FLOWER_BINARIES = ("flower-superlink", "flower-supernode", "flower-superexec")
# flags whose value is a file the process reads (must be mounted into the container)
FILE_FLAGS = {
    "--ssl-ca-certfile",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--root-certificates",
    "--auth-supernode-private-key",
    "--superexec-auth-secret-file",
}
TLS_FLAGS = {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--root-certificates"}
SECRET_FLAGS = {"--auth-supernode-private-key", "--enable-supernode-auth"}


# ---------------------------------------------------------------- compose loading (shared helpers)


def load_compose(*files: Path) -> dict[str, dict[str, Any]]:
    """Services of the compose files merged like ``docker compose -f a -f b`` (command replaced, maps merged)."""
    services: dict[str, dict[str, Any]] = {}
    for path in files:
        doc = yaml.safe_load(path.read_text())
        for name, svc in (doc.get("services") or {}).items():
            merged = dict(services.get(name, {}))
            for key, value in svc.items():
                if key in ("environment", "depends_on") and isinstance(value, dict):
                    merged[key] = {**(merged.get(key) or {}), **value}
                else:
                    merged[key] = value
            services[name] = merged
    return services


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$VAR``, ``$$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(3)
        value = env.get(name)
        if value is None or (value == "" and ":-" in m.group(0)):
            return m.group(2) if m.group(2) is not None else ""
        return value

    return _VAR.sub(sub, text)


def command_of(svc: Mapping[str, Any], env: Mapping[str, str] | None = None) -> list[str]:
    cmd = svc["command"]
    args = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
    return [interpolate(a, env or {}) for a in args]


def flag_value(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def active(services: Mapping[str, dict[str, Any]], profiles: tuple[str, ...] = ()) -> list[str]:
    """Services ``docker compose up`` starts with the given profiles."""
    return [n for n, s in services.items() if not s.get("profiles") or set(s["profiles"]) & set(profiles)]


def volume_map(svc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's volumes (short syntax)."""
    out = []
    for v in svc.get("volumes") or []:
        parts = v.split(":")
        out.append((parts[0], parts[1]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localize(
    services: Mapping[str, dict[str, Any]],
    name: str,
    ports: Mapping[str, int],
    deploy_dir: Path,
    volumes_dir: Path,
    env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Service ``name``'s command and environment rewritten for 127.0.0.1.

    ``service:port`` → ``127.0.0.1:ports[service]``; ``--host 0.0.0.0`` → 127.0.0.1; ``--port`` → the
    service's free port; container paths → the bind source under ``deploy_dir`` (``./deploy/…``) or a
    directory per named volume under ``volumes_dir``. Everything else is taken from the compose file.
    """
    svc = services[name]
    mounts = []
    for src, target in volume_map(svc):
        if src.startswith("./deploy/"):
            host = deploy_dir / src[len("./deploy/") :]
        elif src.startswith("./"):
            host = ROOT / src[2:]
        else:  # named volume
            host = volumes_dir / src
            host.mkdir(parents=True, exist_ok=True)
        mounts.append((target, host))
    mounts.sort(key=lambda m: -len(m[0]))

    def rewrite(arg: str) -> str:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+):(\d+)", arg)
        if m and m.group(1) in services:
            return f"127.0.0.1:{ports[m.group(1)]}"
        for target, host in mounts:
            if arg == target or arg.startswith(target.rstrip("/") + "/"):
                return str(host) + arg[len(target.rstrip("/")) :]
        return arg

    cmd = command_of(svc, env)
    out = [rewrite(a) for a in cmd]
    if "--host" in out:
        out[out.index("--host") + 1] = "127.0.0.1"
    if "--port" in out:
        out[out.index("--port") + 1] = str(ports[name])
    environment = {k: rewrite(interpolate(str(v), env or {})) for k, v in (svc.get("environment") or {}).items()}
    return out, environment


# ---------------------------------------------------------------- installed binaries


@cache
def help_specs() -> dict[str, dict[str, tuple[bool, tuple[str, ...] | None]]]:
    """Per binary: flag → (takes a value, allowed choices or None), parsed from ``--help``."""
    procs = {
        b: subprocess.Popen([str(BIN / b), "--help"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for b in FLOWER_BINARIES
    }
    specs = {}
    for b, p in procs.items():
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, f"{b} --help failed"
        flags: dict[str, tuple[bool, tuple[str, ...] | None]] = {}
        usage = out.split("\n\n")[0]
        for m in re.finditer(r"\[(--[a-z0-9-]+)(?: ([^\]\s|]+))?", usage):
            flag, meta = m.group(1), m.group(2)
            choices = tuple(meta[1:-1].split(",")) if meta and meta.startswith("{") else None
            flags[flag] = (meta is not None, choices)
        for m in re.finditer(r"^\s+(--[a-z0-9-]+) ([A-Z_]+|\{[^}]+\})", out, re.M):  # required flags
            if m.group(1) not in flags:
                meta = m.group(2)
                flags[m.group(1)] = (True, tuple(meta[1:-1].split(",")) if meta.startswith("{") else None)
        specs[b] = flags
    return specs


def check_command(cmd: list[str]) -> list[str]:
    """Problems of one Flower command line against its binary's ``--help``; [] if it would parse."""
    spec = help_specs()[cmd[0]]
    problems, i = [], 1
    while i < len(cmd):
        flag = cmd[i]
        if not flag.startswith("--"):
            problems.append(f"stray argument {flag!r}")
            i += 1
            continue
        if flag not in spec:
            problems.append(f"{flag} is not a flag of {cmd[0]}")
            i += 1
            continue
        takes_value, choices = spec[flag]
        if takes_value:
            if i + 1 >= len(cmd) or cmd[i + 1].startswith("--"):
                problems.append(f"{flag} needs a value")
            elif choices and cmd[i + 1] not in choices:
                problems.append(f"{flag} {cmd[i + 1]} not in {choices}")
            i += 2
        else:
            i += 1
    return problems


# ---------------------------------------------------------------- tests

VARIANTS = {"tls": (COMPOSE,), "insecure": (COMPOSE, COMPOSE_INSECURE)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict[str, Any]]]:
    return request.param, load_compose(*VARIANTS[request.param])


def flower_services(services: Mapping[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {n: command_of(s) for n, s in services.items() if command_of(s)[0] in FLOWER_BINARIES}


def test_help_parsing_sees_known_flags() -> None:
    spec = help_specs()
    assert spec["flower-superlink"]["--isolation"] == (True, ("subprocess", "process"))
    assert spec["flower-superlink"]["--insecure"] == (False, None)
    assert spec["flower-supernode"]["--node-config"][0] is True
    assert spec["flower-superexec"]["--runtime-api-address"][0] is True
    assert check_command(["flower-supernode", "--no-such-flag"]) == ["--no-such-flag is not a flag of flower-supernode"]
    assert check_command(["flower-superlink", "--isolation", "thread"])  # bad choice is caught


def test_every_flower_flag_is_accepted(variant: tuple[str, dict[str, dict[str, Any]]]) -> None:
    name, services = variant
    problems = {n: p for n, cmd in flower_services(services).items() if (p := check_command(cmd))}
    assert not problems, f"{name}: {problems}"


def test_topology(variant: tuple[str, dict[str, dict[str, Any]]]) -> None:
    """One SuperLink in deployment mode, SuperExecs for both sides, 3 SuperNodes (5 with the profile)."""
    _, services = variant
    cmds = flower_services(services)
    links = [n for n, c in cmds.items() if c[0] == "flower-superlink"]
    assert links == ["superlink"]
    link = cmds["superlink"]
    assert "--simulation" not in link
    assert flag_value(link, "--isolation") == "process"
    assert flag_value(link, "--database").startswith("/")
    for profiles, expected in (((), 3), (("more-nodes",), 5)):
        up = active(services, profiles)
        nodes = [n for n in up if n in cmds and cmds[n][0] == "flower-supernode"]
        assert len(nodes) == expected, (profiles, nodes)
        env = {"NUM_PARTITIONS": str(expected)} if profiles else {}
        configs = [command_of(services[n], env) for n in nodes]
        parsed = [dict(kv.split("=", 1) for kv in flag_value(c, "--node-config").split()) for c in configs]
        assert sorted(int(p["partition-id"]) for p in parsed) == list(range(expected))
        assert {int(p["num-partitions"]) for p in parsed} == {expected}
        for n in nodes:
            assert flag_value(cmds[n], "--isolation") == "process"
            assert int(flag_value(cmds[n], "--max-retries")) > 0 and float(flag_value(cmds[n], "--max-wait-time")) > 0
        # every SuperNode has exactly one SuperExec (ClientApp side) pointing at its Runtime API
        execs = [n for n in up if n in cmds and cmds[n][0] == "flower-superexec"]
        targets = sorted(flag_value(cmds[e], "--runtime-api-address").split(":")[0] for e in execs)
        assert targets == sorted(["superlink", *nodes])  # plus the ServerApp-side SuperExec


def test_addresses_and_ports_are_consistent(variant: tuple[str, dict[str, dict[str, Any]]]) -> None:
    _, services = variant
    cmds = flower_services(services)
    cmds["fleet-gateway"] = command_of(services["fleet-gateway"])
    port_of = {n: flag_value(c, "--port") for n, c in cmds.items() if "--port" in c}
    for n, c in cmds.items():
        if "--port" in c:  # reached from other containers
            assert flag_value(c, "--host") == "0.0.0.0", n
        for flag in ("--superlink", "--runtime-api-address", "--upstream"):
            if flag in c:
                host, port = flag_value(c, flag).rsplit(":", 1)
                assert host in services, f"{n}: {flag} names unknown service {host!r}"
                assert port == port_of[host], f"{n}: {flag} port {port} != {host} --port {port_of[host]}"
    # SuperNodes reach the SuperLink only through the Fleet gateway, which forwards to the SuperLink
    assert flag_value(cmds["fleet-gateway"], "--upstream") == f"superlink:{port_of['superlink']}"
    for n, c in cmds.items():
        if c[0] == "flower-supernode":
            assert flag_value(c, "--superlink") == f"fleet-gateway:{port_of['fleet-gateway']}", n
    # the SuperLink's port (Control API: flwr run, supernode register) is published on loopback only;
    # the gateway's Fleet port is the one port open to other hosts
    published = {n: [p.split(":") for p in s.get("ports", [])] for n, s in services.items() if s.get("ports")}
    assert published == {
        "superlink": [["127.0.0.1", port_of["superlink"], port_of["superlink"]]],
        "fleet-gateway": [[port_of["fleet-gateway"], port_of["fleet-gateway"]]],
    }, published
    reg_env = services["supernode-register"].get("environment", {})
    if "SUPERLINK_ADDRESS" in reg_env:
        assert reg_env["SUPERLINK_ADDRESS"] == f"superlink:{port_of['superlink']}"


def test_tls_is_default_and_insecure_only_in_override() -> None:
    tls = flower_services(load_compose(COMPOSE))
    insecure = flower_services(load_compose(COMPOSE, COMPOSE_INSECURE))
    assert set(tls) == set(insecure)
    for n, c in tls.items():
        assert "--insecure" not in c, n
        if c[0] == "flower-superlink":
            assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"} <= set(c)
        elif c[0] == "flower-supernode":
            assert {"--root-certificates", "--auth-supernode-private-key", "--ssl-certfile"} <= set(c), n
        else:
            assert "--root-certificates" in c, n
        assert "--superexec-auth-secret-file" in c, n
    for n, c in insecure.items():
        assert "--insecure" in c, n
        assert not (set(c) & (TLS_FLAGS | SECRET_FLAGS)), n
        # the override changes security flags only: everything else is as in the TLS file
        strip = TLS_FLAGS | {"--auth-supernode-private-key"}
        rest_tls = [a for i, a in enumerate(tls[n]) if a not in strip and tls[n][i - 1] not in strip]
        rest_tls = [a for a in rest_tls if a != "--enable-supernode-auth"]
        assert [a for a in c if a != "--insecure"] == rest_tls, n
    assert "SuperNode authentication" in " ".join(command_of(load_compose(COMPOSE_INSECURE)["supernode-register"]))


@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="deploy/gen-certs.sh needs openssl, ssh-keygen"
)
def test_mounted_paths_match_flags_and_gen_certs(tmp_path: Path) -> None:
    """Every file a command reads is inside a volume of its service, and gen-certs.sh makes every bind source."""
    subprocess.run(["bash", str(GEN_CERTS), str(tmp_path)], check=True, capture_output=True, timeout=60)
    # private keys and the SuperExec secret 0600, their directories 0700; certificates and public keys 0644
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert all(mode(tmp_path / d) == 0o700 for d in ("certs", "keys", "secrets"))
    private = [*(tmp_path / "certs").glob("*.key"), tmp_path / "secrets" / "superexec.secret"]
    private += [p for p in (tmp_path / "keys").iterdir() if p.suffix != ".pub"]
    public = [*(tmp_path / "certs").glob("*.crt"), *(tmp_path / "keys").glob("*.pub")]
    assert len(private) == 4 + 5 and len(public) == 3 + 5
    assert {p.name: mode(p) for p in private} == {p.name: 0o600 for p in private}
    assert {p.name: mode(p) for p in public} == {p.name: 0o644 for p in public}
    for files in VARIANTS.values():
        services = load_compose(*files)
        for name, svc in services.items():
            cmd = command_of(svc)
            mounts = volume_map(svc)
            paths = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a in FILE_FLAGS]
            paths += [a for a in cmd if a.startswith("/keys/")]  # register-supernodes.sh arguments
            if "--database" in cmd:
                paths.append(flag_value(cmd, "--database"))
            for p in paths:
                assert any(p == t or p.startswith(t.rstrip("/") + "/") for _, t in mounts), f"{name}: {p} not mounted"
            for src, _ in mounts:
                if src.startswith("./deploy/"):
                    assert (tmp_path / src[len("./deploy/") :]).exists(), f"{name}: {src} is not made by gen-certs.sh"
                assert src.startswith("./") or src in yaml.safe_load(COMPOSE.read_text())["volumes"], (name, src)
    # SuperNode keys: each node its own private key; the register service gets exactly their public keys
    services = load_compose(COMPOSE)
    cmds = flower_services(services)
    keys = [flag_value(c, "--auth-supernode-private-key") for c in cmds.values() if c[0] == "flower-supernode"]
    assert len(set(keys)) == len(keys)
    registered = [a for a in command_of(services["supernode-register"]) if a.endswith(".pub")]
    assert sorted(registered) == sorted(k + ".pub" for k in keys)


def test_dockerfile_base_image_matches_installed_flwr() -> None:
    version = importlib.metadata.version("flwr")
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms, "Dockerfile has no FROM"
    image, _, tag = froms[0].partition(":")
    assert image == "flwr/base"
    assert tag.split("-")[0] == version, f"base image {froms[0]} vs installed flwr {version}"
    locked = re.search(r"^flwr==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert locked, "requirements.lock pins no flwr"
    assert locked.group(1) == version, f"requirements.lock pins flwr {locked.group(1)}, installed {version}"
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text), "Dockerfile must pip install fedfuse (.)"
    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    flwr = next(Requirement(d) for d in deps if Requirement(d).name == "flwr")
    assert flwr.specifier.contains(version), f"pyproject's {flwr} does not admit the installed flwr {version}"
    images = {s.get("image") for s in load_compose(COMPOSE).values()}
    assert len(images) == 1, images  # one image for every service


def test_flwr_connection_template_parses(tmp_path: Path) -> None:
    """deploy/flwr-config.toml is a valid Flower 1.41 connection table once the CA path is filled in."""
    from flwr.cli.flower_config import parse_superlink_connection

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    text = FLWR_CONFIG.read_text().replace("@CA_CERT@", str(tmp_path / "ca.crt"))
    conns = tomllib.loads(text)["superlink"]
    tls = parse_superlink_connection(conns["fedfuse"], "fedfuse")
    assert tls.root_certificates == str(tmp_path / "ca.crt") and not tls.insecure
    assert tls.address.endswith(":" + flag_value(command_of(load_compose(COMPOSE)["superlink"]), "--port"))
    assert parse_superlink_connection(conns["fedfuse-insecure"], "fedfuse-insecure").insecure


def test_interpolation_and_localize(tmp_path: Path) -> None:
    assert interpolate("n=${N:-3} m=${M} $$x", {"M": "7"}) == "n=3 m=7 $x"
    assert interpolate("n=${N:-3}", {"N": "5"}) == "n=5"
    services = load_compose(COMPOSE)
    ports = {"superlink": 1111, "supernode-1": 2222, "fleet-gateway": 3333}
    cmd, _ = localize(services, "supernode-1", ports, tmp_path / "d", tmp_path / "v")
    assert flag_value(cmd, "--superlink") == "127.0.0.1:3333"
    assert flag_value(cmd, "--port") == "2222" and flag_value(cmd, "--host") == "127.0.0.1"
    assert flag_value(cmd, "--root-certificates") == str(tmp_path / "d" / "certs" / "ca.crt")
    assert flag_value(cmd, "--node-config") == "partition-id=0 num-partitions=3"
    cmd, _ = localize(services, "superlink", ports, tmp_path / "d", tmp_path / "v")
    assert flag_value(cmd, "--database") == str(tmp_path / "v" / "superlink-state" / "state.db")
    assert os.path.isdir(tmp_path / "v" / "superlink-state")
