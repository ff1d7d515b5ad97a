"""Models we never wrote rules for: a diverse sample of timm architectures (benchmarks/timm_coverage.py SAMPLE).

Each either derives a spec that a random permutation leaves exact and that ``match``/``wb`` recover (outputs equal
to 1e-4), or is refused at derivation with one line naming the op. Random init (``pretrained=False``), no
network: every test here runs with sockets refused. Fast ones run by default; ``slow`` ones in CI (`make test`);
``huge`` ones (over the CI budget) only with ``pytest -m huge``. Measured times:
``benchmarks/results/timm-coverage.md``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("timm")

from benchmarks.timm_coverage import EXTRA, SAMPLE, build  # noqa: E402
from fedfuse.align.selfcheck import selfcheck  # noqa: E402
from fedfuse.align.spec import derive_spec  # noqa: E402

# refused at derivation, with the op the one-line reason must name (none in the sample today)
REFUSED: dict[str, str] = {}
# < 5 s each (total per model in benchmarks/results/timm-coverage.md, shared 2-core machine under load)
FAST = {"mobilenetv3_small_100", "mobilevit_xxs"}
# every other model runs in CI (`slow`); these five (10-16 s each in one pytest run at load ~1.5, 60 s together)
# are ``huge``: `pytest -m huge` or benchmarks/timm_coverage.py runs them. Measured: this file as CI runs it
# (61 tests, huge deselected) 272 s at load ~5 on the shared 2-core machine; `-m "not slow"` (6 tests) ~20 s.
HUGE = {"xception41", "tnt_s_patch16_224", "mixer_s16_224", "inception_v3", "seresnext26d_32x4d"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread, as the benchmark: two threads on the 2 shared cores ran these 2-6x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm must not reach the Hugging Face hub when ``pretrained=False``: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _params() -> list:
    def marks(n: str) -> tuple:
        if n in FAST:
            return ()
        return (pytest.mark.slow, pytest.mark.huge) if n in HUGE else (pytest.mark.slow,)

    return [pytest.param(n, marks=marks(n)) for n in SAMPLE]


@pytest.mark.parametrize("name", _params())
def test_timm_model_is_exact_or_refused(name: str) -> None:
    # Prepare: random init, small input, constant parameters randomised, BN statistics from the batch
    model, x = build(name)
    # Execute
    res = selfcheck(model, x)
    # Assert
    if name in REFUSED:
        assert not res.derived and "\n" not in res.reason
        assert res.reason.startswith(f"unsupported op '{REFUSED[name]}'"), res.reason
        return
    assert res.derived, res.reason
    assert res.permuted_err is not None and res.permuted_err <= 1e-4
    assert res.failures == {}
    assert set(res.errors) == {"match", "wb"} and max(res.errors.values()) <= 1e-4, res.errors


def test_timm_attention_permutes_heads_inside() -> None:
    # the q/k and v dims of every head are their own groups (not only the residual stream)
    model, x = build("vit_tiny_patch16_224")
    spec = derive_spec(model, x)
    heads = model.blocks[0].attn.num_heads
    names = set(spec.names)
    assert {f"blocks.0.attn.qk{h}" for h in range(heads)} <= names
    assert {f"blocks.0.attn.v{h}" for h in range(heads)} <= names


# beyond the sample: derive + permute only. Refusals name the op / the tracing failure in one line.
EXTRA_REFUSED = {
    "efficientvit_b0": "cannot trace EfficientVit with torch.fx",  # torch.autocast(device_type=x.device.type)
    "nest_tiny": "cannot trace Nest with torch.fx",  # int(tensor) in forward
    "mvitv2_tiny": "cannot trace MultiScaleVit with torch.fx",  # item assignment on a traced value
}
EXTRA_FAST = {"tf_efficientnet_b0", "efficientvit_b0"}


def _extra_params() -> list:
    def marks(n: str) -> tuple:
        return () if n in EXTRA_FAST else (pytest.mark.slow,)  # derive + permute: 0.05-3 s each

    return [pytest.param(n, marks=marks(n)) for n in EXTRA]


@pytest.mark.parametrize("name", _extra_params())
def test_timm_extra_model_derives_an_exact_spec_or_one_line_refusal(name: str) -> None:
    model, x = build(name)
    res = selfcheck(model, x, methods=())  # derive and permute: no fusion (budget)
    if name in EXTRA_REFUSED:
        assert not res.derived and "\n" not in res.reason
        assert res.reason.startswith(EXTRA_REFUSED[name]), res.reason
        return
    assert res.derived, res.reason
    assert res.permuted_err is not None and res.permuted_err <= 1e-4
    assert res.failures == {}


def test_timm_refusal_is_one_line_from_derive_spec() -> None:
    # what a user calling derive_spec/fuse sees: one line naming what failed, no traceback chain in the message
    from fedfuse.align.spec import UnsupportedModelError

    model, x = build("efficientvit_b0")
    with pytest.raises(UnsupportedModelError) as e:
        derive_spec(model, x)
    assert "\n" not in str(e.value) and "torch.fx" in str(e.value)
