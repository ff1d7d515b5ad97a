"""Security and integrity: nothing fedfuse reads runs code, replies cannot crash or flood the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfuse.replies import reply_size_reason
from fedfuse.runners.inline import InlineGrid
from fedfuse.validation import check_update
from strategies.base import FedFuseStrategy
from strategies.observed import ObservedStrategy
from tests.test_cli import run_cli

REFERENCE = {"w": torch.zeros(3, 2), "b": torch.zeros(3), "n": torch.tensor(0)}


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _crafted(path: Path, marker: Path, payload: dict) -> None:
    torch.save({**payload, "x": _Payload(marker)}, path)
    # the payload is live: an unsafe load would run it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def _fedfuse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfuse.cli", *args], capture_output=True, text=True, timeout=300)


def test_resume_from_a_crafted_checkpoint_runs_no_code(tmp_path) -> None:
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"num-rounds": 2, "seed": 0, "dataset": "mnist1d", "model": "mlp", "out": str(run)}
    _crafted(run / "checkpoint.pt", marker, {"round": 1, "config": cfg, "model": {}})
    proc = _fedfuse("simulate", "--no-progress", "--backend", "inline", "--resume", str(run))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run / "checkpoint.pt") in lines[0] and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_lmc_on_a_crafted_model_file_runs_no_code(tmp_path) -> None:
    marker = tmp_path / "marker"
    evil, good = tmp_path / "evil.pt", tmp_path / "good.pt"
    _crafted(evil, marker, {"w": torch.zeros(1)})
    torch.save({"w": torch.zeros(1)}, good)
    proc = _fedfuse("lmc", str(evil), str(good), "--dataset", "mnist1d", "--model", "mlp", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(evil) in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("n", "reason"),
    [
        (float("nan"), "not finite"),
        (float("inf"), "not finite"),
        (float("-inf"), "not finite"),
        (-3, "not a positive integer"),
        (0, "not a positive integer"),
        (1e12, "exceeds the limit"),
        (10**400, "exceeds the limit"),
        (True, "not a number"),
        ("7", "not a number"),
        (None, "not a number"),
        ([1, 2], "not a number"),
        (1 + 2j, "not a real number"),
        (5, None),
        (5.0, None),
    ],
)
def test_check_update_never_raises_on_num_examples(n, reason) -> None:
    got = check_update(dict(REFERENCE), REFERENCE, n)
    assert (got is None) if reason is None else (reason in got)


def test_max_num_examples_is_configurable() -> None:
    assert check_update(dict(REFERENCE), REFERENCE, 500, max_num_examples=100) is not None
    assert check_update(dict(REFERENCE), REFERENCE, 1e12, max_num_examples=1e13) is None
    with pytest.raises(ValueError, match="max_reply_factor=0 is out of range"):
        FedFuseStrategy(max_reply_factor=0)


def _malicious_client_app() -> ClientApp:
    """Partition 0: num-examples NaN; 1: inf; 2: 1e12; 3: an extra large array; 4: a huge value for a known key;
    5, 6: good."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = context.node_config["partition-id"]
        return Message(RecordDict({"client": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        state = {k: v.clone() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        n: float = 10
        if pid == 0:
            n = float("nan")
        elif pid == 1:
            n = float("inf")
        elif pid == 2:
            n = 1e12
        elif pid == 3:
            state["extra"] = torch.zeros(10**6)
        elif pid == 4:
            state["w"] = torch.zeros(1000, 1000)
        return Message(
            RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}), reply_to=msg
        )

    return app


def test_malformed_and_oversized_replies_are_rejected(caplog) -> None:
    grid = InlineGrid(_malicious_client_app(), 7)
    strategy = FedFuseStrategy(min_available_nodes=7, min_train_nodes=2)
    observed = ObservedStrategy(strategy)
    result = observed.start(grid, ArrayRecord(REFERENCE), num_rounds=2)
    stats = observed.round_metrics()
    assert stats["rejected"] == 5 and stats["replies"] == 2 and stats["skipped"] == 0
    final = result.arrays.to_torch_state_dict()
    assert set(final) == set(REFERENCE) and final["w"].shape == (3, 2)
    text = caplog.text
    assert "not finite" in text and "exceeds the limit" in text
    assert "unexpected key(s) ['extra']" in text and "exceeds 2 × the sent model" in text


def test_reply_size_is_checked_before_decoding(monkeypatch) -> None:
    sent = dict(REFERENCE)
    big = ArrayRecord({"w": torch.zeros(100, 100), "b": torch.zeros(3), "n": torch.tensor(0)})
    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", lambda self: pytest.fail("decoded"))
    assert "exceeds" in reply_size_reason(big, sent)
    assert "unexpected" in reply_size_reason(ArrayRecord({"z": torch.zeros(1)}), sent)
    assert reply_size_reason(ArrayRecord(dict(REFERENCE)), sent) is None


def test_observers_never_decode_an_oversized_reply(monkeypatch) -> None:
    """The ServerApp's observers (LMC monitor, client dump) apply the same pre-decode size check."""
    observed = ObservedStrategy(FedFuseStrategy(), [])
    observed._sent = dict(REFERENCE)
    big = ArrayRecord({"w": torch.zeros(100, 100), "b": torch.zeros(3), "n": torch.tensor(0)})
    reply = Message(RecordDict({"arrays": big, "metrics": MetricRecord({"num-examples": 5})}), dst_node_id=1,
                    message_type="train")  # fmt: skip
    monkeypatch.setattr(ArrayRecord, "to_torch_state_dict", lambda self: pytest.fail("decoded"))
    monkeypatch.setattr(ArrayRecord, "numpy", lambda self: pytest.fail("decoded"), raising=False)
    monkeypatch.setattr("fedfuse.replies.decode_arrays", lambda record: pytest.fail("decoded"))
    assert observed._client_models([reply]) == []


# ---- results never mixed ------------------------------------------------------------------------------
SMALL = ("simulate", "--no-progress", "--backend", "inline", "--dataset", "mnist1d", "--model", "mlp",
         "--num-clients", "2", "--rounds", "2", "--local-epochs", "1", "--seed", "0")  # fmt: skip


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    """fedfuse's own error lines (Flower logs to stderr too); a traceback fails the test."""
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("fedfuse: error:")]


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = _fedfuse(*SMALL, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_resuming_a_complete_run_changes_nothing(finished) -> None:
    before = _snapshot(finished)
    proc = _fedfuse("simulate", "--no-progress", "--backend", "inline", "--resume", str(finished))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"run in {finished} is already complete (2 rounds); nothing to do"
    assert _snapshot(finished) == before


def test_stale_temp_files_are_removed_when_a_run_starts(finished, tmp_path) -> None:
    import shutil

    from fedfuse.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpt = load_checkpoint(out)
    save_checkpoint(out, {**ckpt, "round": 1, "metrics": ckpt["metrics"][:2]})  # as if killed after round 1
    stale = [out / ".checkpoint.pt.abc123.tmp", out / ".metrics.json.xyz.tmp"]
    for p in stale:
        p.write_bytes(b"torn")
    proc = _fedfuse("simulate", "--no-progress", "--backend", "inline", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(p.exists() for p in stale)
    (out / ".model.pt.q.tmp").write_bytes(b"torn")
    proc = _fedfuse(*SMALL, "--out", str(out), "--overwrite")  # a fresh run in the same directory
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(out.rglob(".*.tmp"))


def test_a_run_in_which_every_client_failed_fails(tmp_path) -> None:
    out = tmp_path / "run"
    proc = _fedfuse(*SMALL, "--fail-prob", "1.0", "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = _errors(proc)
    assert len(lines) == 1 and "round 1: every client failed" in lines[0], proc.stderr[-2000:]
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1]  # the run stops at that round; what was written stays


def test_a_result_path_that_cannot_be_written_is_one_line(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").mkdir()  # fails for root too
    proc = _fedfuse(*SMALL, "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = _errors(proc)
    assert len(lines) == 1 and f"cannot write {out / 'checkpoint.pt'}" in lines[0], proc.stderr[-2000:]


def test_overwrite_keeps_the_previous_results_when_the_new_run_fails(finished, tmp_path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    proc = _fedfuse(*SMALL, "--out", str(out), "--overwrite", "--fail-prob", "1.0")  # every round skipped
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = _errors(proc)
    assert len(lines) == 1 and "previous results" in lines[0] and "kept" in lines[0], proc.stderr[-2000:]
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing left aside


def test_overwrite_killed_midway_never_mixes_old_and_new_files(finished, tmp_path) -> None:
    """The old run's files are renamed aside before the new run writes anything: killed after its first round,
    ``out`` holds only the new run's files (resumable), the old ones wait in ``.run.replaced-*``."""
    import shutil
    import signal
    import time

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    old_model = (out / "model.pt").read_bytes()
    cmd = [sys.executable, "-m", "fedfuse.cli", *SMALL, "--rounds", "200", "--out", str(out), "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                rows = json.loads((out / "metrics.json").read_text())["rounds"]
                moved = any(tmp_path.glob(".run.replaced-*"))  # before that, out holds the old run
                if moved and len(rows) >= 2 and (out / "checkpoint.pt").exists():
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the new run wrote no round in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((out / "metrics.json").read_text())["config"]["num-rounds"] == 200
    assert not (out / "model.pt").exists() and not (out / "accuracy.png").exists()
    (aside,) = tmp_path.glob(".run.replaced-*")
    assert (aside / "model.pt").read_bytes() == old_model


def test_a_read_only_out_directory_is_one_line(finished, tmp_path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing (see the metrics.json-directory test)")
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = _snapshot(out)
    out.chmod(0o555)
    try:
        proc = _fedfuse(*SMALL, "--out", str(out), "--overwrite")
    finally:
        out.chmod(0o755)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = _errors(proc)
    assert len(lines) == 1 and f"cannot write {out}" in lines[0], proc.stderr[-2000:]
    assert _snapshot(out) == before


def _resume_in(cwd: Path, run: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", "--backend", "inline"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [*cmd, "--resume", str(run), *flags], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def _unfinished(finished: Path, tmp_path: Path, **fields) -> Path:
    """A copy of ``finished`` whose checkpoint is its round-1 state with ``fields`` replaced."""
    import shutil

    from fedfuse.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpt = load_checkpoint(out)
    save_checkpoint(out, {**ckpt, "round": 1, "metrics": ckpt["metrics"][:2], **fields})
    return out


def test_resume_imports_no_strategy_module_named_only_by_the_checkpoint(finished, tmp_path) -> None:
    """A checkpoint naming ``somemodule:Cls`` with somemodule.py planted beside it (cwd = run dir): not imported."""
    from fedfuse.checkpoint import load_checkpoint

    marker = tmp_path / "marker"
    cfg = {**load_checkpoint(finished)["config"], "strategy": "somemodule:Evil"}
    out = _unfinished(finished, tmp_path, config=cfg)
    (out / "somemodule.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nclass Evil: pass\n")
    before = _snapshot(out)
    proc = _resume_in(out, out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _errors(proc)
    assert len(lines) == 1 and "--strategy somemodule:Evil" in lines[0] and "Traceback" not in proc.stderr
    assert not marker.exists() and _snapshot(out) == before


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("round", -3, "round is -3, not a round number"),
        ("round", "x", "round is 'x'"),
        ("config", ["strategy", "wb"], "config is not a mapping"),
        ("metrics", [{"round": "zero"}], "metrics is not a list of rows of numbers"),
        ("metrics", [{"round": 0, "wall_time": 0.0}], "metrics holds rounds [0]"),
        ("rng", {"torch": torch.zeros(3)}, "rng is not"),
        ("strategy", [1, 2], "strategy is not a mapping"),
        ("model", {"w": "not a tensor"}, "model is not a state dict"),
        ("model", "nan", "holds NaN or infinite values"),
        ("model", "shape", "the config's model"),
    ],
)
def test_a_crafted_checkpoint_field_is_one_line(finished, tmp_path, capsys, field, value, says) -> None:
    from fedfuse.checkpoint import load_checkpoint

    model = load_checkpoint(finished)["model"]
    first = next(iter(model))
    if value == "nan":
        value = {**model, first: torch.full_like(model[first], float("nan"))}
    elif value == "shape":
        value = {**model, first: torch.zeros(*model[first].shape[:-1], model[first].shape[-1] + 1)}
    out = _unfinished(finished, tmp_path, **{field: value})
    before = _snapshot(out)
    code = run_cli(["simulate", "--no-progress", "--backend", "inline", "--resume", str(out)])  # in-process: fast
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fedfuse: error:") and says in err[0], err
    assert _snapshot(out) == before  # nothing written


def test_resuming_from_round_0_records_round_0_once(finished, tmp_path) -> None:
    from fedfuse.checkpoint import load_checkpoint, save_checkpoint
    from fedfuse.experiment import dataset_for, model_for

    out = _unfinished(finished, tmp_path)
    ckpt = load_checkpoint(out)
    initial = model_for(ckpt["config"], dataset_for(ckpt["config"])).state_dict()
    save_checkpoint(out, {**ckpt, "round": 0, "metrics": ckpt["metrics"][:1], "model": initial})
    proc = _resume_in(tmp_path, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
