"""Client faults, update validation, checkpoints and exact resume, config validation (strategies and CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfuse.checkpoint import load_checkpoint, save_checkpoint
from fedfuse.errors import ConfigError
from fedfuse.runners.inline import InlineGrid
from fedfuse.validation import check_update
from strategies.base import FedFuseStrategy
from strategies.observed import ObservedStrategy

REFERENCE = {"w": torch.zeros(3, 2), "b": torch.zeros(3), "n": torch.tensor(0)}


def _bad_client_app() -> ClientApp:
    """Partition 0: NaN; 1: wrong shape; 2: missing key; 3: num-examples 0; 4, 5: good (value = pid)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from flwr.app import ConfigRecord

        return Message(
            RecordDict({"client": ConfigRecord({"partition-id": context.node_config["partition-id"]})}), reply_to=msg
        )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        state = {k: v.clone() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        state["w"] += pid
        n = 10 * pid
        if pid == 0:
            state["w"][0, 0] = float("nan")
        elif pid == 1:
            state["b"] = torch.zeros(4)
        elif pid == 2:
            del state["b"]
        elif pid == 3:
            n = 0
        return Message(
            RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}), reply_to=msg
        )

    return app


def test_invalid_updates_are_rejected_before_aggregation() -> None:
    grid = InlineGrid(_bad_client_app(), 6)
    strategy = FedFuseStrategy(min_available_nodes=6, min_train_nodes=2)
    observed = ObservedStrategy(strategy)
    result = observed.start(grid, ArrayRecord(REFERENCE), num_rounds=1)
    final = result.arrays.to_torch_state_dict()
    stats = observed.round_metrics()  # what the ServerApp writes into metrics.json
    assert stats["rejected"] == 4 and stats["replies"] == 2
    # the weighted average of the two valid replies only: (40·4 + 50·5) / 90
    assert torch.allclose(final["w"], torch.full((3, 2), (40 * 4 + 50 * 5) / 90))
    assert torch.isfinite(final["w"]).all() and final["b"].shape == (3,)


def test_too_few_valid_updates_keep_the_previous_model() -> None:
    grid = InlineGrid(_bad_client_app(), 6)
    strategy = FedFuseStrategy(min_available_nodes=6, min_train_nodes=3)
    result = strategy.start(grid, ArrayRecord(REFERENCE), num_rounds=2)  # Flower's own loop, no wrapper
    assert not result.arrays  # no round produced a model: the caller keeps the initial one
    rounds = result.train_metrics_clientapp.values()  # the statistics travel in the returned MetricRecords
    assert sum(m["skipped"] for m in rounds) == 2 and sum(m["rejected"] for m in rounds) == 8


@pytest.mark.parametrize(
    ("state", "n", "reason"),
    [
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3), "n": torch.tensor(0)}, 5, None),
        ({"w": torch.full((3, 2), float("inf")), "b": torch.zeros(3), "n": torch.tensor(0)}, 5, "w: 6 non-finite"),
        ({"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(3), "n": torch.tensor(0)}, 5, "w: dtype"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3), "n": torch.tensor(0), "x": torch.zeros(1)}, 5, "unexpected"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3), "n": torch.tensor(0)}, 2.5, "not a positive integer"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3), "n": torch.tensor(0)}, "7", "not a number"),
    ],
)
def test_check_update_rules(state, n, reason) -> None:
    got = check_update(state, REFERENCE, n)
    assert (got is None) if reason is None else (reason in got)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction_train": 1.5}, "fraction_train=1.5 is out of range; allowed: a number in [0, 1]"),
        ({"min_train_nodes": -1}, "min_train_nodes=-1 is out of range"),
        ({"seed": -3}, "seed=-3 is out of range"),
    ],
)
def test_strategy_constructor_arguments_are_validated(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FedFuseStrategy(**kwargs)


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


RUN = ("--backend", "inline", "--dataset", "mnist1d", "--model", "mlp", "--num-clients", "4", "--rounds", "6",
       "--local-epochs", "2", "--fraction-train", "0.75", "--seed", "2")  # fmt: skip


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path) -> None:
    ref = _cli(*RUN, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", *RUN, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "checkpoint.pt").exists() and load_checkpoint(out)["round"] >= 2:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed_at = load_checkpoint(out)["round"]
    assert 2 <= killed_at < 6, f"the run was not interrupted mid-way (checkpoint round {killed_at})"
    assert not (out / "model.pt").exists()

    resumed = _cli("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = torch.load(tmp_path / "ref" / "model.pt"), torch.load(out / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = json.loads((tmp_path / "ref" / "metrics.json").read_text())["rounds"]
    rows_b = json.loads((out / "metrics.json").read_text())["rounds"]
    # timings (wall_time, aggregate_s, server_s) are measurements, not results
    timings = ("wall_time", "aggregate_s", "server_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timings} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)


def test_resume_errors(tmp_path) -> None:
    empty = _cli("--resume", str(tmp_path))
    assert empty.returncode == 2 and "holds no checkpoint.pt" in empty.stderr
    save_checkpoint(tmp_path, {"round": 1, "config": {"num-rounds": 6, "seed": 2}, "model": {}})
    other = _cli("--resume", str(tmp_path), "--seed", "3")
    assert other.returncode == 2
    assert "seed=3 differs from the checkpoint's seed=2" in other.stderr and "Traceback" not in other.stderr


def test_a_kill_during_the_checkpoint_write_leaves_the_previous_one_loadable(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys, time, torch
        from fedfuse.checkpoint import save_checkpoint
        save_checkpoint({str(tmp_path)!r}, {{"round": 1, "config": {{}}, "model": {{"w": torch.ones(2)}}}})
        os.fsync = lambda fd: (print("writing", flush=True), time.sleep(120))  # die mid-write
        save_checkpoint({str(tmp_path)!r}, {{"round": 2, "config": {{}}, "model": {{"w": torch.zeros(10**6)}}}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["round"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert any(p.name.endswith(".tmp") for p in Path(tmp_path).iterdir())  # the torn write is left aside


def test_load_checkpoint_rejects_garbage(tmp_path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="checkpoint.pt cannot be read"):
        load_checkpoint(tmp_path)


@pytest.mark.ray
def test_ray_simulation_survives_failing_clients(tmp_path) -> None:
    proc = _cli("--num-clients", "10", "--rounds", "5", "--fail-prob", "0.3", "--seed", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == list(range(6))
    failures = [r["failures"] for r in rows[1:]]
    assert sum(failures) > 0 and all(r["replies"] + r["failures"] == 10 for r in rows[1:])
    assert rows[-1]["central_accuracy"] > rows[0]["central_accuracy"]


SMALL = ["simulate", "--no-progress", "--backend", "inline", "--dataset", "mnist1d", "--model", "mlp",
         "--num-clients", "2", "--rounds", "2", "--local-epochs", "1", "--seed", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def small_ref(tmp_path_factory) -> Path:
    from tests.test_cli import run_cli

    out = tmp_path_factory.mktemp("ref") / "run"
    assert run_cli([*SMALL, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fails", ["checkpoint.pt", "metrics.json"])
def test_a_full_disk_never_leaves_metrics_and_checkpoint_a_round_apart(
    small_ref, tmp_path, monkeypatch, capsys, fails
) -> None:
    """Round 2's commit fails with ENOSPC while one of its files is written: metrics.json/csv and checkpoint.pt
    all still end at round 1 (one line, exit 1, no temp file), and --resume then ends bit-identical to an
    uninterrupted run (``small_ref``)."""
    import errno

    import fedfuse.results as results
    from tests.test_cli import run_cli

    real, seen = results._write_synced, []

    def full_disk(fd: int, data: bytes) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name if sys.platform.startswith("linux") else ""
        seen.append(name)
        if name.startswith(f".{fails}.") and sum(n.startswith(f".{fails}.") for n in seen) == 3:  # round 2
            real(fd, data[: len(data) // 2])  # half written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    if not sys.platform.startswith("linux"):
        pytest.skip("names the file being written through /proc/self/fd")
    monkeypatch.setattr(results, "_write_synced", full_disk)
    out = tmp_path / "run"
    capsys.readouterr()
    assert run_cli([*SMALL, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"fedfuse: error: cannot write {out / fails}: No space left on device", err
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    csv_rounds = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert [r["round"] for r in rows] == [0, 1] and csv_rounds == ["0", "1"]
    assert load_checkpoint(out)["round"] == 1
    assert not list(out.glob(".*.tmp"))

    monkeypatch.setattr(results, "_write_synced", real)
    assert run_cli(["simulate", "--no-progress", "--resume", str(out)]) == 0
    a, b = torch.load(small_ref / "model.pt"), torch.load(out / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"]] == [0, 1, 2]


def _processes_with(tag: bytes) -> dict[int, str]:
    """Live processes whose environment holds ``tag`` (pid -> command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and tag in (entry / "environ").read_bytes():
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guarantee (and /proc) is Linux's")
def test_the_supervisor_ends_an_escaped_grandchild_when_its_parent_is_killed(tmp_path) -> None:
    """fedfuse/runners/supervise.py under a parent that is then kill -9'd: the supervised command's grandchild,
    which left the session (setsid, as Flower's SuperExec does) and ignores SIGTERM, is gone within 10 s,
    and the --remove path is deleted."""
    from fedfuse.runners.ray import SUPERVISE

    home = tmp_path / "flwr-home"
    home.mkdir()
    ready = tmp_path / "ready"
    sleeper = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(300)"
    )
    child = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {sleeper!r}], start_new_session=True); time.sleep(300)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, {str(SUPERVISE)!r}, '--remove={home}', '--', sys.executable, '-c', "
        f"{child!r}], stdin=subprocess.PIPE, start_new_session=True); time.sleep(300)"
    )
    tag = f"FEDFUSE_SUPERVISE_TEST={tmp_path}"
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, tag.split("=")[0]: str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_processes_with(tag.encode())) == 4
        proc.kill()
        killed = time.monotonic()
        while (left := _processes_with(tag.encode())) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        assert not left, left
        assert not home.exists()
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guarantee (and /proc) is Linux's")
def test_kill_9_of_a_ray_run_leaves_no_process_and_no_flwr_home(tmp_path) -> None:
    """kill -9 of ``fedfuse simulate --backend ray`` mid-run: within 10 s no process of the run is left (SuperLink,
    SuperExec, ServerApp/simulation, every Ray process: all carry the run's private FLWR_HOME in their
    environment), the temporary FLWR_HOME is gone, and checkpoint and metrics end at the same round.
    (That --resume then continues bit-identically is test_sigkill_then_resume_gives_bit_identical_weights: the
    same ServerApp and checkpoint code.)"""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", "--backend", "ray", "--dataset", "digits",
           "--model", "mlp", "--num-clients", "2", "--rounds", "500", "--seed", "1", "--out", str(out)]  # fmt: skip
    cli = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    home, ours = None, {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and cli.poll() is None:
            if home is None:
                for child in Path(f"/proc/{cli.pid}/task/{cli.pid}/children").read_text().split():
                    args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                    home = next((a.split(b"=", 1)[1] for a in args if a.startswith(b"--remove=")), home)
            else:  # the ServerApp has written round 0 and Ray runs ClientApp actors
                ours = _processes_with(b"FLWR_HOME=" + home + b"/flwr-home")
                if (out / "checkpoint.pt").exists() and any("ClientAppActor" in c for c in ours.values()):
                    break
            time.sleep(0.1)
        assert home is not None and cli.poll() is None, "the run did not get to its first round"
        assert any("flower-superlink" in c for c in ours.values()) and any("raylet" in c for c in ours.values())
        os.kill(cli.pid, signal.SIGKILL)
        killed = time.monotonic()
        while (left := _processes_with(b"FLWR_HOME=" + home + b"/flwr-home")) and time.monotonic() - killed < 10:
            time.sleep(0.2)
        assert not left, f"{len(left)} of the run's {len(ours)} processes outlived it by 10 s: {left}"
        assert not Path(home.decode()).exists()
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait(timeout=30)
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert rows[-1]["round"] == load_checkpoint(out)["round"]


@pytest.mark.ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guarantee (and /proc) is Linux's")
def test_a_finished_ray_run_ends_at_the_server_apps_done_marker(tmp_path, monkeypatch) -> None:
    """The ServerApp says when every result is written (fedfuse.protocol.run_done_marker): ``fedfuse simulate``
    then ends the run's processes at once — it neither waits for Ray's shutdown nor asks ``flwr list`` for the
    status — the results are whole, and no process of the run is left."""
    import tempfile

    import fedfuse.runners.ray as ray_runner
    from tests.test_cli import run_cli

    def no_status_poll(*args: object, **kwargs: object) -> tuple[str, str]:
        raise AssertionError("waited for the run's status although the ServerApp had marked it done")

    monkeypatch.setattr(ray_runner, "wait_finished", no_status_poll)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # the SuperLink's FLWR_HOME lies under it
    out = tmp_path / "run"
    argv = ["simulate", "--no-progress", "--backend", "ray", "--dataset", "digits", "--model", "mlp",
            "--num-clients", "2", "--rounds", "2", "--seed", "1", "--out", str(out)]  # fmt: skip
    assert run_cli(argv) == 0
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2] and load_checkpoint(out)["round"] == 2
    assert (out / "model.pt").exists() and (out / "accuracy.png").exists()
    deadline = time.monotonic() + 5
    while (left := _processes_with(b"FLWR_HOME=" + str(temp).encode())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the finished run are left: {left}"
    assert list(temp.iterdir()) == []  # the SuperLink's directory (FLWR_HOME, the app) is removed
