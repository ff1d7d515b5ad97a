"""``fedfuse simulate --save-client-models`` and ``fedfuse lmc`` on the saved client models."""

from __future__ import annotations

import json

import pytest

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
    ],
)
def test_lmc_bad_input_is_one_line_and_exit_2(saved, tmp_path, capsys, extra, message) -> None:
    model = str(saved / "model.pt")
    b = model if extra[0] == "MODEL" else extra[0]
    argv = ["lmc", model, b, "--dataset", "digits", "--out", str(tmp_path / "x"), *extra[1:]]
    if "--width" not in argv:
        argv += ["--width", "16"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
