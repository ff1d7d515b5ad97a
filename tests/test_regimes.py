"""benchmarks/regimes.py: equal training budget per row, resumable results file, a real digits smoke run."""

from __future__ import annotations

import json

import pytest

from benchmarks import regimes


def test_every_planned_run_spends_the_same_budget():
    args = regimes.parse(["--budget", "20", "--epochs", "1", "5", "20", "--seeds", "2"])
    todo = regimes.plan(args)
    assert len(todo) == 2 * 2 * 2 * (3 * 8 + 2)  # models × seeds × α × (E × multi-round methods + one-shot)
    for _, _, epochs, method, _ in todo:
        assert epochs * regimes.rounds_for(args.budget, epochs) == 20
        assert method not in regimes.ONE_SHOT or epochs == 20  # one-shot: the whole budget in one round
    with pytest.raises(ValueError, match="must divide"):
        regimes.rounds_for(20, 3)
    with pytest.raises(SystemExit) as exc:
        regimes.parse(["--budget", "20", "--epochs", "1", "3"])
    assert exc.value.code == 2


def test_cuts_narrow_one_model_only():
    args = regimes.parse(["--cut", "cnn:methods=FedAvg,FedWB", "--cut", "cnn:epochs=1,20", "--cut", "cnn:seeds=1"])
    cnn = [t for t in regimes.plan(args) if t[0] == "cnn"]
    assert {t[3] for t in cnn} == {"FedAvg", "FedWB"} and {t[2] for t in cnn} == {1, 20} and {t[4] for t in cnn} == {0}
    assert {t[2] for t in regimes.plan(args) if t[0] == "mlp"} == {1, 5, 20}
    with pytest.raises(SystemExit):
        regimes.parse(["--cut", "cnn:methods=Nope"])


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    calls: list[tuple] = []

    def fake(args, model, alpha, epochs, method, seed):
        calls.append((model, alpha, epochs, method, seed))
        rounds = 1 if method in regimes.ONE_SHOT else regimes.rounds_for(args.budget, epochs)
        return {"accuracy": 0.5 + 0.01 * seed, "seconds": 0.0, "rounds": rounds, "local_epochs": epochs}

    monkeypatch.setattr(regimes, "RESULTS", tmp_path)
    monkeypatch.setattr(regimes, "one_run", fake)
    argv = ["--quick", "--tag", "t"]
    regimes.main(argv)
    planned = len(regimes.plan(regimes.parse(argv)))
    assert len(calls) == planned
    regimes.main(argv)  # everything done: nothing runs again
    assert len(calls) == planned
    path = tmp_path / "regimes-t.json"
    data = json.loads(path.read_text())
    lost = sorted(data["runs"])[0]
    del data["runs"][lost]
    path.write_text(json.dumps(data))
    regimes.main(argv)  # an interrupted run: only the missing one runs
    assert len(calls) == planned + 1 and regimes.run_key(*calls[-1]) == lost
    md = (tmp_path / "regimes-t.md").read_text()
    assert "| mlp | 0.5 | 1 | 2 |" in md and (tmp_path / "regimes-t.png").stat().st_size > 0


def test_quick_smoke_runs_fedavg_and_fedprox_for_real(tmp_path, monkeypatch):
    monkeypatch.setattr(regimes, "RESULTS", tmp_path)
    regimes.main(["--quick", "--tag", "real", "--methods", "FedAvg", "FedProx", "--cut", "mlp:epochs=2"])
    runs = json.loads((tmp_path / "regimes-real.json").read_text())["runs"]
    assert len(runs) == 4  # 2 methods × 2 seeds (--quick)
    for run in runs.values():
        assert 0.0 <= run["accuracy"] <= 1.0 and run["rounds"] * run["local_epochs"] == 2
    assert runs["mlp|a=0.5|E=2|FedProx|s=0"]["config"]["proximal-mu"] == 0.01
