"""Every torchvision classifier: an exact spec (permutation-invariant, recovered by match and wb) or a clear refusal.

Random init, ``num_classes=10``, batch of 2 at a small input, no downloads. Models marked ``slow`` (the
bigger ones) run in CI (`make test` runs everything); ``pytest -m "not slow"`` skips them locally.
Measured wall times per model: ``benchmarks/results/torchvision-coverage.md``.
"""

from __future__ import annotations

import pytest
import torch

from fedfuse.align.selfcheck import break_symmetric_init, selfcheck
from fedfuse.models.torchvision_models import build_torchvision, check_input_size, torchvision_names

# refused at derivation, with the op the one-line reason must name (none today: see the coverage report)
REFUSED: dict[str, str] = {}
# fast ones (< 10 s each in benchmarks/results/torchvision-coverage.md, measured on the shared 2-core machine);
# every other model is marked slow. Attention, layer scale and functional LayerNorm also have fast unit tests
# in tests/test_align_spec.py.
FAST = {
    "squeezenet1_0", "squeezenet1_1", "mnasnet0_5", "mnasnet0_75", "mobilenet_v2", "mobilenet_v3_small",
    "regnet_y_400mf", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
}  # fmt: skip


def _params() -> list:
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in torchvision_names()]


@pytest.mark.parametrize("name", _params())
def test_torchvision_model_is_exact_or_refused(name: str) -> None:
    # Prepare: small input, constant parameters randomised, BN statistics from the batch (outputs O(1))
    s = check_input_size(name)
    model = build_torchvision(name, (3, s, s), 10, seed=0)
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    break_symmetric_init(model, x)
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
