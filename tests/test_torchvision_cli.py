"""``fedfuse simulate --model torchvision:NAME``: a torchvision classifier federated end to end, or one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from fedfuse.cli import main
from fedfuse.models import build_model


def run_cli(argv: list[str]) -> int:
    """``fedfuse`` in-process; argparse usage errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def refused(model: str, extra: list[str], tmp_path, capsys) -> str:
    """``fedfuse simulate`` on digits with ``--model model`` + ``extra``: asserts exit 2, one line, no traceback and
    nothing written; returns that line."""
    code = run_cli(["simulate", "--backend", "inline", "--dataset", "digits", "--model", model, *extra,
                    "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.slow  # ~20 s on 2 shared cores: two clients train one round, then a fusion
def test_simulate_federates_a_torchvision_model_with_alignment(tmp_path) -> None:
    # Prepare: digits (1×8×8, 10 classes), ShuffleNetV2-x0.5 rebuilt for 1 channel, weight-matching fusion
    out = tmp_path / "run"
    argv = ["simulate", "--no-progress", "--backend", "inline", "--dataset", "digits", "--strategy", "wb",
            "--model", "torchvision:shufflenet_v2_x0_5", "--num-clients", "2", "--rounds", "1",
            "--local-epochs", "1", "--seed", "0", "--out", str(out)]  # fmt: skip
    # Execute
    code = run_cli(argv)
    # Assert: one round with both clients' replies, and the saved model is the torchvision architecture
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["replies"] == 2 and rows[1]["failures"] == 0
    state = torch.load(out / "model.pt", weights_only=True)
    model = build_model("torchvision:shufflenet_v2_x0_5", (1, 8, 8), 10, seed=0)  # the run's initial model
    init = model.state_dict()
    assert set(state) == set(init)
    assert not torch.equal(state["fc.weight"], init["fc.weight"])  # trained and fused
    model.load_state_dict(state)
    assert torch.isfinite(model.eval()(torch.zeros(1, 1, 8, 8))).all()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("torchvision:resnet9", "model='torchvision:resnet9' is not a torchvision classification model; allowed: "),
        (
            "torchvision:squeezenet1_1",
            "torchvision:squeezenet1_1 does not run on (1, 8, 8) inputs (it needs at least 24×24 images)",
        ),
    ],
)
def test_bad_torchvision_model_is_one_line_and_exit_2(model, message, tmp_path, capsys) -> None:
    # Execute: an unknown builder name, and a model too deep for the digits' 8×8 images
    err = refused(model, [], tmp_path, capsys)
    # Assert: exit 2, one line naming the value and what is allowed, nothing written (in refused)
    assert message in err
