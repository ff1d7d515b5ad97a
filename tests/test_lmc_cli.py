"""``fedfuse simulate --save-client-models`` and ``fedfuse lmc`` on the saved client models."""

from __future__ import annotations

import json

import pytest
import torch

from fedfuse.cli import main


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    argv = ["simulate", "--backend", "inline", "--no-progress", "--dataset", "digits", "--width", "16"]
    argv += ["--num-clients", "2", "--rounds", "2", "--save-client-models", "2", "--out", str(out)]
    assert run_cli(argv) == 0
    return out


def test_simulate_saves_the_client_models_of_the_chosen_round(saved) -> None:
    assert sorted(p.name for p in (saved / "clients").iterdir()) == ["round2"]
    assert sorted(p.name for p in (saved / "clients" / "round2").iterdir()) == ["partition0.pt", "partition1.pt"]


def test_lmc_writes_json_and_plots(saved, tmp_path) -> None:
    a, b = (str(saved / "clients" / "round2" / f"partition{i}.pt") for i in (0, 1))
    out = tmp_path / "lmc"
    argv = ["lmc", a, b, "--dataset", "digits", "--width", "16", "--samples", "300", "--num-points", "5"]
    assert run_cli([*argv, "--align", "--layerwise", "--cumulative", "--out", str(out)]) == 0
    report = json.loads((out / "lmc.json").read_text())
    assert report["full"]["before"]["max_loss"] >= 0.0 and report["full"]["after"] is not None
    assert [g["group"] for g in report["layerwise"]["groups"]] == ["net.1", "net.3", "net.5"]
    assert set(report["cumulative"]) == {"shallow", "deep", "random"}
    for res in report["cumulative"].values():  # all groups interpolated = the full path
        assert res["steps"][-1]["stats"]["max_loss"] == pytest.approx(res["full"]["max_loss"], abs=1e-6)
    for name in ("curve.png", "layerwise.png", "cumulative.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["/no/such.pt"], "'/no/such.pt' is not a file"),
        (["MODEL", "--width", "32"], "does not fit the model"),
        (["MODEL", "--model", "vit"], "model='vit' is not allowed"),
        (["NAN", "--align"], "model B 'NAN': 'net.1.weight' holds 1 NaN or inf values; allowed: finite"),
    ],
)
def test_lmc_bad_input_is_one_line_and_exit_2(saved, tmp_path, capsys, extra, message) -> None:
    model = str(saved / "model.pt")
    b = model if extra[0] == "MODEL" else extra[0]
    if b == "NAN":  # a diverged model: alignment's assignment solver would raise on it
        state = torch.load(model)
        state["net.1.weight"][0, 0] = float("nan")
        torch.save(state, b := str(tmp_path / "nan.pt"))
        message = message.replace("'NAN'", repr(b))
    argv = ["lmc", model, b, "--dataset", "digits", "--out", str(tmp_path / "x"), *extra[1:]]
    if "--width" not in argv:
        argv += ["--width", "16"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_lmc_prints_the_aligned_barrier_and_keeps_results_unless_overwrite(saved, tmp_path, capsys) -> None:
    a, b = (str(saved / "clients" / "round2" / f"partition{i}.pt") for i in (0, 1))
    out = tmp_path / "lmc"
    argv = ["lmc", a, b, "--dataset", "digits", "--width", "16", "--samples", "200", "--num-points", "3"]
    assert run_cli([*argv, "--align", "--layerwise", "--out", str(out)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("full barrier"))
    report = json.loads((out / "lmc.json").read_text())
    assert f"after aligning B to A (weight matching): {report['full']['after']['max_loss']:.4f}" in line
    before = (out / "lmc.json").read_bytes()
    assert run_cli([*argv, "--out", str(out)]) == 2  # a previous lmc: kept
    assert "is not empty; pass --overwrite" in capsys.readouterr().err and (out / "lmc.json").read_bytes() == before
    assert run_cli([*argv, "--out", str(out), "--overwrite"]) == 0  # replaced; no plot of the old run outlives it
    assert sorted(p.name for p in out.iterdir()) == ["curve.png", "lmc.json"]
    (out / "notes.txt").write_text("someone else's")
    assert run_cli([*argv, "--out", str(out), "--overwrite"]) == 2
    assert "holds 'notes.txt', not only a previous lmc's" in capsys.readouterr().err


def test_lmc_takes_a_factory_model_and_npz_test_data(saved, tmp_path, monkeypatch) -> None:
    """As ``fedfuse merge`` does: ``--model package.module:factory`` and ``--test-data FILE.npz``; the barrier
    equals the one measured on the same samples through ``--dataset``."""
    import numpy as np

    from fedfuse.data import load_dataset

    (tmp_path / "my_nets.py").write_text(
        "from fedfuse import build_model\n\ndef net():\n    return build_model('mlp', (1, 8, 8), 10, width=16)\n"
    )
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("digits")
    np.savez(tmp_path / "t.npz", x=ds.x_test[:200].reshape(200, -1).numpy(), y=ds.y_test[:200].numpy())
    from fedfuse import build_model, train

    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    for seed, path in ((1, a), (2, b)):  # trained apart: a barrier well above 0
        net = build_model("mlp", (1, 8, 8), 10, width=16, seed=seed)
        train(net, ds.x_train, ds.y_train, epochs=2, lr=0.05, momentum=0.9, seed=seed)
        torch.save(net.state_dict(), path)
    common = ["lmc", a, b, "--num-points", "3"]
    assert run_cli([*common, "--model", "my_nets:net", "--test-data", "t.npz", "--out", "f"]) == 0
    assert run_cli([*common, "--dataset", "digits", "--width", "16", "--samples", "200", "--out", "d"]) == 0
    f, d = (json.loads((tmp_path / o / "lmc.json").read_text()) for o in ("f", "d"))
    assert f["samples"] == 200 and f["full"]["before"]["max_loss"] > 0.1
    assert f["full"]["before"]["max_loss"] == pytest.approx(d["full"]["before"]["max_loss"], rel=1e-5)
