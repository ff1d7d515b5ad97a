"""End-to-end through Flower's simulation engine on Ray (real ServerApp, ClientApp, strategy)."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.ray


def _results(rows: list[dict]) -> list[dict]:
    """Metrics rows without their timings (wall_time, aggregate_s, server_s): measurements, not results."""
    return [{k: v for k, v in r.items() if k not in ("wall_time", "aggregate_s", "server_s")} for r in rows]


def _simulate(out, *extra: str, printed: list[str] | None = None) -> dict:
    """metrics.json of one ``fedfuse simulate`` run; ``printed`` gets its stdout lines."""
    cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if printed is not None:
        printed += proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Flower's supported path: no deprecation warning, neither shown nor in Flower's log of the run
    shown = proc.stdout + proc.stderr + ((out / "flower.log").read_text() if (out / "flower.log").exists() else "")
    assert "deprecat" not in shown.lower(), [ln for ln in shown.splitlines() if "deprecat" in ln.lower()]
    return json.loads((out / "metrics.json").read_text())


def test_three_clients_two_rounds_learn_and_are_deterministic(tmp_path) -> None:
    args = (
        "--dataset", "digits", "--model", "mlp", "--num-clients", "3", "--rounds", "2",
        "--partition", "dirichlet", "--alpha", "0.5", "--fraction-train", "0.6",
        "--local-epochs", "1", "--local-epochs-max", "2", "--straggler-fraction", "0.3", "--seed", "3",
    )  # fmt: skip
    first = _simulate(tmp_path / "a", *args)
    second = _simulate(tmp_path / "b", *args)

    rounds = first["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["central_accuracy"] > rounds[0]["central_accuracy"] + 0.2
    assert all(r["replies"] == 2 for r in rounds[1:])  # ceil(0.6 * 3) sampled, all replied
    for name in ("metrics.json", "metrics.csv", "model.pt", "accuracy.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0

    # same seed, same command: identical metrics (wall time aside) and bit-identical final weights
    strip = _results(rounds)
    assert strip == _results(second["rounds"])
    wa, wb = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the in-process backend runs the same ServerApp logic, ClientApp and strategy: same result, bit for bit
    inline = _simulate(tmp_path / "c", *args, "--backend", "inline")
    assert strip == _results(inline["rounds"])
    wc = torch.load(tmp_path / "c" / "model.pt")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_simulation_on_an_existing_ray_cluster(tmp_path) -> None:
    """`ray start --head` on loopback, then `fedfuse simulate --ray-address` joins it instead of starting Ray."""
    import os
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import shutil
    import tempfile

    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = subprocess.Popen(
        [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir, "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the GCS port to accept connections
            assert head.poll() is None, "ray start --head exited"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        printed: list[str] = []
        address = f"127.0.0.1:{port}"
        args = ("--ray-address", address, "--num-clients", "3", "--rounds", "2")
        rows = _simulate(tmp_path / "out", *args, printed=printed)["rounds"]
        assert [r["round"] for r in rows] == [0, 1, 2] and all(r["replies"] == 3 for r in rows[1:])
        assert f"joined Ray cluster at {address}: 1 node, 2 CPUs" in printed, printed[:5]  # the head's --num-cpus
        assert head.poll() is None  # the cluster outlived the run: fedfuse joined it, did not own it
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_injected_stragglers_on_ray_are_counted_exactly(tmp_path) -> None:
    """Issue 16: a sleeping straggler held one of Ray's actors and made honest clients queued behind it late.
    Now late replies on Ray are exactly the injected ones, as inline."""
    import numpy as np

    from fedfuse.experiment import derive_seed

    args = ("--dataset", "mnist1d", "--num-clients", "6", "--rounds", "3", "--seed", "0",
            "--straggle-prob", "0.3", "--round-timeout", "120")  # fmt: skip
    ray = _simulate(tmp_path / "ray", *args)["rounds"]
    inline = _simulate(tmp_path / "inline", *args, "--backend", "inline")["rounds"]
    injected = [
        float(sum(np.random.default_rng(derive_seed(0, pid, rnd, 5)).random(2)[1] < 0.3 for pid in range(6)))
        for rnd in (1, 2, 3)
    ]
    assert sum(injected) > 0
    assert [r["timeouts"] for r in ray[1:]] == injected == [r["timeouts"] for r in inline[1:]]


def test_the_cluster_line_reads_rays_own_view_of_a_cluster() -> None:
    """cluster_summary fed from Ray's API on a local cluster of 3 CPUs (what --ray-address prints for one)."""
    import ray

    from fedfuse.runners.ray import cluster_summary

    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        line = cluster_summary("local", ray.nodes(), ray.cluster_resources())
    finally:
        ray.shutdown()
    assert line == "joined Ray cluster at local: 1 node, 3 CPUs"


def test_lora_clients_that_start_apart_on_ray_match_inline_bit_for_bit(tmp_path) -> None:
    """Each Ray worker computes the pretrained base itself: an apart client's own seed draws only its adapters, so
    workers, server and the in-process backend share one base (a worker that pretrained from its own init gave
    0.09 where inline gave 0.59)."""
    args = ("--dataset", "digits", "--strategy", "svd-lora", "--lora-ranks", "2,4", "--pretrain", "low-classes",
            "--pretrain-epochs", "2", "--one-shot", "--num-clients", "3", "--rounds", "2")  # fmt: skip
    ray = _simulate(tmp_path / "ray", *args)
    inline = _simulate(tmp_path / "inline", *args, "--backend", "inline")
    assert _results(ray["rounds"]) == _results(inline["rounds"])
    assert ray["rounds"][1]["central_accuracy"] > ray["rounds"][0]["central_accuracy"]
