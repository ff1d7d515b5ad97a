import pytest
import torch

from fedfuse.errors import ConfigError
from fedfuse.models import MODELS, build_model

# every data set's input shape: digits, mnist1d, (fashion-)mnist / mnist10k, cifar10
SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("dataset", SHAPES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_runs_on_every_data_set(name: str, dataset: str) -> None:
    shape = SHAPES[dataset]
    model = build_model(name, shape, 10, width=16 if name != "resnet20" else 16, batch_norm=True, seed=0)
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 10)
    out.sum().backward()  # differentiable end to end
    assert all(p.grad is not None for p in model.parameters())


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("mlp", (1, 8, 8), 10, seed=7)
    after = torch.rand(1)
    b = build_model("mlp", (1, 8, 8), 10, seed=7)
    c = build_model("mlp", (1, 8, 8), 10, seed=8)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.state_dict()["net.1.weight"], c.state_dict()["net.1.weight"])


def test_width_and_depth_options() -> None:
    mlp = build_model("mlp", (1, 40), 10, width=32, depth=3)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [32, 32, 32, 10]
    lstm = build_model("lstm", (1, 28, 28), 10, width=24, depth=2)
    assert lstm.rnn.hidden_size == 24 and lstm.rnn.num_layers == 2 and lstm.rnn.input_size == 28
    resnet = build_model("resnet20", (3, 32, 32), 10, width=32)  # width multiplier 2
    assert resnet.conv1.out_channels == 32 and resnet.fc.in_features == 128
    for width in (8, 20, 40):  # not 16·m: refused, never rounded to another width
        with pytest.raises(ConfigError, match=f"width={width} does not fit model='resnet20'.*a multiple of 16"):
            build_model("resnet20", (3, 32, 32), 10, width=width)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_recurrent_models_learn_mnist1d(cell: str) -> None:
    """A signal is read in windows (MNIST-1D: 10 steps of 4): 3 central SGD epochs leave chance (0.1) well behind
    (read as 40 steps of 1, every cell stayed at 0.10 ± 0.01). The bound is twice chance: the plain rnn reaches
    0.229-0.242 on an AMD EPYC here (1 or 2 threads: float order; more on the Intel machines), lstm/gru 0.40/0.43."""
    from fedfuse import evaluate, load_dataset, train

    ds = load_dataset("mnist1d")
    model = build_model(cell, ds.input_shape, ds.num_classes, width=32, seed=0)
    assert model.window == 4 and model.rnn.input_size == 4
    train(model, ds.x_train, ds.y_train, epochs=3, lr=0.05, momentum=0.9)
    assert evaluate(model, ds.x_test, ds.y_test)[1] > 0.2


def test_a_window_must_divide_the_signal() -> None:
    from fedfuse.models import SequenceClassifier

    assert SequenceClassifier((2, 36), 10, "gru", hidden=4).window == 4  # 9 steps of 4 positions × 2 channels
    assert SequenceClassifier((1, 7), 10, "gru", hidden=4).window == 1  # 7 steps: within MAX_STEPS
    with pytest.raises(ConfigError, match="window=3 does not divide the signal's length 40"):
        SequenceClassifier((1, 40), 10, "gru", hidden=4, window=3)


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model='vit' is unknown; allowed: cnn, gru, lstm, mlp, resnet20, rnn"):
        build_model("vit", (1, 8, 8), 10)


def test_torchvision_builder_takes_the_data_sets_channels_and_classes() -> None:
    from fedfuse.config import OPTIONS

    model = build_model("torchvision:mobilenet_v3_small", (1, 28, 28), 7, seed=0)
    assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    assert build_model("torchvision:vit_b_16", (3, 32, 32), 10).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError, match="torchvision:inception_v3 does not run on \\(1, 8, 8\\) inputs .*75×75"):
        build_model("torchvision:inception_v3", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="'torchvision:resnet9' is not a torchvision classification model"):
        build_model("torchvision:resnet9", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="needs images"):
        build_model("torchvision:resnet18", (1, 40), 10)
    assert OPTIONS["model"].check("torchvision:resnet18") == "torchvision:resnet18"
    with pytest.raises(ConfigError, match="model='torchvision:nope' is not a torchvision classification model"):
        OPTIONS["model"].check("torchvision:nope")


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_group_norm_replaces_batch_norm_after_every_conv(name: str) -> None:
    bn = build_model(name, (1, 8, 8), 10, width=32, batch_norm=True, seed=0)
    gn = build_model(name, (1, 8, 8), 10, width=32, group_norm=4, seed=0)
    bns = [m.num_features for m in bn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    gns = [(m.num_groups, m.num_channels) for m in gn.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert bns and gns == [(4, c) for c in bns]
    convs = [m for m in gn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)  # the norm's shift makes a conv bias redundant
    assert gn(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_group_norm_that_does_not_fit_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"group-norm=3 does not divide .*\[16, 32, 64\]; allowed: a divisor of 16"):
        build_model("resnet20", (1, 8, 8), 10, group_norm=3)
    with pytest.raises(ConfigError, match="does not apply to model='lstm'"):
        build_model("lstm", (1, 8, 8), 10, group_norm=2)
    with pytest.raises(ConfigError, match="exclude each other"):
        build_model("cnn", (1, 8, 8), 10, batch_norm=True, group_norm=2)
