import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from fedfuse.cli import main
from fedfuse.errors import ConfigError
from strategies.registry import OPTIONS, validate_config

ROOT = Path(__file__).resolve().parents[1]

BAD_INPUT = [
    (["--dataset", "imagenet"], "dataset='imagenet' is not allowed; allowed: digits, mnist1d"),
    (["--model", "vit"], "model='vit' is not allowed; allowed: mlp, cnn, resnet20, rnn, lstm, gru, torchvision:NAME"),
    (["--strategy", "fedsgd"], "strategy='fedsgd' is not allowed; allowed: fedavg"),
    (["--strategy", "nosuchmodule:Foo"], "strategy='nosuchmodule:Foo' cannot be imported"),
    (["--alpha", "0"], "alpha=0.0 is out of range; allowed: > 0"),
    (["--alpha", "-0.5"], "alpha=-0.5 is out of range; allowed: > 0"),
    (["--num-clients", "100000"], "num-clients=100000 exceeds the 1438 training samples"),
    (["--local-epochs", "0"], "local-epochs=0 is out of range; allowed: >= 1"),
    (["--rounds", "two"], "num-rounds='two' is not a valid int"),
    (["--fraction-train", "1.5"], "fraction-train=1.5 is out of range; allowed: <= 1"),
    # nan passes every comparison and inf is no setting: refused before anything is written
    (["--fraction-train", "nan"], "fraction-train='nan' is not a finite number; allowed: > 0 and <= 1"),
    (["--lr", "inf"], "lr='inf' is not a finite number; allowed: > 0"),
    (["--update-norm-bound", "nan"], "update-norm-bound='nan' is not a finite number; allowed: >= 0"),
    (["--round-timeout", "inf"], "round-timeout='inf' is not a finite number; allowed: > 0"),
    (["--duplicate-cosine", "1.5"], "duplicate-cosine=1.5 is out of range; allowed: <= 1"),
    (["--num-clients", "3", "--attack", "alie:1", "--attackers", "3"], "attackers=3 exceeds the 2 allowed of num-"),
    (["--num-clients", "3", "--attack", "signflip:4", "--attackers", "4"], "attackers=4 exceeds the 3 allowed of num-"),
    (["--attackers", "3"], "attackers=3 has no attack to run (attack is not set); allowed: set attack"),
    (["--attack", "noise:0"], "attack='noise:0' needs a scale > 0 (the noise's norm as a multiple of"),
    (["--dataset", "mnist10k"], "needs --data-root"),
    (["--dataset", "mnist10k", "--data-root", "/no/such/dir"], "data-root='/no/such/dir' is not a directory"),
    (["--partition", "zipf"], "partition='zipf' is not allowed; allowed: iid, dirichlet, pathological, quantity"),
    (["--no-such-flag", "1"], "unrecognized argument --no-such-flag; see fedfuse simulate --help"),
    (["--model", "resnet20", "--group-norm", "5"], "group-norm=5 does not divide the model's channel width(s)"),
    (["--model", "mlp", "--group-norm", "4"], "group-norm=4 does not apply to model='mlp'; allowed with cnn, resnet20"),
    (["--model", "cnn", "--batch-norm", "--group-norm", "4"], "batch-norm and group-norm=4 exclude each other"),
    (["--model", "resnet20", "--width", "20"], "width=20 does not fit model='resnet20'"),
    (["--model", "resnet20", "--strategy", "wb", "--client-widths", "16,24"], "client-widths='16,24': width=24"),
    (["--rounds", "2", "--save-client-models", "3"], "save-client-models=3 is past the run's last round"),
    (["--one-shot", "--client-init", "shared"], "client-init='shared' contradicts --one-shot"),
    (["--client-init", "shared", "--client-init-from", "."], "client-init='shared' contradicts --client-init-from"),
    (
        ["--strategy", "zip", "--model", "cnn", "--group-norm", "4", "--server-data", "64"],
        "'features.1.weight' belongs to GroupNorm",
    ),
    (["--ray-address", "nohost"], "ray-address='nohost' is not HOST:PORT"),
    (["--ray-address", "127.0.0.1:1"], "ray-address='127.0.0.1:1' is not reachable"),
    # no abbreviations; an unknown flag is named with the nearest valid one, or the help to read
    (["--strateg", "wb"], "fedfuse: error: unrecognized argument --strateg; did you mean --strategy?"),
    (["--num-round", "3"], "fedfuse: error: unrecognized argument --num-round; did you mean --rounds?"),
    (["--seed=1", "--lrr=0.1"], "fedfuse: error: unrecognized argument --lrr; did you mean --lr?"),
    (["--frobnicate"], "fedfuse: error: unrecognized argument --frobnicate; see fedfuse simulate --help"),
]


def run_cli(argv: list[str]) -> int:
    """``fedfuse`` in-process; argparse usage errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, capsys) -> None:
    code = run_cli(["simulate", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_existing_results_are_not_overwritten(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("precious")
    proc = subprocess.run(
        [sys.executable, "-m", "fedfuse.cli", "simulate", "--out", str(out), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "already holds results (metrics.json); pass --overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "metrics.json").read_text() == "precious"


def test_run_config_unknown_key_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match="unknown option 'num-round'; did you mean 'num-rounds'"):
        validate_config({"num-round": 3})
    with pytest.raises(ConfigError, match="local-epochs-max=1 is below local-epochs=2"):
        validate_config({"local-epochs": 2, "local-epochs-max": 1})


def test_pyproject_run_config_matches_the_schema() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    run_config = data["tool"]["flwr"]["app"]["config"]
    cfg = validate_config(run_config)  # every key known, every value valid
    assert set(run_config) == set(OPTIONS)
    assert cfg["strategy"] == "fedavg"
    # `flwr run .` gets the CLI's defaults (screening included), except where its results go
    differ = {k for k, v in run_config.items() if v != OPTIONS[k].default}
    assert differ == {"out"}, differ
    components = data["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "strategies.server_app:app", "clientapp": "clients.client_app:app"}


def test_help_lists_allowed_values_and_has_examples(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse would break "fashion-mnist" at its hyphen
    assert run_cli(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    from fedfuse.data import DATASETS
    from fedfuse.models import MODELS

    for flag, values in [
        ("--dataset", DATASETS), ("--partition", OPTIONS["partition"].choices),
        ("--fusion-solver", ("emd", "sinkhorn")), ("--bn-repair", ("none", "reset", "repair")),
        ("--pfn-granularity", ("weight", "neuron")), ("--pfn-fusion", ("average", "wb", "match", "gwb")),
    ]:  # fmt: skip
        i = text.index(f"{flag} NAME ")
        assert f"one of: {', '.join(values)}" in text[i : i + 600], (flag, text[i : i + 600])
    i = text.index("--model STR ")  # any torchvision classifier too: the built-in names and the prefix
    assert all(name in text[i : i + 200] for name in MODELS) and "torchvision:NAME" in text[i : i + 200]
    assert "examples: fedfuse simulate --strategy wb" in text and "--resume runs/wb" in text
    monkeypatch.setenv("COLUMNS", "80")
    assert run_cli(["simulate", "--help"]) == 0
    wide = [ln for ln in capsys.readouterr().out.splitlines() if len(ln) > 80]
    assert not wide, wide


def test_a_round_line_fits_80_columns() -> None:
    from fedfuse.cli import round_line, screening_line

    row = {"round": 999, "central_accuracy": 0.8802, "central_loss": 2.3133, "client_train_loss": 1.5,
           "replies": 99.0, "failures": 0.0, "timeouts": 0.0, "rejected": 0.0, "wall_time": 9999.9}  # fmt: skip
    line = round_line(row)
    assert len(line) <= 80, (len(line), line)
    assert line.startswith("round 999: acc 0.8802") and "ok/err/late/bad 99/0/0/0" in line
    assert screening_line(row) is None  # nothing screened: no second line
    acts = screening_line({**row, "clipped": 2.0, "projected": 3.0, "cut": 1.0})
    assert acts == "  screening: 2 clipped (norm bound), 3 projected (direction guard), 1 cut (influence test)"


def test_resume_reuses_the_backend_of_the_run(tmp_path, monkeypatch) -> None:
    """The backend a run started on is kept in OUT/runtime.json; --resume without --backend reuses it."""
    import fedfuse.cli as cli

    seen: list[str] = []
    monkeypatch.setattr(cli, "preflight", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "_simulate", lambda cfg, args: seen.append(args.backend))
    monkeypatch.setattr(cli, "_early_superlink", lambda args: contextlib.nullcontext())  # nothing runs here
    out = tmp_path / "run"
    assert run_cli(["simulate", "--backend", "inline", "--out", str(out)]) == 0
    assert json.loads((out / "runtime.json").read_text()) == {"backend": "inline"}
    monkeypatch.setattr(cli, "resume_config", lambda args: (validate_config({"out": args.resume}), 0, None))
    assert run_cli(["simulate", "--resume", str(out)]) == 0
    assert run_cli(["simulate", "--resume", str(out), "--backend", "ray"]) == 0  # an explicit flag wins
    assert seen == ["inline", "inline", "ray"]


def test_compare_folder_of_a_strategy_path_has_no_colon() -> None:
    from fedfuse.runners.compare import run_dir_name

    assert run_dir_name("my_pkg.my_mod:MyStrategy") == "my_pkg.my_mod.MyStrategy"
    assert run_dir_name("wb") == "wb"
    assert run_dir_name("wb@client-init-from=runs/a/clients/round1") == "wb@client-init-from=runs_a_clients_round1"


def test_a_round_in_which_every_client_errors_ends_the_run(tmp_path) -> None:
    """CLI path (inline): exit 1, one line naming the round and the clients' error (Flower's log in flower.log);
    what was written stays."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedfuse.cli", "simulate", "--no-progress", "--backend", "inline",
         "--num-clients", "2", "--rounds", "3", "--fail-prob", "1.0", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedfuse:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "INFO" not in proc.stderr and "Starting" in (out / "flower.log").read_text()  # Flower's log: a file
    assert lines[0].startswith("fedfuse: error: round 1: every client failed (2 of 2); first error:"), lines[0]
    assert "RuntimeError: injected fault: partition" in lines[0]
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["failures"] == 2


def test_results_a_killed_overwrite_set_aside_are_reported_then_replaced(tmp_path, monkeypatch, capsys) -> None:
    """`.run.replaced-*-PID` of a dead run: the next run names it; the next --overwrite run deletes it (older
    results it replaces anyway). One of a live process (a run still going) is never touched."""
    import subprocess

    import fedfuse.cli as cli

    monkeypatch.setattr(cli, "preflight", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "_simulate", lambda cfg, args: None)
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".run.replaced-20261203T000000-{dead.pid}"
    live = tmp_path / f".run.replaced-20261203T000001-{os.getpid()}"
    for d in (stale, live):
        d.mkdir()
        (d / "model.pt").write_bytes(b"old")
    assert run_cli(["simulate", "--backend", "inline", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"fedfuse: note: {stale} holds the results a killed --overwrite run set aside" in err
    assert str(live) not in err and stale.is_dir() and live.is_dir()
    assert run_cli(["simulate", "--backend", "inline", "--no-progress", "--out", str(out), "--overwrite"]) == 0
    assert not stale.exists() and live.is_dir()


def test_a_failed_overwrite_says_the_previous_results_stay_and_resume_keeps_its_directory(tmp_path, capsys) -> None:
    """The failing run's own 'results up to it in OUT' is not repeated beside 'the previous results in OUT are kept'
    (both named the same folder); ``--resume DIR --out OTHER`` is refused, not silently run in DIR."""
    out = tmp_path / "run"
    base = ["simulate", "--backend", "inline", "--no-progress", "--num-clients", "3", "--rounds", "1"]
    base += ["--out", str(out)]
    assert run_cli(base) == 0
    before = (out / "model.pt").read_bytes()
    capsys.readouterr()
    assert run_cli([*base, "--overwrite", "--fail-prob", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert f"the run stops; the previous results in {out}/ are kept" in err and "up to it" not in err, err
    assert (out / "model.pt").read_bytes() == before
    assert run_cli(["simulate", "--resume", str(out), "--out", str(tmp_path / "other")]) == 2
    assert "differs from resume=" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_lmc_refuses_abbreviations_too(tmp_path, capsys) -> None:
    code = run_cli(["lmc", "a.pt", "b.pt", "--out", str(tmp_path / "o"), "--alig"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "fedfuse: error: unrecognized argument --alig; did you mean --align?"


def test_the_compare_plot_has_integer_round_ticks(tmp_path) -> None:
    """compare.png / accuracy.png: rounds are whole numbers, so the x-axis of the saved figure has no half rounds."""
    from fedfuse.results import plot_accuracy

    rows = [{"round": r, "central_accuracy": 0.1 + 0.2 * r} for r in range(4)]  # 0..3: matplotlib's default ticks 0.5
    fig = plot_accuracy({"fedavg": rows, "wb": rows}, tmp_path / "compare.png")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert ticks == [0, 1, 2, 3], ticks
