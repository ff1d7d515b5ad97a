"""Per-round costs: --eval-every, --checkpoint-every (resume continues after the last checkpoint), the ``server_s``
metric, and the one-reduction finite check of client updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfuse.checkpoint import load_checkpoint
from fedfuse.results import load_metrics
from fedfuse.runners.inline import run_inline
from fedfuse.validation import check_update, non_finite
from strategies.registry import validate_config

TIMINGS = ("wall_time", "aggregate_s", "server_s")


class _Stop(Exception):
    pass


def _cfg(out, **extra) -> dict:
    return validate_config(
        {"dataset": "digits", "model": "mlp", "width": 16, "num-clients": 2, "num-rounds": 4, "seed": 1,
         "out": str(out), **extra}
    )  # fmt: skip


def _results(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in load_metrics(out)["rounds"]]


def test_eval_and_checkpoint_every_then_resume_from_the_last_checkpoint(tmp_path) -> None:
    ref = _cfg(tmp_path / "ref", **{"eval-every": 3, "checkpoint-every": 2})
    run_inline(ref)
    rows = load_metrics(tmp_path / "ref")["rounds"]
    evaluated = [r["round"] for r in rows if not math.isnan(r["central_accuracy"])]
    assert evaluated == [0, 3, 4]  # round 0, every 3rd, and the last
    assert all(r["server_s"] > 0 for r in rows[1:])

    def stop_at_3(row: dict) -> None:
        if row["round"] == 3:
            raise _Stop

    cut = _cfg(tmp_path / "cut", **{"eval-every": 3, "checkpoint-every": 2})
    with pytest.raises(_Stop):
        run_inline(cut, stop_at_3)
    assert load_checkpoint(tmp_path / "cut")["round"] == 2  # round 3 was not checkpointed
    run_inline(cut, resume=True)
    a, b = torch.load(tmp_path / "ref" / "model.pt"), torch.load(tmp_path / "cut" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _results(tmp_path / "cut") == _results(tmp_path / "ref")


def test_non_finite_names_the_first_bad_tensor_and_its_count() -> None:
    state = {"a": torch.ones(3), "n": torch.arange(4), "b": torch.ones(2, 2), "c": torch.zeros(5)}
    assert non_finite(state) is None
    state["b"][0, 1], state["b"][1, 1] = float("nan"), float("-inf")
    state["c"][0] = float("inf")
    assert non_finite(state) == ("b", 2)
    assert check_update(state, {k: torch.zeros_like(v) for k, v in state.items()}, 5) == "b: 2 non-finite value(s)"
    huge = {"h": torch.full((4,), 3e38), "d": torch.full((3,), 1e308, dtype=torch.float64)}
    assert non_finite(huge) is None  # finite values whose sum overflows are not mistaken for inf
    assert torch.get_num_threads() >= 1


def test_a_negative_running_variance_is_a_malformed_update() -> None:
    """σ² < 0 is no statistic a client can measure, and BatchNorm turns it into NaN outputs for every example."""
    ref = {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4), "w": torch.zeros(4)}
    assert check_update({**ref, "w": -torch.ones(4)}, ref, 5) is None  # negative weights are fine
    assert check_update({**ref, "bn.running_var": torch.tensor([1.0, 0.0, 2.0, 3.0])}, ref, 5) is None
    bad = {**ref, "bn.running_var": torch.tensor([1.0, -0.5, 2.0, -3.0])}
    assert check_update(bad, ref, 5) == "bn.running_var: 2 negative value(s) (a running variance is >= 0)"


def test_fedavg_clients_train_without_a_proximal_term(tmp_path) -> None:
    """The run config holds FedProx's ``proximal-mu`` (default 0.01) for every strategy; FedAvg's clients must not
    receive it: one inline round equals FedAvg of plain local training (no proximal term), bit for bit."""
    from fedfuse.experiment import client_data, dataset_for, local_plan, local_train, model_for
    from fedfuse.state import torch_threads, weighted_average

    cfg = _cfg(tmp_path, **{"num-rounds": 1})
    run_inline(cfg)
    ds = dataset_for(cfg)
    start = model_for(cfg, ds).state_dict()
    states, weights = [], []
    for pid in range(2):
        model = model_for(cfg, ds)
        model.load_state_dict(start)
        x, y = client_data(cfg, pid, 2)
        with torch_threads(1):  # as the ClientApp trains (client-threads 1): bit for bit on a multi-threaded torch too
            weights.append(local_train(cfg, model, x, y, local_plan(cfg, pid, 1, len(x))).num_examples)
        states.append(model.state_dict())
    expected, got = weighted_average(states, weights), torch.load(tmp_path / "model.pt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_decode_arrays_equals_flowers_decoding_and_falls_back_where_it_cannot_read() -> None:
    from flwr.app import Array, ArrayRecord

    from fedfuse.replies import decode_arrays

    # Prepare: dtypes, 0-d, empty and Fortran-ordered arrays; the same header twice (the cached path)
    state = {"w": torch.randn(7, 5), "w2": torch.randn(7, 5), "i": torch.arange(4), "s": torch.tensor(2.5),
             "e": torch.zeros(0, 3), "h": torch.randn(3).half(), "b": torch.tensor([True, False])}  # fmt: skip
    record = ArrayRecord(state)
    record["f"] = Array(np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    # Execute
    want, got = record.to_torch_state_dict(), decode_arrays(record)
    # Assert
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k
    got["w"].add_(1.0)  # a fresh, writable tensor: the record is unchanged
    assert torch.equal(decode_arrays(record)["w"], want["w"])
    short = ArrayRecord({"w": torch.randn(4, 4)})
    short["w"] = Array(dtype="float32", shape=(4, 4), stype="numpy.ndarray", data=short["w"].data[:-8])
    with pytest.raises(ValueError):  # too few bytes: numpy's own reader, which refuses it
        decode_arrays(short)


def test_plot_off_writes_every_result_but_the_plot(tmp_path) -> None:
    run_inline(_cfg(tmp_path / "r", **{"num-rounds": 1, "plot": False}))
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"metrics.json", "metrics.csv", "model.pt"}
    assert not (tmp_path / "r" / "accuracy.png").exists()


def test_a_nonfinite_central_loss_is_named_once(tmp_path, capsys, monkeypatch):
    """A global model whose weights are finite (they pass the aggregate's check) but whose test loss is NaN gets one
    warning line that names the round and the lr, from the CLI (stderr) and the ServerApp (Flower's log), not one
    per round; a round --eval-every skips (loss and accuracy NaN) is not one."""
    import strategies.server_app as server_app
    from fedfuse.cli import main
    from fedfuse.results import divergence_warning

    real, calls = server_app.evaluate, []

    def evaluate(model, x, y):  # round 0 as it is, later rounds: finite weights, NaN loss
        calls.append(1)
        loss, acc = real(model, x, y)
        return (loss, acc) if len(calls) == 1 else (math.nan, acc)

    monkeypatch.setattr(server_app, "evaluate", evaluate)
    out = tmp_path / "run"
    rc = main(["simulate", "--dataset", "digits", "--model", "mlp", "--width", "16", "--num-clients", "2", "--rounds",
               "3", "--backend", "inline", "--no-progress", "--lr", "0.07", "--out", str(out)])  # fmt: skip
    assert rc == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "central test loss" in line]
    cfg = {"lr": 0.07}
    assert err == [f"fedfuse: warning: {divergence_warning(load_metrics(out)['rounds'][1], cfg)}"], err
    assert "round 1: the global model's central test loss is nan" in err[0] and "--lr (now 0.07)" in err[0]
    assert "--max-grad-norm 1 or a lower" in err[0]
    assert (out / "flower.log").read_text().count("central test loss is nan") == 1
    assert divergence_warning({"round": 4, "central_loss": math.nan, "central_accuracy": math.nan}, cfg) is None
    assert divergence_warning({"round": 4, "central_loss": 2.3, "central_accuracy": 0.1}, cfg) is None
    assert "loss is inf" in divergence_warning({"round": 4, "central_loss": math.inf, "central_accuracy": 0.1}, cfg)
    clipped = divergence_warning({"round": 4, "central_loss": math.inf, "central_accuracy": 0.1},
                                 {"lr": 0.1, "max-grad-norm": 1.0})  # fmt: skip
    assert "--max-grad-norm" not in clipped and "a lower --lr (now 0.1)" in clipped


def test_nonfinite_client_updates_without_an_attack_are_named_as_divergence(tmp_path, capsys):
    """Clients whose local training overflows (lr 1e30) send non-finite updates; with no attack simulated the run
    says once that training diverges and what to try (gradient clipping, a lower lr), on stderr and in Flower's log.
    With an attack simulated, a non-finite update is the attacker's and no such advice is given."""
    from fedfuse.cli import main
    from fedfuse.results import divergence_warning

    out = tmp_path / "run"
    rc = main(["simulate", "--dataset", "digits", "--model", "mlp", "--width", "16", "--num-clients", "3", "--rounds",
               "2", "--backend", "inline", "--no-progress", "--lr", "1e30", "--out", str(out)])  # fmt: skip
    assert rc == 1  # no round produced a model: one line, results kept
    err = [line for line in capsys.readouterr().err.splitlines() if "diverging" in line]
    assert err == [
        "fedfuse: warning: round 1: 3 client update(s) had non-finite values and were left out (no attack is "
        "simulated in this run): local training is diverging, try --max-grad-norm 1 or a lower --lr (now 1e+30)"
    ], err
    assert (out / "flower.log").read_text().count("local training is diverging") == 1
    row = {"round": 1, "central_loss": 2.3, "central_accuracy": 0.1, "nonfinite": 1.0}
    assert divergence_warning(row, {"lr": 0.05, "attack": "scale:1e6"}) is None
    assert "1 client update(s)" in divergence_warning(row, {"lr": 0.05, "attack": "none"})
