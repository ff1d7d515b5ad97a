"""HeteroFL: spec-driven sub-model slicing, masked averaging, and the strategy through the inline backend."""

from __future__ import annotations

import pytest
import torch

from fedfuse.align import derive_spec
from fedfuse.align.slicing import embed_state, holds_mask, masked_average, slice_state
from fedfuse.errors import ConfigError
from fedfuse.models import build_model
from fedfuse.state import weighted_average

SHAPE = (1, 8, 8)


def _spec(name: str, width: int, **kw):
    model = build_model(name, SHAPE, 10, width=width, seed=0, **kw)
    return model, derive_spec(model, torch.zeros(2, *SHAPE))


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "resnet20"])
def test_slice_is_the_top_left_block_and_embedding_round_trips(name: str) -> None:
    kw = {"batch_norm": True} if name in ("cnn", "resnet20") else {}  # BN vectors and running stats too
    full, spec = _spec(name, 64, **kw)
    half = build_model(name, SHAPE, 10, width=32, seed=1, **kw)
    sizes = derive_spec(half, torch.zeros(2, *SHAPE)).sizes
    state = full.state_dict()
    sub = slice_state(state, spec, sizes)
    ref = half.state_dict()
    assert {k: tuple(v.shape) for k, v in sub.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    half.load_state_dict(sub)  # a model of the client's width runs on it
    wide = embed_state(sub, spec, spec.sizes)
    mask = holds_mask(sub, spec, spec.sizes)
    for k, v in state.items():
        if torch.is_floating_point(v):
            assert torch.equal(wide[k] * mask[k], v * mask[k]), k  # held entries come back unchanged
            assert torch.equal(wide[k] * (1 - mask[k]), torch.zeros_like(v)), k  # zero elsewhere
    again = slice_state(wide, spec, sizes)  # slice ∘ embed = identity
    assert all(torch.equal(again[k], v) for k, v in sub.items())


def test_cnn_flatten_keeps_each_kept_channel_with_its_spatial_block() -> None:
    model = build_model("cnn", (1, 16, 16), 10, width=64, seed=0)  # 16×16: 2×2 positions per channel
    spec = derive_spec(model, torch.zeros(2, 1, 16, 16))
    w = model.state_dict()["classifier.1.weight"]  # (64, 32·4)
    sizes = {g: n // 2 for g, n in spec.sizes.items()}
    sub = slice_state(model.state_dict(), spec, sizes)
    expected = w.reshape(64, 32, 4)[:32, :16].reshape(32, 64)
    assert torch.equal(sub["classifier.1.weight"], expected)


def test_masked_average_of_equal_width_models_is_fedavg() -> None:
    states = [build_model("mlp", SHAPE, 10, width=32, seed=s).state_dict() for s in range(3)]
    _, spec = _spec("mlp", 32)
    got = masked_average(states, [3.0, 1.0, 2.0], spec, states[0])
    want = weighted_average(states, [3.0, 1.0, 2.0])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_masked_average_with_mixed_widths_averages_only_over_holders() -> None:
    model, spec = _spec("mlp", 64)
    glob = model.state_dict()
    big = build_model("mlp", SHAPE, 10, width=64, seed=1).state_dict()
    small_full = build_model("mlp", SHAPE, 10, width=64, seed=2).state_dict()
    quarter = {g: 16 for g in spec.sizes}
    small = slice_state(small_full, spec, quarter)
    out = masked_average([big, small], [1.0, 3.0], spec, glob)
    w = out["net.3.weight"]  # (64, 64): second hidden layer
    assert torch.equal(w[16:, :], big["net.3.weight"][16:, :])  # only the full-width client holds these
    assert torch.equal(w[:, 16:], big["net.3.weight"][:, 16:])
    both = 0.25 * big["net.3.weight"][:16, :16].double() + 0.75 * small["net.3.weight"].double()
    torch.testing.assert_close(w[:16, :16], both.float())
    # nobody holds hidden units 16.. when only the small client answers: they keep the global value
    only_small = masked_average([small], None, spec, glob)
    assert torch.equal(only_small["net.1.weight"][16:], glob["net.1.weight"][16:])
    assert torch.equal(only_small["net.1.weight"][:16], small["net.1.weight"])
    with pytest.raises(ConfigError, match="out of range"):
        slice_state(glob, spec, {g: 65 for g in spec.sizes})


def test_heterofl_inline_run_sends_each_client_its_sub_model(tmp_path) -> None:
    from clients.client_app import app
    from fedfuse.runners.inline import InlineGrid
    from strategies.server_app import run_server

    shapes: dict[int, set[tuple[int, ...]]] = {}

    class Recording(InlineGrid):
        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            messages = list(messages)
            for m in messages:
                if m.metadata.message_type == "train":
                    arrays = next(iter(m.content.array_records.values())).to_torch_state_dict()
                    shapes.setdefault(m.metadata.dst_node_id, set()).add(tuple(arrays["net.3.weight"].shape))
            return super().send_and_receive(messages, timeout=timeout)

    cfg = {"strategy": "heterofl", "client-widths": "16,32,64", "width": 64, "num-clients": 3, "num-rounds": 3,
           "local-epochs": 2, "out": str(tmp_path)}  # fmt: skip
    last = run_server(Recording(app, 3), cfg)
    # node ids 1..3 hold partitions 0..2 → widths 16, 32, 64 (second hidden layer: width × width)
    assert shapes == {1: {(16, 16)}, 2: {(32, 32)}, 3: {(64, 64)}}, shapes
    assert last["replies"] == 3 and last["rejected"] == 0
    assert last["central_accuracy"] > 0.5, last
    final = torch.load(tmp_path / "model.pt")
    assert final["net.3.weight"].shape == (64, 64) and final["net.5.weight"].shape == (10, 64)


def test_heterofl_refuses_a_client_wider_than_the_global_model_and_robust() -> None:
    from strategies import HeteroFL

    model = build_model("mlp", SHAPE, 10, width=32)
    factory = lambda w: build_model("mlp", SHAPE, 10, width=w)  # noqa: E731
    with pytest.raises(ConfigError, match="client width 64 is not a sub-model"):
        HeteroFL(model=model, client_widths=[16, 64], model_factory=factory)
    with pytest.raises(ConfigError, match="robust='median' is not supported by heterofl"):
        HeteroFL(model=model, robust="median")


def test_client_widths_are_an_option_of_heterofl() -> None:
    from strategies.registry import validate_config

    cfg = validate_config({"strategy": "heterofl", "client-widths": "16,32"})
    assert cfg["client-widths"] == "16,32"
    with pytest.raises(ConfigError, match="client-widths='16,32' needs strategy wb or gwb or heterofl"):
        validate_config({"strategy": "fedavg", "client-widths": "16,32"})
