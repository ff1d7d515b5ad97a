"""Attention heads reordered as whole blocks (issue 24): derived head sets, exact recovery of head-shuffled copies by
every solver, the gate's check of head blocks, and the gain over within-head-only alignment."""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace

import pytest
import torch
from torch import nn

from benchmarks.heads import Encoder  # Embedding → nn.TransformerEncoder (2 layers, 4 heads) → Linear
from fedfuse.align.fusion import AlignmentError, align, fuse
from fedfuse.align.gate import verify_spec
from fedfuse.align.heads import block_sigma, merged_spec
from fedfuse.align.spec import TransportSpec, UnsupportedModelError, derive_spec
from fedfuse.align.transport import apply_transport, permute_model, state_of


class SelfAttention(nn.Module):
    """Linear → nn.MultiheadAttention (4 heads; an optional per-head 3-d mask) → Linear."""

    def __init__(self, mask: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 3)
        self.mask = torch.randn(2 * 4, 5, 5) if mask else None  # batch × heads rows: a different mask per head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.fc(self.att(h, h, h, attn_mask=self.mask, need_weights=False)[0].mean(1))


class TimmBlock(nn.Module):
    """timm's qkv ``Attention`` between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Attention

        self.inp = nn.Linear(6, 16)
        self.att = Attention(16, num_heads=4, qkv_bias=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.att(torch.relu(self.inp(x))).mean(1))


class MaskedAttention(SelfAttention):
    """SelfAttention with a per-head mask (its own class: the gate caches verdicts per class and state shapes)."""

    def __init__(self) -> None:
        super().__init__(mask=True)


class HeadWeights(SelfAttention):
    """Adds head 0's attention weights to the logits (``average_attn_weights=False``): head 0 is told apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        out, weights = self.att(h, h, h, average_attn_weights=False)
        return self.fc(out.mean(1)) + weights[:, 0].sum((-1, -2))[:, None]


def _case(name: str, seed: int = 0) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    if name == "encoder":
        return Encoder().eval(), torch.randint(0, 50, (16, 7))
    if name == "mha":
        return SelfAttention().eval(), torch.randn(16, 5, 6)
    if name == "timm":
        pytest.importorskip("timm")
        return TimmBlock().eval(), torch.randn(16, 5, 6)
    pytest.importorskip("transformers")
    from fedfuse.models.hf_models import tiny_hf

    return tiny_hf(name, seed=seed)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - v.double()).abs().max()) for k, v in b.items() if v.is_floating_point())


def _outputs(model: nn.Module, x: object) -> torch.Tensor:
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    return y if isinstance(y, torch.Tensor) else y[0]


def _shuffled(model: nn.Module, spec: TransportSpec, seed: int = 1) -> nn.Module:
    """A permuted copy whose heads are reordered as blocks (checked) and whose units move within heads."""
    copy_, perms = permute_model(model, spec, seed=seed)
    sizes = spec.for_state(state_of(model)).sizes
    moved = False
    for b in spec.blocks:
        widths = [sizes[g] for g in b.heads[0]]
        sigma = block_sigma(perms[b.names[0]].argmax(1), widths)
        assert sigma is not None
        moved = moved or bool((sigma != range(len(widths))).any())
    assert moved, "the copy must reorder whole heads"
    return copy_


CASES = ["encoder", "mha", "timm", "bert", "gpt2-lm"]


@pytest.mark.parametrize("name", CASES)
def test_head_shuffled_copy_is_recovered_exactly_and_keeps_the_function(name: str) -> None:
    # Prepare: a copy with heads shuffled as blocks and units permuted within heads
    model, x = _case(name)
    spec = derive_spec(model, x)
    shuffled = _shuffled(model, spec)
    ref = _outputs(model, x)
    # Execute / Assert: the copy computes the same function; match and wb fuse it back onto the model, and every
    # aligner maps it onto the model's weights (so the aligned copy computes the model's function)
    assert spec.blocks and torch.allclose(_outputs(shuffled, x), ref, atol=1e-5)
    for method in ("match", "wb"):
        fused = fuse([model, shuffled], method=method, spec=spec, init=0, bn_repair=None)
        assert _max_diff(fused, model.state_dict()) < 1e-6, method
    batch = None if isinstance(x, dict) else x
    kinds = [("weight", {}), ("ot", {"solver": "sinkhorn", "epsilon": 1e-3})]
    kinds += (
        [("activation", {"batch": batch}), ("ot", {"batch": batch, "cost": "activation"})] if batch is not None else []
    )
    for method, kwargs in kinds:
        aligned = align(model, shuffled, method=method, spec=spec, as_module=True, **kwargs)
        assert _max_diff(aligned.state_dict(), model.state_dict()) < 1e-5, (method, kwargs)
        assert torch.allclose(_outputs(aligned, x), ref, atol=1e-5), (method, kwargs)


@pytest.mark.parametrize("flag", ["_EXACT", "_REFERENCE"])
@pytest.mark.parametrize("name", ["encoder", "gpt2-lm"])
def test_weight_matching_recovers_head_shuffles_without_the_permuted_copy_shortcuts(
    name: str, flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the two-level assignment itself (no exact-rows shortcut), or the plain reference coordinate descent
    from fedfuse.align import solvers

    monkeypatch.setattr(solvers, flag, not getattr(solvers, flag))
    model, x = _case(name)
    spec = derive_spec(model, x)
    # Execute
    perms = solvers.weight_matching(model, _shuffled(model, spec), spec)
    aligned = apply_transport(_shuffled(model, spec), spec, perms)
    # Assert: transports keyed by the merged head groups undo the head shuffle exactly
    assert {n for b in spec.blocks for n in b.names} <= set(perms)
    assert _max_diff(aligned, model.state_dict()) < 1e-6


@pytest.mark.parametrize("name", ["encoder", "bert"])
def test_within_head_only_alignment_misses_a_head_shuffle(name: str) -> None:
    # Prepare: the same spec without its head sets (what alignment was before head blocks)
    model, x = _case(name)
    spec = derive_spec(model, x)
    shuffled = _shuffled(model, spec)
    # Execute / Assert: within-head transports cannot undo reordered heads: the fusion check refuses
    with pytest.raises(AlignmentError, match="missed a symmetry"):
        fuse([model, shuffled], method="match", spec=replace(spec, blocks=()), init=0, bn_repair=None)


def test_three_models_and_barycenter_iterations_recover_the_model() -> None:
    model, x = _case("encoder")
    spec = derive_spec(model, x)
    copies = [_shuffled(model, spec, seed) for seed in (1, 2)]
    for method, kwargs in (("match", {}), ("wb", {"max_iter": 3}), ("wb", {"solver": "sinkhorn", "epsilon": 1e-3})):
        fused = fuse([model, *copies], method=method, spec=spec, init=0, bn_repair=None, **kwargs)
        assert _max_diff(fused, model.state_dict()) < 1e-5, (method, kwargs)


def test_head_sets_where_heads_are_alike_only() -> None:
    # Prepare / Execute
    plain, x = _case("mha")
    masked = MaskedAttention().eval()
    spec, masked_spec = derive_spec(plain, x[:2]), derive_spec(masked, x[:2])
    # Assert: one set (q/k and v slots of 4 heads); a per-head 3-d mask keeps heads in place; the merged view
    # holds one q/k and one v group of 16 units in place of 8 per-head groups
    (b,) = spec.blocks
    assert b.names == ("att.qk", "att.v") and b.heads[1] == tuple(f"att.v{h}" for h in range(4))
    assert masked_spec.blocks == () and {"att.qk0", "att.v3"} <= set(masked_spec.names)
    torch.manual_seed(0)
    per_head, y = HeadWeights().eval(), torch.randn(2, 5, 6)
    assert derive_spec(per_head, y).blocks == ()
    verify_spec(per_head, derive_spec(per_head, y), y)  # the derived spec (heads in place) passes the gate
    view = merged_spec(spec.for_state(state_of(plain)))
    assert view.merged_heads == {"att.qk": (4,) * 4, "att.v": (4,) * 4}
    assert set(view.names) == (set(spec.names) - {g for slot in b.heads for g in slot}) | {"att.qk", "att.v"}


def test_rotary_and_grouped_query_attention_keep_heads_in_place() -> None:
    pytest.importorskip("transformers")
    model, x = _case("llama-lm")
    spec = derive_spec(model, x)
    assert spec.blocks == () and any(n.endswith(".v1") for n in spec.names)


def test_gate_refuses_head_blocks_claimed_for_heads_that_differ() -> None:
    # Prepare: a model with a per-head mask, given the head sets of the same model without the mask
    torch.manual_seed(0)
    masked, x = MaskedAttention().eval(), torch.randn(2, 5, 6)
    wrong = replace(derive_spec(masked, x), blocks=derive_spec(SelfAttention().eval(), x).blocks)
    # Execute / Assert: within-head permutations still hold, whole heads do not: the gate names the head set
    with pytest.raises(UnsupportedModelError, match="heads of 'att' as blocks"):
        verify_spec(masked, wrong, x, given=True)
    verify_spec(masked, replace(wrong, blocks=()), x, given=True)


def test_specs_without_head_sets_are_unchanged() -> None:
    model, x = _case("mha")
    spec = derive_spec(model, x[:2])
    # a spec pickled before head sets existed (no 'blocks' attribute) loads as a spec without them
    old = TransportSpec.__new__(TransportSpec)
    old.__dict__.update({k: v for k, v in spec.__dict__.items() if k not in ("blocks", "merged_heads", "_merged")})
    old = pickle.loads(pickle.dumps(old))
    rows = TransportSpec.from_rows({("inp.weight", 0): "h", ("inp.bias", 0): "h"}, model)
    assert old.blocks == () and rows.blocks == () and merged_spec(rows) is rows
    # without head sets permute_model draws what it always drew: one permutation per group
    copy_, perms = permute_model(model, old, seed=3)
    assert set(perms) == set(spec.names)
    assert _max_diff(apply_transport(model, old, perms), copy_.state_dict()) == 0.0


def _distance(a: nn.Module, aligned: dict[str, torch.Tensor]) -> float:
    """``‖θ_a − θ_b‖ / ‖θ_a‖`` over the floating parameters."""
    num = sum(float(((aligned[k] - v) ** 2).sum()) for k, v in a.state_dict().items() if v.is_floating_point())
    return (num / sum(float((v**2).sum()) for v in a.state_dict().values() if v.is_floating_point())) ** 0.5


@pytest.mark.parametrize("name", ["encoder", "bert"])
def test_a_noisy_head_shuffled_model_aligns_closer_with_head_blocks(name: str) -> None:
    # Prepare: B = A with heads and units shuffled, plus independent noise of 30 % of each tensor's scale
    a, x = _case(name, seed=0)
    spec = derive_spec(a, x)
    b = _shuffled(a, spec, seed=2)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen) if p.numel() > 1 else 0.0)
    within = replace(spec, blocks=())
    # Execute: weight matching and exact OT with and without head blocks
    dist = {}
    for method in ("weight", "ot"):
        for label, sp in (("blocks", spec), ("within", within)):
            dist[method, label] = _distance(a, align(a, copy.deepcopy(b), method=method, spec=sp))
    # Assert: with head blocks B lands at the noise's distance from A (≈ 0.3), within heads only it stays further
    for method in ("weight", "ot"):
        assert dist[method, "blocks"] < 0.31 and dist[method, "within"] > 1.3 * dist[method, "blocks"], dist


def test_head_assignment_is_the_best_block_structured_permutation() -> None:
    # Prepare: two slots of 3 heads × 2 units with random scores; every block-structured permutation enumerated
    import itertools

    import numpy as np

    from fedfuse.align.heads import head_assignment

    rng = np.random.default_rng(0)
    scores, widths = [rng.normal(size=(6, 6)) for _ in range(2)], [(2, 2, 2), (2, 2, 2)]
    inner = list(itertools.permutations(range(2)))
    best = -np.inf
    for sigma in itertools.permutations(range(3)):
        value = 0.0
        for sc in scores:  # the inner permutations of a slot are independent given σ
            for h, s in enumerate(sigma):
                value += max(sum(sc[2 * h + r, 2 * s + c] for r, c in enumerate(p)) for p in inner)
        best = max(best, value)
    # Execute
    value, cols = head_assignment(scores, widths)
    # Assert: the two-level value is the brute-force optimum, and the columns realise it with one shared σ
    assert value == pytest.approx(best)
    assert sum(float(sc[np.arange(6), c].sum()) for sc, c in zip(scores, cols, strict=True)) == pytest.approx(best)
    sigmas = [block_sigma(c, w) for c, w in zip(cols, widths, strict=True)]
    assert sigmas[0] is not None and (sigmas[0] == sigmas[1]).all()


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_head_couplings_are_block_structured_couplings(solver: str) -> None:
    import numpy as np

    from fedfuse.align.heads import head_couplings
    from fedfuse.align.solvers import ot_plan

    rng = np.random.default_rng(1)
    costs = [rng.random((12, 8)), rng.random((12, 8))]  # 4 heads: 3 units (target) vs 2 (source)
    ts = head_couplings(costs, [(3,) * 4] * 2, [(2,) * 4] * 2, lambda c: ot_plan(c, solver, 0.05))
    for t in ts:
        pi = t.double() / 12  # rows of T sum to 1; Π = T / n_target has uniform marginals
        assert torch.allclose(t.sum(1), torch.ones(12), atol=1e-5)
        assert torch.allclose(pi.sum(0), torch.full((8,), 1 / 8, dtype=torch.float64), atol=1e-3)
        if solver == "emd":  # one source head per target head: every 3 × 2 block row has one non-zero block
            blocks = (t.reshape(4, 3, 4, 2).abs().sum((1, 3)) > 0).sum(1)
            assert (blocks == 1).all()
