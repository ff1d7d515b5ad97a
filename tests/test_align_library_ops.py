"""Ops that model libraries (timm) use, on tiny hand-built models: each derives an exact spec (a random permutation
leaves the function unchanged and ``match``/``wb`` recover it) and moves the units the op allows to move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedfuse.align.rules import register_leaf_rule
from fedfuse.align.selfcheck import selfcheck
from fedfuse.align.spec import derive_spec


def _exact(model: nn.Module, x: torch.Tensor) -> None:
    res = selfcheck(model.eval(), x)
    assert res.derived, res.reason
    assert res.permuted_err is not None and res.permuted_err <= 1e-6
    assert res.failures == {} and max(res.errors.values()) <= 1e-4, res.errors


class _LinearWithOwnForward(nn.Linear):  # timm.layers.Linear: a Linear subclass calling F.linear itself
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class _SharedPosConv(nn.Module):
    """CoaT: one depthwise conv registered under two names (two state-dict keys for one tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.pos = nn.Conv1d(6, 6, 3, padding=1, groups=6)
        self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
        for b in self.blocks:
            b.pos = self.pos  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).transpose(1, 2)
        h = self.pos(h) + h
        return self.fc2(h.transpose(1, 2))


def test_tied_parameters_move_under_every_state_dict_key() -> None:
    model = _SharedPosConv()
    assert "blocks.0.pos.weight" in model.state_dict()  # the alias the trace never names
    spec = derive_spec(model, torch.randn(2, 5, 4))
    keys = {m.key for m in spec["fc1"].members}
    assert {"pos.weight", "blocks.0.pos.weight", "blocks.1.pos.weight"} <= keys
    _exact(model, torch.randn(2, 5, 4))


class _MaskedAttention(nn.Module):
    """A forward argument with a default (``attn_mask=None``) must be traced at its default."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if attn_mask is not None:
            h = h * attn_mask
        return self.fc2(h)


def test_defaulted_forward_arguments_take_their_default_branch() -> None:
    spec = derive_spec(_MaskedAttention(), torch.randn(2, 4))
    assert spec.names == ["fc1"]


class _LibraryOps(nn.Module):
    """F.linear via a subclass, a parameter viewed to broadcast (``w.view(1, -1, 1)``), addcmul affine, a spatial
    norm (ConvNeXt-V2 GRN), F.pad and roll on non-channel dims, q·kᵀ and attn·v matmuls, SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = _LinearWithOwnForward(4, 8)
        self.alpha, self.beta = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.gamma = nn.Parameter(torch.randn(8))
        self.q, self.k, self.v = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(8, 6)
        self.q2, self.k2, self.v2 = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(8, 6)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, 4)
        h = self.inp(x)
        h = torch.addcmul(self.beta, self.alpha, h)  # ResMLP affine
        g = h.norm(p=2, dim=1, keepdim=True)  # over tokens: per channel
        h = h + self.gamma.view(1, 1, -1) * (h * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)))
        h = F.pad(h.transpose(1, 2), (1, 1)).transpose(1, 2)[:, 1:-1]  # pads tokens only
        h = torch.roll(h, shifts=1, dims=1)
        q, k, v = self.q(h), self.k(h), self.v(h)
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # q/k dims contracted jointly, v's dims kept
        s = F.scaled_dot_product_attention(self.q2(h), self.k2(h), self.v2(h))
        return self.out(torch.cat([a, s], dim=-1))


def test_library_ops_derive_exact_specs_that_move_their_units() -> None:
    torch.manual_seed(0)
    model, x = _LibraryOps(), torch.randn(2, 5, 4)
    spec = derive_spec(model, x)
    # the residual stream (inp) moves with its affine/scale parameters; q/k join; v keeps its own group
    inp = {m.key for m in spec["inp"].members}
    assert {"inp.weight", "alpha", "beta", "gamma", "q.weight", "v2.weight"} <= inp
    assert {m.key for m in spec["q"].members} >= {"q.weight", "k.weight"}
    assert {m.key for m in spec["q2"].members} >= {"q2.weight", "k2.weight"}
    assert "v" in spec.names and "v2" in spec.names
    _exact(model, x)


class _BatchMismatch(nn.Module):
    """attn (heads hidden at a batch dim) @ v (heads fixed): the heads cannot move; the model stays exact."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(2, 2)  # a Linear over the heads dim (CaiT's talking heads)
        self.v = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, 4)
        b, n, _ = x.shape
        attn = (x @ x.transpose(-2, -1)).unsqueeze(1).expand(b, 2, n, n)
        attn = self.mix(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
        v = self.v(x).reshape(b, n, 2, 2).transpose(1, 2)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, 4))


def test_matmul_over_unmatched_batch_dims_fixes_the_units() -> None:
    model, x = _BatchMismatch(), torch.randn(2, 5, 4)
    spec = derive_spec(model, x)
    assert "mix" not in spec.names
    _exact(model, x)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort(self.fc(x), dim=-1).values  # not traceable for our rules


class _WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _Block(), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_leaf_rule_describes_a_whole_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfuse.align import rules

    with pytest.raises(Exception, match="torch.sort"):
        derive_spec(_WithBlock(), torch.randn(2, 4))

    def block_rule(d, node, mod):  # type: ignore[no-untyped-def]
        g = d.new_group(str(node.target), 6)  # sort of the units is not equivariant: its output is fixed
        d.fix(rules.Layout(1, ((g, 6),)))
        return rules.FIXED

    monkeypatch.setattr(rules, "LEAF_RULES", dict(rules.LEAF_RULES))
    register_leaf_rule(_Block, block_rule)
    assert derive_spec(_WithBlock(), torch.randn(2, 4)).names == []


class _UnfoldMax(nn.Module):
    """VOLO: unfold (each channel over its k·k kernel positions) then a max over tokens (per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.unfold, self.fc = nn.Conv2d(3, 4, 1), nn.Unfold(2, stride=2), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = self.unfold(torch.relu(self.conv(x)))  # (B, 4·4, L)
        return self.fc(cols.max(dim=2).values + cols.min(2)[0])


def test_unfold_and_max_over_tokens_keep_the_channel_units() -> None:
    model, x = _UnfoldMax(), torch.randn(2, 3, 4, 4)
    spec = derive_spec(model, x)
    assert spec.names == ["conv"] and {m.key for m in spec["conv"].members} >= {"conv.weight", "fc.weight"}
    _exact(model, x)


class _MaxOverUnits(_UnfoldMax):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # argmax over the units depends on their order
        h = torch.relu(self.conv(x)).flatten(2)
        return self.fc(h.max(dim=1).indices.float().repeat(1, 4)[:, :16])


def test_max_over_the_units_fixes_them() -> None:
    spec = derive_spec(_MaxOverUnits(), torch.randn(2, 3, 4, 4))
    assert "conv" not in spec.names
