"""Layers users write that the rules once refused or skipped: GroupNorm with G groups (units move within their group,
groups as whole blocks), dense layers written with raw parameters (``x @ W.t() + b``), gated units (GLU: ``chunk``
and ``nn.GLU``), ``F.normalize``: derived, recovered exactly, and refused where nothing can be aligned."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedfuse.align import UnsupportedModelError, align, derive_spec, fuse, permute_model
from fedfuse.align.gate import verify_spec
from fedfuse.align.selfcheck import selfcheck


class GNNet(nn.Module):
    """conv → GroupNorm(g1) → conv → GroupNorm(g2) → pool → linear (functional group_norm if ``functional``)."""

    def __init__(self, g1: int = 4, g2: int = 8, functional: bool = False) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(g1, 16)
        self.c2, self.n2 = nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(g2, 32)
        self.fc, self.functional = nn.Linear(32, 10), functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.n1(self.c1(x)))
        x = self.c2(x)
        x = F.group_norm(x, self.n2.num_groups, self.n2.weight, self.n2.bias) if self.functional else self.n2(x)
        return self.fc(F.adaptive_avg_pool2d(F.silu(x), 1).flatten(1))


class GNRes(nn.Module):
    """A residual stream normalised by GroupNorm(g) twice, and by GroupNorm(g_last) at the end."""

    def __init__(self, g: int = 4, g_last: int | None = None) -> None:
        super().__init__()
        self.stem, self.n0 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(g, 16)
        self.a, self.na = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(g, 16)
        self.b, self.nb = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(g_last or g, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n0(self.stem(x)))
        h = h + F.relu(self.na(self.a(h)))
        return self.fc(self.nb(h + self.b(h)).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """GroupNorm affines away from 1/0, so a wrong transport of them shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model


@pytest.mark.parametrize("functional", [False, True])
def test_groupnorm_units_move_within_their_group_and_groups_as_blocks(functional: bool) -> None:
    model = _randomise(GNNet(4, 8, functional), 0).eval()
    spec = derive_spec(model, X)
    assert sorted(spec.sizes.values()) == [4] * 4 + [4] * 8  # one group per GroupNorm group (16/4, 32/8)
    assert sorted(len(b.heads[0]) for b in spec.blocks) == [4, 8]  # each GroupNorm's groups form one block set
    verify_spec(model, spec, X)  # a seeded permutation, blocks swapped too, computes the same function
    copy, _ = permute_model(model, spec, seed=3)
    torch.testing.assert_close(copy(X), model(X), atol=1e-5, rtol=1e-5)
    # a mixing permutation across GroupNorm groups is not allowed: it changes the function
    wrong = _randomise(GNNet(4, 8, functional), 0).eval()
    with torch.no_grad():
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
        wrong.c1.weight.copy_(model.c1.weight[perm])
        wrong.c1.bias.copy_(model.c1.bias[perm])
        wrong.n1.weight.copy_(model.n1.weight[perm])
        wrong.n1.bias.copy_(model.n1.bias[perm])
        wrong.c2.weight.copy_(model.c2.weight[:, perm])
    assert (wrong(X) - model(X)).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["weight", "wb"])
def test_a_groupnorm_models_block_permuted_copy_is_recovered_exactly(method: str) -> None:
    model = _randomise(GNNet(), 1).eval()
    spec = derive_spec(model, X)
    copy, _ = permute_model(model, spec, seed=5)  # permutes within groups and reorders whole groups
    moved = copy.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in model.state_dict().items())
    if method == "weight":
        back = align(model, copy, method="weight", example_input=X)
    else:
        back = fuse([model, copy], method="wb", example_input=X)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=1e-5, rtol=1e-5)


def test_groupnorm_on_a_residual_stream_and_mixed_group_counts() -> None:
    same = _randomise(GNRes(4), 0).eval()
    spec = derive_spec(same, X)
    assert len(spec.blocks) == 1 and len(spec.blocks[0].heads[0]) == 4  # three GroupNorm(4) on one stream: one set
    assert selfcheck(same, X).ok
    for g, g_last in ((4, 8), (8, 4)):  # a finer and a coarser GroupNorm on the same units: within groups only
        mixed = _randomise(GNRes(g, g_last), 0).eval()
        spec = derive_spec(mixed, X)
        assert not spec.blocks and max(spec.sizes.values()) == 16 // max(g, g_last)
        result = selfcheck(mixed, X)
        assert result.ok and result.errors == {"match": 0.0, "wb": 0.0}


class RawDense(nn.Module):
    """A two-layer MLP written with raw parameters: ``relu(x W1ᵀ + b1) W2ᵀ + b2`` (``kind`` picks the form)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w1, self.b1 = nn.Parameter(torch.randn(32, 10) * 0.3), nn.Parameter(torch.randn(32) * 0.1)
        self.w2, self.b2 = nn.Parameter(torch.randn(3, 32) * 0.3), nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "t":
            h = x @ self.w1.t() + self.b1
        elif self.kind == "transpose":
            h = torch.matmul(x, self.w1.transpose(0, 1)) + self.b1
        else:  # einsum: no rule
            h = torch.einsum("bi,ji->bj", x, self.w1) + self.b1
        return F.linear(torch.relu(h), self.w2, self.b2)


@pytest.mark.parametrize("kind", ["t", "transpose"])
def test_a_dense_layer_written_as_x_at_w_is_aligned_exactly(kind: str) -> None:
    model = RawDense(kind)
    x = torch.randn(4, 10)
    spec = derive_spec(model, x)
    assert [g.size for g in spec.groups] == [32]
    assert {(m.key, m.axis) for m in spec.groups[0].members} == {("w1", 0), ("b1", 0), ("w2", 1)}
    result = selfcheck(model, x)
    assert result.ok and result.errors == {"match": 0.0, "wb": 0.0}


def test_a_model_whose_hidden_units_no_rule_reaches_is_refused_not_averaged() -> None:
    model = RawDense("einsum")  # before: 0 groups and no refusal, so fuse() was a silent plain average
    x = torch.randn(4, 10)
    assert "nothing to align in RawDense" in selfcheck(model, x).nothing_aligned
    with pytest.raises(UnsupportedModelError, match=r"nothing to align in RawDense.*\(w1, w2\)"):
        fuse([model, RawDense("einsum")], method="wb", example_input=x)


class Gated(nn.Module):
    """A gated MLP: ``fc2(a ⊙ σ(b))`` with ``(a, b)`` the halves of ``fc1(x)`` (``chunk``, ``nn.GLU`` or ``F.glu``),
    then ``F.normalize`` over the units."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.glu, self.fc2, self.out = nn.Linear(10, 64), nn.GLU(), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.kind == "chunk":
            a, b = h.chunk(2, dim=-1)
            h = a * torch.sigmoid(b)
        else:
            h = self.glu(h) if self.kind == "module" else F.glu(h, dim=-1)
        return self.out(F.normalize(torch.relu(self.fc2(h)), dim=-1))


@pytest.mark.parametrize("kind", ["chunk", "module", "functional"])
def test_gated_units_move_with_their_gates_and_normalize_passes_units_through(kind: str) -> None:
    model = Gated(kind)
    x = torch.randn(4, 10)
    spec = derive_spec(model, x)
    assert sorted(spec.sizes.values()) == [16, 32]  # fc1's 64 rows: 32 units, each value row with its gate row
    (gate,) = [g for g in spec.groups if g.size == 32]
    rows = [m for m in gate.members if m.key == "fc1.weight"]
    assert len(rows) == 2 and {m.segments for m in rows} == {rows[0].segments}  # both halves, one transport
    result = selfcheck(model, x)
    assert result.ok and result.errors == {"match": 0.0, "wb": 0.0}
