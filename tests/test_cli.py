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
    (["--model", "vit"], "model='vit' is not allowed; allowed: mlp, cnn, resnet20"),
    (["--strategy", "fedsgd"], "strategy='fedsgd' is not allowed; allowed: fedavg"),
    (["--strategy", "nosuchmodule:Foo"], "strategy='nosuchmodule:Foo' cannot be imported"),
    (["--alpha", "0"], "alpha=0.0 is out of range; allowed: > 0"),
    (["--alpha", "-0.5"], "alpha=-0.5 is out of range; allowed: > 0"),
    (["--num-clients", "100000"], "num-clients=100000 exceeds the 1438 training samples"),
    (["--local-epochs", "0"], "local-epochs=0 is out of range; allowed: >= 1"),
    (["--rounds", "two"], "num-rounds='two' is not a valid int"),
    (["--fraction-train", "1.5"], "fraction-train=1.5 is out of range; allowed: <= 1"),
    (["--dataset", "mnist10k"], "needs --data-root"),
    (["--dataset", "mnist10k", "--data-root", "/no/such/dir"], "data-root='/no/such/dir' is not a directory"),
    (["--partition", "zipf"], "partition='zipf' is not allowed; allowed: iid, dirichlet, pathological, quantity"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--ray-address", "nohost"], "ray-address='nohost' is not HOST:PORT"),
    (["--ray-address", "127.0.0.1:1"], "ray-address='127.0.0.1:1' is not reachable"),
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
    components = data["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "strategies.server_app:app", "clientapp": "clients.client_app:app"}
