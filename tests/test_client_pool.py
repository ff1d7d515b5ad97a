"""``client-pool``: K SuperNodes serve N clients. Each round the server samples client ids and names, in the one
ConfigRecord it sends, the client each node serves; what a node computes depends only on that id, so a pooled run is
the same run, bit for bit, as one with a SuperNode per client — under the inline grid and under Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

TIMINGS = ("wall_time", "aggregate_s", "server_s")


def _rows(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def _run(tmp_path, cfg: dict, nodes: int) -> tuple[list[dict], dict, dict[int, set[int]]]:
    """(metrics rows, final model, node -> the clients it served) of an in-process run on ``nodes`` nodes."""
    from clients.client_app import app
    from fedfuse import protocol
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    served: dict[int, set[int]] = {}

    class Recording(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            replies = list(super().send_and_receive(list(messages), timeout=timeout))
            for r in replies:
                if not r.has_error() and protocol.CLIENT_INFO in r.content.config_records:
                    pid = int(r.content.config_records[protocol.CLIENT_INFO][protocol.PARTITION_ID])
                    served.setdefault(r.metadata.src_node_id, set()).add(pid)
            return replies

    out = tmp_path / f"run{nodes}"
    run_server(Recording(app, nodes), {**cfg, "out": str(out)})
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    return rows, torch.load(out / "model.pt"), served


@pytest.mark.parametrize(
    "cfg",
    [
        {"strategy": "fedavg", "num-clients": 12, "fraction-train": 0.25, "client-pool": 3},
        {"strategy": "match", "num-clients": 8, "fraction-train": 0.5, "client-pool": 4, "client-init": "own"},
        # per-client widths and ranks are looked up by the client a node serves in that round, not by the node
        {"strategy": "heterofl", "client-widths": "16,32,64", "width": 64, "num-clients": 9, "fraction-train": 0.34,
         "client-pool": 4},
        {"strategy": "hetlora", "lora-ranks": "2,4,3", "pretrain": "low-classes", "pretrain-epochs": 1,
         "num-clients": 9, "fraction-train": 0.33, "client-pool": 3},
    ],
    ids=["fedavg", "match-apart", "heterofl-widths", "hetlora-ranks"],
)  # fmt: skip
def test_a_pool_is_the_same_run_as_a_node_per_client(tmp_path, cfg) -> None:
    cfg = {"dataset": "digits", "num-rounds": 3, "seed": 4, **cfg}
    pooled, final, served = _run(tmp_path, cfg, cfg["client-pool"])
    alone, reference, own = _run(tmp_path, {**cfg, "client-pool": 0}, cfg["num-clients"])
    assert _rows(pooled) == _rows(alone)
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    # the pool's nodes really served several clients each, and more clients took part than there are nodes
    assert len(served) <= cfg["client-pool"] < len(set().union(*served.values()))
    assert set().union(*served.values()) == set().union(*own.values())
    assert all(len(v) == 1 for v in own.values())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-clients", "5", "--client-pool", "6"], "client-pool=6 exceeds num-clients=5; allowed: 0 .off. or 1..5"),
        (["--num-clients", "100", "--fraction-train", "0.1", "--client-pool", "9"],
         "client-pool=9 is below the 10 clients a round samples .*allowed: 0 .off. or 10..100"),
        (["--num-clients", "4", "--client-pool", "4", "--strategy", "layerwise"],
         "client-pool=4 cannot serve strategy='layerwise': its clients keep personal layers"),
        (["--client-pool", "-1"], "client-pool=-1 is out of range; allowed: >= 0"),
    ],
)  # fmt: skip
def test_a_bad_pool_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, flags, message) -> None:
    import re

    from fedfuse.cli import main

    out = tmp_path / "run"
    rc = main(["simulate", "--backend", "inline", *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_a_pooled_message_that_names_no_client_is_an_error_reply() -> None:
    """A strategy that does not sample clients itself (no pool ids in its message) gets an error reply naming the
    node, never a silent run on the nodes' own partitions 0..K-1."""
    from clients.client_app import app
    from fedfuse import protocol
    from fedfuse.data import load_dataset
    from fedfuse.experiment import model_for
    from fedfuse.runners.inline import InlineGrid
    from strategies.registry import validate_config

    cfg = validate_config({"num-clients": 6, "client-pool": 2, "fraction-train": 0.3})
    grid = InlineGrid(app, 2)
    model = model_for(cfg, load_dataset("digits"))
    record = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({**cfg, "server-round": 1})})
    msg = grid.create_message(record, MessageType.TRAIN, 2, "1")
    [reply] = grid.send_and_receive([msg])
    assert reply.has_error() and "client-pool=2: the message names no client for node 2" in reply.error.reason
    named = ConfigRecord({**cfg, "server-round": 1, protocol.POOL_NODES: ["1", "2"], protocol.POOL_CLIENTS: [5, 3]})
    ok = grid.create_message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": named}),
                             MessageType.TRAIN, 2, "1")  # fmt: skip
    [reply] = grid.send_and_receive([ok])
    assert not reply.has_error() and reply.content.config_records[protocol.CLIENT_INFO][protocol.PARTITION_ID] == 3
    assert isinstance(reply, Message)


@pytest.mark.ray
def test_a_pool_on_ray_runs_the_inline_run_on_k_supernodes(tmp_path) -> None:
    """Under Flower's simulation engine: 5 SuperNodes serve 40 clients; the run equals the inline run with a node per
    client, and Flower's log shows 5 SuperNodes, not 40."""
    args = ["--dataset", "digits", "--num-clients", "40", "--fraction-train", "0.1", "--rounds", "2", "--seed", "1"]
    results = {}
    for name, extra in (("ray", ["--backend", "ray", "--client-pool", "5"]), ("inline", ["--backend", "inline"])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", "--no-plot", "--out", str(out)]
        proc = subprocess.run([*cmd, *args, *extra], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        results[name] = (json.loads((out / "metrics.json").read_text())["rounds"], torch.load(out / "model.pt"))
    (ray_rows, ray_model), (rows, model) = results["ray"], results["inline"]
    assert _rows(ray_rows) == _rows(rows) and all(torch.equal(ray_model[k], model[k]) for k in model)
    assert ray_rows[-1]["replies"] == 4
    assert "(5 simulated SuperNodes)" in (tmp_path / "ray" / "flower.log").read_text()


def test_the_server_waits_for_the_engines_ray_start_only_on_the_engine(monkeypatch) -> None:
    """Under Flower's simulation engine the ServerApp starts while the engine's thread runs ``ray.init``, which forks
    Ray's head processes with a ``preexec_fn``; the ServerApp waits for it before loading data (a lock held across
    that fork hung pooled runs). Elsewhere (the inline grid) it never waits."""
    import threading
    import time

    import flwr.server.superlink.fleet.vce.vce_api  # noqa: F401 — the engine is in this process
    import ray
    from flwr.superlink.grid import InMemoryGrid

    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import wait_for_ray_start

    up = threading.Event()
    monkeypatch.setattr(ray, "is_initialized", up.is_set)
    threading.Timer(0.4, up.set).start()
    grid = InMemoryGrid.__new__(InMemoryGrid)  # no link state needed: only its type is read
    t0 = time.monotonic()
    wait_for_ray_start(InlineGrid(None, 1))  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 0.1 and not up.is_set()
    wait_for_ray_start(grid)
    assert up.is_set() and time.monotonic() - t0 >= 0.35
    up.clear()
    t0 = time.monotonic()
    wait_for_ray_start(grid, timeout=0.2)  # Ray never comes up: it gives up after the timeout, no hang
    assert 0.2 <= time.monotonic() - t0 < 1.0


def test_a_pool_that_lost_nodes_runs_the_clients_it_can_and_says_which_sit_out(caplog) -> None:
    from strategies.sampling import NodeOrder

    order = NodeOrder()
    order.clients = 10
    with caplog.at_level("WARNING", logger="fedfuse"):
        picked = order.assign([905, 31], [1, 4, 7])
    assert picked == [31, 905] and [order.partition(n) for n in picked] == [1, 4]
    assert "3 clients sampled but 2 SuperNodes connected; clients [7] sit this round out" in caplog.text
    assert order.pool_config(picked) == {"pool-nodes": ["31", "905"], "pool-clients": [1, 4]}
    assert order.assign([905, 31, 2], [0, 9]) == [2, 31] and order.partition(905) == -1  # last batch's map only


def test_a_ray_run_of_many_clients_without_a_pool_is_told_the_pool_it_needs() -> None:
    from fedfuse.cli import _pool_hint

    cfg = {"num-clients": 100_000, "fraction-train": 0.0005, "client-pool": 0}
    assert "--client-pool 50 serves the 50 clients a round samples" in str(_pool_hint(cfg, "ray"))
    assert _pool_hint({**cfg, "client-pool": 50}, "ray") is None  # pooled already
    assert _pool_hint(cfg, "inline") is None  # the inline grid holds no per-node state to poll
    assert _pool_hint({**cfg, "num-clients": 1000}, "ray") is None
    assert _pool_hint({**cfg, "fraction-train": 1.0}, "ray") is None  # every client trains: no smaller pool


def test_the_pool_note_never_comes_with_a_bad_input_line(capsys) -> None:
    from fedfuse.cli import main

    assert main(["simulate", "--num-clients", "100000", "--fraction-train", "0.0001", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num-clients=100000 exceeds" in err[0], err
