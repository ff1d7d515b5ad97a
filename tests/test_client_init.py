"""Clients that start apart (``client-init=own``, ``client-init-from``, ``one-shot``): round 1 from each client's own
model, later rounds ordinary FL from the fused one; the same under the ``flwr run .`` entry point and with a node's
``init-from``; exact resume; bad input refused before anything is written.

The start of each client's local training is observed directly: ``local_train`` is wrapped to copy the model it is
handed, and the ClientApp is wrapped to know which partition and round it serves (digits, MLP of width 16, inline).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
from flwr.app import Context, Message

import clients.client_app as client_app
from fedfuse.experiment import dataset_for, model_for, own_init_seed
from fedfuse.runners.inline import InlineGrid
from strategies.registry import validate_config
from strategies.server_app import run_server
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"dataset": "digits", "model": "mlp", "width": 16, "num-clients": 3, "local-epochs": 1, "seed": 0}
State = dict[str, torch.Tensor]


class Recorder:
    """Wraps the ClientApp: per (round, partition), the model a client was sent and the one it started training."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: dict[tuple[int, int], State] = {}
        self.start: dict[tuple[int, int], State] = {}
        self._at: tuple[int, int] = (0, -1)
        real = client_app.local_train

        def local_train(cfg: Any, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            self.start[self._at] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return real(cfg, model, *args, **kwargs)

        monkeypatch.setattr(client_app, "local_train", local_train)

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type == "train":
            cfg = next(iter(message.content.config_records.values()))
            self._at = (int(cfg["server-round"]), int(context.node_config["partition-id"]))
            self.sent[self._at] = next(iter(message.content.array_records.values())).to_torch_state_dict()
        return client_app.app(message, context)


def equal(a: State, b: State) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def run(rec: Recorder, tmp_path: Path, **cfg: Any) -> tuple[list[dict[str, Any]], InlineGrid]:
    config = validate_config({**SMALL, "out": str(tmp_path / "run"), **cfg})
    grid = InlineGrid(rec, config["num-clients"])
    run_server(grid, config)
    return json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"], grid


def test_own_inits_start_apart_in_round_1_then_from_the_fused_model(tmp_path, monkeypatch) -> None:
    rec = Recorder(monkeypatch)
    run(rec, tmp_path, **{"client-init": "own", "num-rounds": 2, "strategy": "wb"})
    cfg = validate_config(SMALL)
    ds = dataset_for(cfg)
    starts = [rec.start[(1, p)] for p in range(3)]
    for p in range(3):  # round 1: the client's own seed-derived init, not the global model it was sent
        assert equal(starts[p], model_for(cfg, ds, seed=own_init_seed(cfg, p)).state_dict())
        assert not equal(starts[p], rec.sent[(1, p)])
    assert not equal(starts[0], starts[1]) and not equal(starts[1], starts[2]) and not equal(starts[0], starts[2])
    fused = rec.sent[(2, 0)]  # round 2: every client starts from the fused model of round 1
    assert not any(equal(fused, s) for s in starts)
    for p in range(3):
        assert equal(rec.start[(2, p)], rec.sent[(2, p)]) and equal(rec.sent[(2, p)], fused)


def test_shared_init_starts_every_client_from_the_global_model(tmp_path, monkeypatch) -> None:
    rec = Recorder(monkeypatch)
    run(rec, tmp_path, **{"num-rounds": 1})
    assert all(equal(rec.start[(1, p)], rec.sent[(1, p)]) for p in range(3))


def _files(directory: Path, seeds: list[int]) -> list[State]:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = validate_config(SMALL)
    states = [model_for(cfg, dataset_for(cfg), seed=s).state_dict() for s in seeds]
    for p, state in enumerate(states):
        torch.save(state, directory / f"partition{p}.pt")
    return states


def test_client_init_from_starts_each_client_from_its_own_file(tmp_path, monkeypatch) -> None:
    states = _files(tmp_path / "sites", [101, 102, 103])
    rec = Recorder(monkeypatch)
    run(rec, tmp_path, **{"client-init-from": str(tmp_path / "sites"), "num-rounds": 1})
    for p in range(3):
        assert equal(rec.start[(1, p)], states[p])


def test_a_nodes_init_from_wins_in_an_apart_run_and_is_unused_in_a_shared_one(tmp_path, monkeypatch, caplog) -> None:
    (state,) = _files(tmp_path / "node", [77])
    rec = Recorder(monkeypatch)
    config = validate_config({**SMALL, "client-init": "own", "num-rounds": 1, "out": str(tmp_path / "a")})
    grid = InlineGrid(rec, 3)
    grid.contexts[2].node_config["init-from"] = str(tmp_path / "node" / "partition0.pt")  # node 2 = partition 1
    run_server(grid, config)
    assert equal(rec.start[(1, 1)], state)
    assert equal(rec.start[(1, 0)], model_for(config, dataset_for(config), seed=own_init_seed(config, 0)).state_dict())
    shared = validate_config({**config, "client-init": "shared", "out": str(tmp_path / "b")})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        run_server(grid, shared)
    assert equal(rec.start[(1, 1)], rec.sent[(1, 1)])
    assert "node config init-from=" in caplog.text and "client-init='shared'" in caplog.text


def test_one_shot_then_fl_rounds_does_not_reinitialise(tmp_path, monkeypatch) -> None:
    """--one-shot --rounds 3 = one one-shot round, then FL from the fused model (it used to re-initialise every
    client every round: digits, round 2 at 0.209); --one-shot is an alias of --client-init own."""
    rec = Recorder(monkeypatch)
    rows, _ = run(rec, tmp_path, **{"one-shot": True, "num-rounds": 3, "strategy": "wb", "width": 0})
    acc = [r["central_accuracy"] for r in rows]
    assert acc[2] > acc[1] + 0.1 and acc[3] > acc[1] + 0.1 and min(acc[2:]) > 0.4, acc
    assert all(equal(rec.start[(r, p)], rec.sent[(r, p)]) for r in (2, 3) for p in range(3))
    rec2 = Recorder(monkeypatch)
    alias = tmp_path / "alias"
    rows_own, _ = run(rec2, alias, **{"client-init": "own", "num-rounds": 3, "strategy": "wb", "width": 0})
    assert [r["central_accuracy"] for r in rows_own] == acc


def test_resume_after_round_1_of_an_apart_run_is_bit_identical(tmp_path, monkeypatch) -> None:
    config = {**SMALL, "client-init": "own", "num-rounds": 3, "strategy": "wb"}
    ref = validate_config({**config, "out": str(tmp_path / "ref")})
    run_server(InlineGrid(client_app.app, 3), ref)

    class Stop(Exception):
        pass

    def stop_after_round_1(row: dict[str, Any]) -> None:
        if row["round"] == 1:
            raise Stop

    cut = validate_config({**config, "out": str(tmp_path / "cut")})
    with pytest.raises(Stop):
        run_server(InlineGrid(client_app.app, 3), cut, stop_after_round_1)
    assert not (tmp_path / "cut" / "model.pt").exists()
    run_server(InlineGrid(client_app.app, 3), cut, resume=True)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("ref", "cut"))
    assert equal(a, b)


def test_resume_past_round_1_no_longer_needs_the_init_files(tmp_path) -> None:
    """Only round 1 reads ``client-init-from``: a run cut after it resumes (CLI) with the folder gone."""
    sites = tmp_path / "sites"
    _files(sites, [101, 102, 103])
    cut = validate_config({**SMALL, "client-init-from": str(sites), "num-rounds": 2, "out": str(tmp_path / "cut")})

    class Stop(Exception):
        pass

    def stop_after_round_1(row: dict[str, Any]) -> None:
        if row["round"] == 1:
            raise Stop

    with pytest.raises(Stop):
        run_server(InlineGrid(client_app.app, 3), cut, stop_after_round_1)
    for f in sites.iterdir():
        f.unlink()
    sites.rmdir()
    assert run_cli(["simulate", "--resume", str(tmp_path / "cut"), "--backend", "inline", "--no-progress"]) == 0
    assert [r["round"] for r in json.loads((tmp_path / "cut" / "metrics.json").read_text())["rounds"]] == [0, 1, 2]


def test_the_flwr_run_entry_point_passes_client_init_to_the_clientapp(tmp_path, monkeypatch) -> None:
    """``flwr run .``: the ServerApp's main gets pyproject's [tool.flwr.app.config] with --run-config overrides
    as its Context.run_config; the key reaches the ClientApp (round-1 starts are the clients' own)."""
    from strategies.server_app import main as flwr_run_main

    run_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config["client-init"] == "shared" and run_config["client-init-from"] == ""
    run_config |= {"client-init": "own", "num-clients": 2, "num-rounds": 1, "width": 16, "out": str(tmp_path / "r")}
    rec = Recorder(monkeypatch)
    context = Context(run_id=1, node_id=0, node_config={}, state=None, run_config=run_config)  # type: ignore[arg-type]
    flwr_run_main(InlineGrid(rec, 2), context)
    assert (tmp_path / "r" / "model.pt").exists()
    assert not equal(rec.start[(1, 0)], rec.sent[(1, 0)]) and not equal(rec.start[(1, 0)], rec.start[(1, 1)])


def test_saved_clients_of_other_widths_round_trip_into_client_init_from(tmp_path) -> None:
    """--save-client-models under --client-widths keeps every client, each at its own width (they were dropped:
    checked against the global model's shapes), and those files start the next run's clients apart."""
    flags = ["simulate", "--backend", "inline", "--no-progress", "--num-clients", "3", "--rounds", "1",
             "--strategy", "wb", "--client-widths", "16,32"]  # fmt: skip
    assert run_cli([*flags, "--one-shot", "--save-client-models", "1", "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "clients" / "round1"
    widths = [torch.load(saved / f"partition{p}.pt")["net.1.weight"].shape[0] for p in range(3)]
    assert widths == [16, 32, 16]
    assert run_cli([*flags, "--client-init-from", str(saved), "--out", str(tmp_path / "b")]) == 0


def refused(extra: list[str], tmp_path: Path, capsys) -> str:
    """``fedfuse simulate`` with ``extra``: exit 2, one line, no traceback, nothing written; returns the line."""
    code = run_cli(["simulate", "--backend", "inline", "--num-clients", "3", *extra, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def test_bad_client_init_inputs_exit_2_with_one_line(tmp_path, capsys) -> None:
    good = tmp_path / "good"
    _files(good, [1, 2, 3])
    line = refused(["--client-init", "mine"], tmp_path, capsys)
    assert "client-init='mine' is not allowed; allowed: shared, own" in line
    line = refused(["--client-init-from", str(tmp_path / "none")], tmp_path, capsys)
    assert "is not a directory; allowed: a directory with partition0.pt .. partition2.pt" in line
    line = refused(["--client-init-from", str(good), "--num-clients", "5"], tmp_path, capsys)
    assert "lacks partition3.pt and 1 more; num-clients=5 needs" in line
    line = refused(["--client-init-from", str(good), "--width", "8"], tmp_path, capsys)  # files are width 16
    assert "partition0.pt' does not fit the model: 'net.1.weight' has shape (16, 64), the model's is (8, 64)" in line
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    for p in range(3):  # a pickled module, not a state dict: weights_only loading refuses it, nothing runs
        torch.save(torch.nn.Linear(2, 2), code_dir / f"partition{p}.pt")
    line = refused(["--client-init-from", str(code_dir), "--width", "16"], tmp_path, capsys)
    assert "partition0.pt' holds pickled code or objects, not just tensors; refused" in line


def test_compare_entries_give_one_run_its_own_options(tmp_path, capsys) -> None:
    from fedfuse.runners.compare import compare_entries, option_flags

    entries = compare_entries("fedavg, wb,fedavg@client-init=shared@one-shot=false")
    assert entries == [("fedavg", "fedavg", {}), ("wb", "wb", {}),
                       ("fedavg@client-init=shared@one-shot=false", "fedavg",
                        {"client-init": "shared", "one-shot": "false", "client-init-from": ""})]  # fmt: skip
    # an entry's shared start overrides a global --one-shot / --client-init-from (never both at once)
    assert compare_entries("wb,fedavg@client-init=shared")[1][2] == {
        "client-init": "shared", "one-shot": "false", "client-init-from": ""}  # fmt: skip
    # a value with commas stays whole: a piece that cannot start an entry continues the previous value
    assert compare_entries("fedavg-lora,hetlora@lora-ranks=2,4,svd-lora@lora-targets=net.1:4,net.3:8,my.mod:Cls") == [
        ("fedavg-lora", "fedavg-lora", {}),
        ("hetlora@lora-ranks=2,4", "hetlora", {"lora-rank": "0", "lora-ranks": "2,4"}),
        ("svd-lora@lora-targets=net.1:4,net.3:8", "svd-lora", {"lora-targets": "net.1:4,net.3:8"}),
        ("my.mod:Cls", "my.mod:Cls", {})]  # fmt: skip
    assert option_flags({"client-init": "shared", "one-shot": False, "num-rounds": 3}) == [
        "--client-init", "shared", "--no-one-shot", "--rounds", "3"]  # fmt: skip
    line = refused(["--compare", "fedavg,fedavg@client-init"], tmp_path, capsys)
    assert "compare entry 'fedavg@client-init': 'client-init' is not allowed; allowed: STRATEGY@key=value" in line
    line = refused(["--compare", "fedavg,fedavg@client-init=mine"], tmp_path, capsys)
    assert "client-init='mine' is not allowed; allowed: shared, own" in line
    assert "needs at least two different" in refused(["--compare", "wb,wb"], tmp_path, capsys)
    line = refused(["--compare", "fedavg,fedavg@bn-repair=repair"], tmp_path, capsys)
    assert "bn-repair='repair' needs strategy" in line


def test_a_liar_among_sites_trained_apart_answers_to_the_fused_model(tmp_path, caplog) -> None:
    """Round 1 from own inits has no shared start, so no update for the guard or the influence test to measure; a
    site claiming 9.9 × the median's examples with junk (``evade``) took the fused model to chance (0.100). Its claim
    now answers to the server's examples on the fusion itself (fedfuse.influence.claim_test): kept at a tenth of
    the median's weight, the fusion lands by the run without it (0.329 vs 0.320, seed 0, wb, 1 of 5)."""
    from fedfuse.results import load_metrics

    accs = {}
    with caplog.at_level("WARNING", logger="fedfuse"):
        for name, extra in (("on", []), ("off", ["--influence-z", "0"]), ("absent", None)):
            attack = ["--attack", "num-examples:nan" if extra is None else "evade:0.4", "--attackers", "1"]
            argv = ["simulate", "--backend", "inline", "--no-progress", "--num-clients", "5", "--rounds", "1",
                    "--client-init", "own", "--strategy", "wb", *attack, *(extra or [])]  # fmt: skip
            argv += ["--out", str(tmp_path / name)]
            assert run_cli(argv) == 0
            accs[name] = load_metrics(tmp_path / name)["rounds"][-1]["central_accuracy"]
    assert accs["on"] > accs["absent"] - 0.03 and accs["off"] < accs["absent"] - 0.15, accs
    assert any("its claimed weight (9.9 × the round's median)" in r.getMessage() for r in caplog.records)


def test_a_liar_among_batch_norm_sites_is_cut_and_cannot_set_repairs_targets(tmp_path, caplog) -> None:
    """The same liar in a BatchNorm CNN with federated REPAIR: its negative variances used to turn the model NaN
    (now a malformed reply); clamped at 0 they still took REPAIR's targets (a std of 10⁶ from one site: loss 3.6e6,
    0.098). Trial fusions get REPAIR on the server's examples, so the claim is cut, and each unit's statistics
    are bounded at 10 × the sites' median (fedfuse.align.repair.bound_statistics)."""
    from fedfuse.results import load_metrics

    accs = {}
    with caplog.at_level("WARNING", logger="fedfuse"):
        for name, attack in (("on", "evade:0.4"), ("absent", "num-examples:nan")):
            argv = ["simulate", "--backend", "inline", "--no-progress", "--num-clients", "5", "--rounds", "1",
                    "--client-init", "own", "--strategy", "wb", "--model", "cnn", "--batch-norm", "--bn-repair",
                    "repair", "--attack", attack, "--attackers", "1", "--out", str(tmp_path / name)]  # fmt: skip
            assert run_cli(argv) == 0
            accs[name] = load_metrics(tmp_path / name)["rounds"][-1]["central_accuracy"]
    messages = [r.getMessage() for r in caplog.records]
    assert accs["on"] > accs["absent"] - 0.05, accs
    assert any("its claimed weight (9.9 × the round's median)" in m for m in messages)
    bounded = [m for m in messages if "bounded at 10 × the clients' median" in m]
    assert bounded == ["round 1: bn-repair=repair: statistics of 1 client(s) bounded at 10 × the clients' median"]
    # once for the round, not once per statistics (Jacobi) round
