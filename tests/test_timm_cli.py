"""``--model timm:NAME``: a timm model federated end to end, or one line, exit 2 (timm is optional)."""

from __future__ import annotations

import json

import pytest
import torch

from fedfuse.models import build_model, timm_models
from tests.test_torchvision_cli import refused, run_cli

timm = pytest.importorskip("timm")


@pytest.mark.slow  # ~10 s on 2 shared cores: two clients train one round, then a WB fusion
def test_simulate_federates_a_timm_model_with_alignment(tmp_path) -> None:
    # Prepare: digits (1×8×8, 10 classes), timm's ResNet-10-T with a 1-channel stem, Wasserstein-barycenter fusion
    out = tmp_path / "run"
    argv = ["simulate", "--no-progress", "--backend", "inline", "--dataset", "digits", "--strategy", "wb",
            "--model", "timm:resnet10t", "--num-clients", "2", "--rounds", "1", "--local-epochs", "1",
            "--seed", "0", "--out", str(out)]  # fmt: skip
    # Execute
    code = run_cli(argv)
    # Assert: one round with both replies; the saved model is timm's architecture, trained and fused
    assert code == 0
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["replies"] == 2 and rows[1]["failures"] == 0
    state = torch.load(out / "model.pt", weights_only=True)
    model = build_model("timm:resnet10t", (1, 8, 8), 10, seed=0)  # the run's initial model
    init = model.state_dict()
    assert set(state) == set(init)
    assert not torch.equal(state["fc.weight"], init["fc.weight"])
    model.load_state_dict(state)
    assert torch.isfinite(model.eval()(torch.zeros(1, 1, 8, 8))).all()


def test_timm_models_are_built_for_the_data_and_seeded() -> None:
    # Execute: a CNN (no img_size: timm refuses it, the retry must not change the init) and a ViT on a 16×16 grid
    cnn_a, cnn_b = (build_model("timm:resnet10t", (1, 8, 8), 7, seed=3) for _ in range(2))
    direct = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        direct = timm.create_model("resnet10t", pretrained=False, num_classes=7, in_chans=1)
    vit = build_model("timm:vit_tiny_patch16_224", (3, 32, 32), 5, seed=0)
    # Assert: same seed, same weights, equal to a plain create_model under that seed; shapes follow the data
    sa, sb, sd = cnn_a.state_dict(), cnn_b.state_dict(), direct.state_dict()
    assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sd[k]) for k in sa)
    assert cnn_a(torch.zeros(2, 1, 8, 8)).shape == (2, 7) and cnn_a.training
    assert vit.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("timm:resnet10x", "model='timm:resnet10x' is not a timm model; allowed: timm:NAME with NAME in "),
        ("timm:vit_tiny_patch16_224", "timm:vit_tiny_patch16_224 does not run on (1, 8, 8) inputs: "),
        ("timm:", "model='timm:' is not a timm model"),
    ],
)
def test_bad_timm_model_is_one_line_and_exit_2(model, message, tmp_path, capsys) -> None:
    # Execute: an unknown name, a ViT whose 16×16 patch does not fit digits' 8×8 images, an empty name
    err = refused(model, [], tmp_path, capsys)
    # Assert: exit 2, one line naming the value and what is allowed, nothing written (in refused)
    assert message in err


def test_timm_model_without_timm_says_how_to_install_it(tmp_path, capsys, monkeypatch) -> None:
    # Prepare: timm not importable
    monkeypatch.setattr(timm_models, "_timm", lambda: None)
    # Execute
    err = refused("timm:resnet10t", [], tmp_path, capsys)
    # Assert
    assert "model='timm:resnet10t' needs timm, which is not installed: pip install timm" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "32"], "width=32 does not apply to model='timm:resnet10t', which fixes its own architecture"),
        (["--batch-norm"], "batch-norm=True does not apply to model='timm:resnet10t'"),
        (
            ["--strategy", "heterofl", "--client-widths", "32,64"],
            "client-widths='32,64' needs a model with a hidden width (mlp, cnn, resnet20, rnn, lstm, gru); "
            "model='timm:resnet10t' fixes its own architecture",
        ),
    ],
)
def test_architecture_options_a_library_model_ignores_are_refused(extra, message, tmp_path, capsys) -> None:
    # Execute: options that would silently do nothing on a model whose library fixes the architecture
    err = refused("timm:resnet10t", extra, tmp_path, capsys)
    # Assert
    assert message in err, err
