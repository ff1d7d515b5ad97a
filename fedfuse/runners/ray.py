"""Run fedfuse through Flower's supported simulation path: ``flwr run`` against a local SuperLink in
simulation mode (Flower's simulation engine on Ray), the same path ``flwr run .`` takes.

``run_ray`` starts its own SuperLink on a free loopback port with a private ``FLWR_HOME`` (so it neither
uses nor disturbs the user's Flower config or a SuperLink they run), submits a throwaway app whose
``[tool.flwr.app.config]`` is the validated run config, follows ``metrics.json`` for per-round progress,
and stops the SuperLink (and its ServerApp/simulation processes) when the run ends, also on Ctrl-C.
Flower's Python ``run_simulation`` is deprecated from flwr 1.41 on, so it is not used.

Composition layer (starts Flower processes): nothing in the core imports this module.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedfuse import protocol
from fedfuse.errors import RunFailedError

__all__ = [
    "run_ray", "local_superlink", "started_superlink", "SuperLinkProcess",
    "run_status", "wait_finished", "EXPECTED_WARNINGS", "write_app", "cluster_summary",
    "describe_cluster", "partition_cache",
]  # fmt: skip

# Known and deliberate: server-side-only evaluation; Flower's note on its default federation size (we set it).
EXPECTED_WARNINGS = ("fraction_evaluate is set to 0.0", "default simulated SuperNodes changed")
_ERROR = re.compile(r"fedfuse: error: (.*)")
_STARTED = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (``flwr``, ``flower-superlink``)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise RunFailedError(f"{name!r} not found next to {sys.executable}; install flwr[simulation]")
    return found


def write_app(app_dir: Path, cfg: Mapping[str, Any], *, resume: bool) -> None:
    """A Flower app with no code of its own: fedfuse's ServerApp/ClientApp (imported from the installed
    packages) and ``cfg`` as its run-config defaults."""
    import tomli_w  # a dependency of flwr

    project = {
        "project": {"name": "fedfuse-simulate", "version": "0.1.0"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedfuse",
                    "components": {
                        "serverapp": f"strategies.server_app:{'resume_app' if resume else 'simulate_app'}",
                        "clientapp": "clients.client_app:app",
                    },
                    "config": {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool))},
                }
            }
        },
    }
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_bytes(tomli_w.dumps(project).encode())


def _last_line(path: Path) -> str:
    lines = [ln for ln in _ANSI.sub("", path.read_text(errors="replace")).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailedError(f"flower-superlink exited with code {proc.returncode}: {_last_line(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:  # noqa: S310 — loopback
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RunFailedError(f"flower-superlink did not answer on 127.0.0.1:{port} within {timeout:.0f} s")


SUPERVISE = Path(__file__).with_name("supervise.py")


def supervised(cmd: Sequence[str], *, remove: Sequence[Path] = (), **popen: Any) -> subprocess.Popen[Any]:
    """``cmd`` under :mod:`fedfuse.runners.supervise`: it and every process it starts (Ray's included) end when
    this process ends — also by ``kill -9`` — or when :func:`_stop` is called; ``remove`` is deleted then."""
    return subprocess.Popen(
        [sys.executable, str(SUPERVISE), *(f"--remove={p}" for p in remove), "--", *cmd],
        stdin=subprocess.PIPE,  # its write end, held only here, is the supervisor's death notice
        start_new_session=True,  # a terminal's Ctrl-C reaches this process, which then stops the supervisor
        **popen,
    )


def _stop(proc: subprocess.Popen[Any], timeout: float = 8.0, *, quick: bool = False) -> None:
    """Ask a :func:`supervised` process to end its command and all it started (EOF on its stdin), and wait.
    ``quick``: nothing it runs holds a result any more; whatever ignores SIGTERM is killed after 0.3 s, not 2 s."""
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            if quick:
                proc.stdin.write("quick" if isinstance(proc.stdin, io.TextIOBase) else b"quick")
                proc.stdin.flush()
            proc.stdin.close()
        except OSError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _rows(out: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((out / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return []  # not written yet (or being replaced right now: atomic writes make that a missing file)


def run_status(env: Mapping[str, str], run_id: str) -> tuple[str, str]:
    """(status, status details) of run ``run_id`` on the SuperLink of ``env`` (``flwr list --run-id``)."""
    proc = subprocess.run(
        [_tool("flwr"), "list", "--run-id", str(run_id), "--format", "json"],
        env=dict(env), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        run = json.loads(proc.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return "unknown", proc.stdout[-300:] + proc.stderr[-300:]
    return str(run["status"]), str(run.get("status-details", ""))


def wait_finished(
    env: Mapping[str, str], run_id: str, timeout: float = 3600.0, tick: Callable[[], None] | None = None
) -> tuple[str, str]:
    """Poll until run ``run_id`` is ``finished:*`` (``flwr run --stream`` may return before that)."""
    deadline = time.monotonic() + timeout
    while True:
        status, details = run_status(env, run_id)
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        if tick is not None:
            tick()
        time.sleep(2.0)


WARM_SUPERLINK = "FEDFUSE_SUPERLINK_HOME"  # FLWR_HOME of a running SuperLink to reuse (``--compare`` sets it)


def _superlink_env(home: Path, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a SuperLink whose ``FLWR_HOME`` is ``home``, and of ``flwr run`` / ``flwr list`` on it."""
    import fedfuse

    root = Path(fedfuse.__file__).resolve().parent.parent  # the code this CLI runs is the code the apps run
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_DEDUP_LOGS": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        protocol.RUN_DONE_DIR: str(home),  # where fedfuse's ServerApp says "all results written" (run_ray)
        protocol.PARTITION_CACHE: str(partition_cache(home)),  # the preflight's partitions, read by every worker
        # the SuperLink starts flower-superexec, flwr-serverapp, ... by name: this environment's, also when
        # it is not activated (`.venv/bin/fedfuse simulate`)
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        # fedfuse's code first, then the user's directory (a `pkg.mod:Class` strategy beside them)
        "PYTHONPATH": os.pathsep.join([str(root), os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])]),
        **(extra_env or {}),
    }
    env.pop(WARM_SUPERLINK, None)  # the apps, and a SuperLink started here, never reuse another one
    return env


def partition_cache(home: Path) -> Path:
    """The partition cache (:data:`fedfuse.protocol.PARTITION_CACHE`) of the runs on the SuperLink whose
    ``FLWR_HOME`` is ``home``: beside it, removed with it."""
    return home.parent / "partitions"


class SuperLinkProcess:
    """A SuperLink in simulation mode started on a free loopback port, with a private ``FLWR_HOME`` in ``workdir``
    whose default connection points at it. Starting it returns at once (its start-up overlaps what the caller does
    next, e.g. the preflight); :meth:`ready` waits until it answers and returns the environment for ``flwr run``.
    It and every process it starts (ServerApp, simulation, Ray) end with :meth:`stop`, and also when this process is
    killed (:func:`supervised`); ``remove_workdir`` deletes ``workdir`` then."""

    def __init__(
        self, workdir: Path, extra_env: Mapping[str, str] | None = None, *, remove_workdir: bool = False
    ) -> None:
        self.workdir = workdir
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        partition_cache(self.home).mkdir(exist_ok=True)
        self.port = _free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedfuse"\n\n[superlink.fedfuse]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        self.env = _superlink_env(self.home, extra_env)
        self.log_path = workdir / "superlink.log"
        with open(self.log_path, "wb") as link_log:
            self.proc = supervised(
                [_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--control-api-address", f"127.0.0.1:{_free_port()}", "--host", "127.0.0.1", "--port",
                 str(self.port)],
                remove=[workdir] if remove_workdir else [], env=self.env, cwd=workdir, stdout=link_log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._healthy = False

    def ready(self) -> dict[str, str]:
        if not self._healthy:
            _wait_healthy(self.port, self.proc, self.log_path)
            self._healthy = True
        return self.env

    def stop(self, *, quick: bool = False) -> None:
        """End it and all it started (idempotent); ``quick`` as in :func:`_stop`."""
        _stop(self.proc, quick=quick)


@contextmanager
def started_superlink(extra_env: Mapping[str, str] | None = None) -> Iterator[SuperLinkProcess]:
    """A :class:`SuperLinkProcess` in a temporary directory, started now and stopped (with every process it
    started) on exit: ``fedfuse simulate`` starts it before its preflight, ``--compare`` shares one across runs."""
    with tempfile.TemporaryDirectory(prefix="fedfuse-superlink-", ignore_cleanup_errors=True) as tmp:
        link = SuperLinkProcess(Path(tmp), extra_env, remove_workdir=True)
        try:
            yield link
        finally:
            link.stop()


@contextmanager
def local_superlink(
    workdir: Path,
    extra_env: Mapping[str, str] | None = None,
    *,
    remove_workdir: bool = False,
) -> Iterator[dict[str, str]]:
    """A SuperLink in simulation mode on a free loopback port, with a private ``FLWR_HOME`` in ``workdir``
    whose default connection points at it; yields the environment for ``flwr run`` / ``flwr list``.
    The SuperLink and every process it started (ServerApp, simulation, Ray) are stopped on exit, and also
    when this process is killed (:func:`supervised`); ``remove_workdir`` deletes ``workdir`` then."""
    link = SuperLinkProcess(workdir, extra_env, remove_workdir=remove_workdir)
    try:
        yield link.ready()
    finally:
        link.stop()


@contextmanager
def _superlink_for_run(
    workdir: Path, extra_env: Mapping[str, str] | None, link: SuperLinkProcess | None
) -> Iterator[tuple[dict[str, str], SuperLinkProcess | None]]:
    """The SuperLink a run uses and the process to stop when the run is done (None for a shared one): ``link``
    (started by the caller), else the warm one named by ``$FEDFUSE_SUPERLINK_HOME`` (``--compare``: shared), else
    a fresh one for this run alone."""
    if link is not None:
        yield link.ready(), link
    elif os.environ.get(WARM_SUPERLINK):
        yield _superlink_env(Path(os.environ[WARM_SUPERLINK]), extra_env), None
    else:
        own = SuperLinkProcess(workdir, extra_env, remove_workdir=True)
        try:
            yield own.ready(), own
        finally:
            own.stop()


def _run_done(env: Mapping[str, str], run_ids: Sequence[str]) -> bool:
    """Whether fedfuse's ServerApp of the started run has written every result (its marker, see
    :func:`fedfuse.protocol.run_done_marker`)."""
    return bool(run_ids) and os.path.exists(protocol.run_done_marker(env[protocol.RUN_DONE_DIR], run_ids[0]))


def cluster_summary(address: str, nodes: Sequence[Mapping[str, Any]], resources: Mapping[str, float]) -> str:
    """One line from Ray's own view of a cluster (``ray.nodes()``, ``ray.cluster_resources()``):
    ``joined Ray cluster at ADDRESS: N nodes, C CPUs[, G GPUs]``."""
    alive = sum(1 for n in nodes if n.get("Alive", n.get("alive", False)))
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    line = f"joined Ray cluster at {address}: {alive} node{'' if alive == 1 else 's'}, {cpus:g} CPUs"
    return line + (f", {gpus:g} GPUs" if gpus else "")


def describe_cluster(address: str) -> str:
    """:func:`cluster_summary` of the running cluster at ``address``, read by connecting to it briefly as a driver
    (the simulation engine then joins the same cluster through ``RAY_ADDRESS``)."""
    import logging
    import warnings

    import ray

    with warnings.catch_warnings():  # Ray's tip about a future default of its own, not about this run
        warnings.simplefilter("ignore", FutureWarning)
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return cluster_summary(address, ray.nodes(), ray.cluster_resources())
    finally:
        ray.shutdown()


def run_ray(
    cfg: dict[str, Any],
    on_round: Callable[[dict[str, Any]], None] | None = None,
    *,
    resume: bool = False,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
    ray_address: str | None = None,
    verbose: bool = False,
    superlink: SuperLinkProcess | None = None,
) -> None:
    """``cfg['num-clients']`` simulated SuperNodes on Ray (``client-pool`` of them serving every client when set: the
    runtime then holds K nodes, not N), each ClientApp reserving ``client_cpus`` /
    ``client_gpus``; ``ray_address`` joins an existing Ray cluster (``RAY_ADDRESS``) instead of a local one.
    ``superlink``: a SuperLink the caller started already (its start-up overlapped the caller's preflight).

    Raises :class:`RunFailedError` with the ServerApp's error line when the run fails.
    """
    out = Path(cfg["out"]).resolve()
    cfg = {**cfg, "out": str(out)}  # the ServerApp's working directory is the SuperLink's: no relative paths
    if cfg.get("client-init-from"):  # nor the ClientApps'
        cfg["client-init-from"] = str(Path(cfg["client-init-from"]).resolve())
    seen = {int(r["round"]) for r in _rows(out)} if resume else set()
    tail: deque[str] = deque(maxlen=40)
    errors: list[str] = []
    run_ids: list[str] = []

    def record(plain: str) -> None:
        tail.append(plain)
        if m := _STARTED.search(plain):
            run_ids.append(m.group(1))
        if m := _ERROR.search(plain):
            errors.append(m.group(1))
        if verbose and not any(w in plain for w in EXPECTED_WARNINGS):
            print(plain, file=sys.stderr)

    def follow() -> None:
        for row in _rows(out):
            if int(row["round"]) not in seen:
                seen.add(int(row["round"]))
                if on_round is not None:
                    on_round(row)

    if ray_address:
        print(describe_cluster(ray_address), flush=True)  # which cluster this run joins, before it starts
    # the SuperLink's supervisor deletes tmp (FLWR_HOME, the app) also when this process is killed: a SuperLink
    # started earlier (or a --compare's warm one) holds tmp inside its own directory
    warm = os.environ.get(WARM_SUPERLINK)
    base = superlink.workdir if superlink is not None else Path(warm).parent if warm else None
    with tempfile.TemporaryDirectory(prefix="fedfuse-flwr-", dir=base, ignore_cleanup_errors=True) as tmp:
        app_dir = Path(tmp) / "app"
        write_app(app_dir, cfg, resume=resume)
        extra = {"RAY_ADDRESS": ray_address} if ray_address else None
        with _superlink_for_run(Path(tmp), extra, superlink) as (env, link):
            level, to_driver = ("INFO", "true") if verbose else ("ERROR", "false")
            fed = (
                f"num-supernodes={int(cfg.get('client-pool', 0)) or int(cfg['num-clients'])} "
                f"client-resources-num-cpus={client_cpus:g} "
                f"client-resources-num-gpus={client_gpus:g} init-args-logging-level='{level}' "
                f"init-args-log-to-driver={to_driver}"
            )
            run = supervised(
                [_tool("flwr"), "run", str(app_dir), "--stream", "--federation-config", fed],
                env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

            def read() -> None:  # Flower's log of the run goes to OUT/flower.log (appended on --resume)
                assert run.stdout is not None
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "flower.log", "a", encoding="utf-8") as log_file:
                    for line in run.stdout:
                        plain = _ANSI.sub("", line.rstrip())
                        log_file.write(plain + "\n")
                        log_file.flush()
                        record(plain)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            done = False
            try:
                while run.poll() is None and not (done := _run_done(env, run_ids)):
                    follow()
                    time.sleep(0.2)
                if done and link is not None:  # every result is on disk and the SuperLink is this run's alone:
                    status, details = "finished:completed", ""  # Ray's shutdown and the status are not waited for
                elif done:  # a shared (--compare) SuperLink: its next run starts once this one has let Ray go
                    status, details = wait_finished(env, run_ids[0], tick=follow)
                else:
                    reader.join(timeout=10)
                    status, details = wait_finished(env, run_ids[0], tick=follow) if run_ids else ("", "")
            finally:  # also on Ctrl-C; a kill -9 of this process is handled by the supervisors themselves
                _stop(run, quick=done)
            if done and link is not None:  # the run's engine may still be shutting Ray down: end it now
                link.stop(quick=True)
            reader.join(timeout=2)
            follow()
    if errors:
        raise RunFailedError(f"{errors[0]} (Flower's log: {out}/flower.log)")
    if status.endswith("failed") or status.endswith("stopped"):
        reason = details.removeprefix("Simulation failed with exception: ") or status
        raise RunFailedError(f"{reason} (Flower's log: {out}/flower.log)")
    if not done and (run.returncode != 0 or not status):
        raise RunFailedError(f"`flwr run` exited with code {run.returncode}: {' | '.join(list(tail)[-5:])}")
