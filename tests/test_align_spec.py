"""Transport-spec derivation: structure, function invariance under permutations, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedfuse.align import Axis, Group, TransportSpec, UnsupportedModelError, derive_spec, permute_model
from fedfuse.align.transport import apply_transport
from fedfuse.errors import ConfigError
from fedfuse.models import MLP
from tests.test_align_cases import CASES, make_case, max_state_diff, outputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_permutation_keeps_function(name: str) -> None:
    # Prepare
    model, x = make_case(name)
    spec = derive_spec(model, x[:2])
    # Execute
    permuted, perms = permute_model(model, spec, seed=3)
    # Assert: weights moved, function did not
    assert max_state_diff(model.state_dict(), permuted.state_dict()) > 1e-2
    torch.testing.assert_close(outputs(permuted, None, x), outputs(model, None, x), atol=1e-5, rtol=1e-5)
    assert set(perms) == set(spec.names)


def test_mlp_spec_lists_rows_bias_and_next_columns() -> None:
    model, x = make_case("mlp")
    spec = derive_spec(model, x)
    assert spec.names == ["net.1", "net.3"] and spec.sizes == {"net.1": 16, "net.3": 12}
    members = {(m.key, m.axis, m.role) for m in spec["net.1"].members}
    assert members == {("net.1.weight", 0, "out"), ("net.1.bias", 0, "out"), ("net.3.weight", 1, "in")}
    # the input axis (net.1.weight columns) and the classes (net.5 rows) are never transported
    assert not spec.members_of("net.5.bias") and all(m.axis == 1 for _, m in spec.members_of("net.5.weight"))


def test_lstm_spec_repeats_gates_and_covers_recurrent_columns() -> None:
    model, x = make_case("lstm2")
    spec = derive_spec(model, x)
    assert spec.names == ["rnn.l0", "rnn.l1"]
    l0 = {(m.key, m.axis): m for m in spec["rnn.l0"].members}
    assert l0[("rnn.weight_ih_l0", 0)].repeat == 4 and l0[("rnn.bias_hh_l0", 0)].repeat == 4
    assert l0[("rnn.weight_hh_l0", 1)].role == "in" and ("rnn.weight_ih_l1", 1) in l0
    assert ("fc.weight", 1) in {(m.key, m.axis) for m in spec["rnn.l1"].members}


class _ProjLSTM(nn.Module):
    """2-layer bidirectional LSTM with ``proj_size``; the head reads the output, ``h_n`` or ``c_n``."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.read = read
        self.fc = nn.Linear({"out": 6, "h": 3, "c": 7}[read], 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, (h, c) = self.rnn(x)
        return self.fc({"out": y[:, -1], "h": h[-1], "c": c[-1]}[self.read])


@pytest.mark.parametrize("read", ["out", "h", "c"])
def test_lstm_proj_size_has_cell_and_projection_groups_recovered_exactly(read: str) -> None:
    from fedfuse.align.selfcheck import selfcheck

    # Prepare
    torch.manual_seed(0)
    model, x = _ProjLSTM(read).eval(), torch.randn(3, 6, 5)
    # Execute
    spec = derive_spec(model, x)
    permuted, _ = permute_model(model, spec, seed=3)
    res = selfcheck(model, x)
    # Assert: per (layer, direction) 7 cell units and 3 projected units; W_hr rows/columns and W_hh columns follow
    assert spec.sizes == {
        f"rnn.l{k}{d}{p}": (3 if p else 7) for k in (0, 1) for d in ("", "_reverse") for p in ("", ".proj")
    }
    cell = {(m.key, m.axis, m.role) for m in spec["rnn.l1_reverse"].members}
    proj = {(m.key, m.axis, m.role) for m in spec["rnn.l1_reverse.proj"].members}
    assert {("rnn.weight_hh_l1_reverse", 0, "out"), ("rnn.weight_hr_l1_reverse", 1, "in")} <= cell
    assert {("rnn.weight_hr_l1_reverse", 0, "out"), ("rnn.weight_hh_l1_reverse", 1, "in")} <= proj
    assert ("rnn.weight_ih_l1", 1, "in") in {(m.key, m.axis, m.role) for m in spec["rnn.l0_reverse.proj"].members}
    head = {"out": "rnn.l1.proj", "h": "rnn.l1_reverse.proj", "c": "rnn.l1_reverse"}[read]  # what fc reads
    assert ("fc.weight", 1, "in") in {(m.key, m.axis, m.role) for m in spec[head].members}
    assert max_state_diff(model.state_dict(), permuted.state_dict()) > 1e-2
    assert res.ok and res.permuted_err <= 1e-6 and max(res.errors.values()) <= 1e-6, res


def test_vgg_flatten_expands_channels_over_positions() -> None:
    model, x = make_case("vgg_bn")
    spec = derive_spec(model, x)
    head = [m for m in spec["features.4"].members if m.key == "classifier.1.weight"]
    assert head and head[0].expand == 2 * 2  # 8×8 input, two 2×2 pools
    bn_keys = {m.key for m in spec["features.0"].members}
    assert {"features.1.running_mean", "features.1.running_var", "features.1.weight"} <= bn_keys


def test_resnet_residual_adds_merge_groups() -> None:
    model, x = make_case("resnet20_bn")
    spec = derive_spec(model, x)
    # 3 residual streams (one per stage, shortcuts included) + 9 block-internal groups
    assert len(spec.groups) == 12
    stage1 = spec["conv1"]
    keys = {m.key for m in stage1.members if m.role == "out"}
    assert {"conv1.weight", "layers.0.conv2.weight", "layers.2.bn2.running_var"} <= keys
    stage2 = next(
        g for g in spec.groups if any(m.key == "layers.3.shortcut.0.weight" and m.axis == 0 for m in g.members)
    )
    assert stage2.size == 32


def test_cat_gives_segments_in_consumer_axis() -> None:
    model, x = make_case("residual_cat")
    spec = derive_spec(model, x)
    fc = {g.name: m for g in spec.groups for m in g.members if m.key == "fc.weight" and m.axis == 1}
    assert fc["c1"].segments == ("c1", "c3") and fc["c1"].index == 0 and fc["c3"].index == 1
    assert fc["c1"].expand == 16
    assert "c2" not in spec.names  # merged into c1 by the residual add


def test_manual_spec_override_is_used() -> None:
    model = MLP((4,), 3, (5,))
    spec = TransportSpec(
        (Group("hidden", 5, (Axis("net.1.weight", 0), Axis("net.1.bias", 0), Axis("net.3.weight", 1, "in"))),)
    )
    perm = {"hidden": torch.eye(5)[[4, 0, 3, 1, 2]]}
    moved = apply_transport(model, spec, perm)
    net = MLP((4,), 3, (5,))
    net.load_state_dict(moved)
    x = torch.randn(7, 4)
    torch.testing.assert_close(net(x), model(x))
    assert not torch.equal(moved["net.1.weight"], model.state_dict()["net.1.weight"])


class _MatmulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(torch.matmul(h, torch.ones(6, 6)))


class _CumsumNet(_MatmulNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.cumsum(torch.relu(self.fc1(x)), dim=1))


class _SortNet(_MatmulNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sort(torch.relu(self.fc1(x)), dim=1).values)


class _InputOpsNet(_MatmulNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # ops on the (fixed) input are fine
        x = torch.sort(x, dim=1).values * 2.0
        return self.fc2(torch.relu(self.fc1(x)))


def test_matmul_with_a_fixed_matrix_keeps_the_contracted_units_fixed() -> None:
    # h @ C sums h's units against C's fixed rows: exact only if those units stay put
    spec = derive_spec(_MatmulNet(), torch.randn(3, 4))
    assert spec.names == []


@pytest.mark.parametrize(("cls", "op"), [(_CumsumNet, "torch.cumsum"), (_SortNet, "torch.sort")])
def test_unsupported_op_is_named(cls: type[nn.Module], op: str) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"unsupported op '{op}' at node '\w+'.*Supported: Linear") as e:
        derive_spec(cls(), torch.randn(3, 4))
    assert isinstance(e.value, ConfigError)


def test_ops_on_the_model_input_are_allowed() -> None:
    spec = derive_spec(_InputOpsNet(), torch.randn(3, 4))
    assert spec.names == ["fc1"]


def test_grouped_conv_permutes_within_blocks_and_depthwise_ties_channels() -> None:
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 16, 2))
    spec = derive_spec(grouped, torch.randn(2, 1, 8, 8))
    # exact choice: the grouped conv's input stays fixed, its outputs permute within each of the 2 blocks
    assert spec.names == ["1.g0", "1.g1"] and spec.sizes == {"1.g0": 3, "1.g1": 3}
    assert {m.segments for m in spec["1.g1"].members if m.key == "1.weight"} == {("1.g0", "1.g1")}
    dw = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 2))
    spec = derive_spec(dw, torch.randn(2, 1, 8, 8))
    assert spec.names == ["0"]  # the depthwise conv (multiplier 2) follows its input channels
    assert {(m.key, m.expand) for m in spec["0"].members} >= {("1.weight", 2), ("4.weight", 2 * 36)}
    for model in (grouped, dw):
        x = torch.randn(3, 1, 8, 8)
        permuted, _ = permute_model(model, derive_spec(model, x), seed=1)
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)


def test_groupnorm_with_one_or_every_channel_per_group_keeps_the_channel_group_whole() -> None:
    for groups in (1, 4):
        ok = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(groups, 4), nn.Flatten(), nn.Linear(36, 2))
        spec = derive_spec(ok, torch.randn(2, 1, 5, 5))
        assert spec.names == ["0"] and not spec.blocks
        assert "1.weight" in {m.key for m in spec["0"].members}


def test_untraceable_model_and_missing_input_raise_config_errors() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * len(x)

    with pytest.raises(UnsupportedModelError, match="cannot trace Untraceable"):
        derive_spec(Untraceable(), torch.randn(3, 4))
    with pytest.raises(ConfigError, match="example_input"):
        derive_spec(MLP((4,), 2), None)
    # an input the model itself cannot run: named as the input's fault, not as a tracing limit
    with pytest.raises(UnsupportedModelError, match=r"example_input of shape \(3, 5\) does not fit MLP: the model"):
        derive_spec(MLP((4,), 2), torch.randn(3, 5))


def test_declarative_rows_give_the_same_spec_as_derivation() -> None:
    model = MLP((4,), 3, (5, 6))
    rows = {
        ("net.1.weight", 0): "h1", ("net.1.bias", 0): "h1", ("net.3.weight", 1): "h1",
        ("net.3.weight", 0): "h2", ("net.3.bias", 0): "h2", ("net.5.weight", 1): "h2",
    }  # fmt: skip
    spec = TransportSpec.from_rows(rows, model)
    derived = derive_spec(model, torch.randn(2, 4))
    assert spec.sizes == {"h1": 5, "h2": 6}
    as_set = lambda s: {(g.size, frozenset((m.key, m.axis, m.role) for m in g.members)) for g in s.groups}  # noqa: E731
    assert as_set(spec) == as_set(derived)
    with pytest.raises(ConfigError, match=r"spec row \('net.9.weight', 0\) names no parameter"):
        TransportSpec.from_rows({("net.9.weight", 0): "h"}, model)


def test_a_rule_is_one_table_entry() -> None:
    from fedfuse.align import rules

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.special.expit(self.fc1(x)))

    with pytest.raises(UnsupportedModelError, match="unsupported op '.*special_expit'"):
        derive_spec(Custom(), torch.randn(3, 4))
    rules.register_rule(torch.special.expit, rules.elementwise)
    try:
        assert derive_spec(Custom(), torch.randn(3, 4)).names == ["fc1"]
    finally:
        del rules.FUNCTION_RULES[torch.special.expit]


def test_layer_scale_attention_and_functional_layer_norm_are_exact() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.scale = nn.Parameter(torch.randn(8))
            self.ln_w, self.ln_b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
            self.token = nn.Parameter(torch.randn(1, 1, 8))
            self.out = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            h = torch.cat([self.token.expand(h.shape[0], -1, -1), h], dim=1)
            h = h + self.scale * self.attn(h, h, h, need_weights=False)[0]
            h = torch.nn.functional.layer_norm(h, (8,), self.ln_w, self.ln_b)
            return self.out(h[:, 0])

    model, x = Block().eval(), torch.randn(3, 4, 5)
    spec = derive_spec(model, x)
    # residual stream (inp, attn output, scale, token, layer norm) is one group; per head a q/k and a v group
    assert sorted(spec.names) == sorted(["inp", "attn.qk0", "attn.qk1", "attn.v0", "attn.v1"])
    assert {"scale", "token", "ln_w", "ln_b", "attn.out_proj.weight"} <= {m.key for m in spec["inp"].members}
    permuted, _ = permute_model(model, spec, seed=2)
    assert max_state_diff(model.state_dict(), permuted.state_dict()) > 1e-2
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)


def test_example_input_is_inferred_where_the_model_fixes_it() -> None:
    from fedfuse.align import fuse, infer_example_input
    from fedfuse.models import VGG, SequenceClassifier

    assert infer_example_input(MLP((1, 8, 8), 10)).shape == (2, 64)
    vgg = VGG((1, 8, 8), 10, (4, "M", 8, "M"), hidden=16)  # flatten feeds a Linear: only 8×8 runs
    assert infer_example_input(vgg).shape == (2, 1, 8, 8)
    fused = fuse([vgg, permute_model(vgg, derive_spec(vgg, torch.randn(2, 1, 8, 8)), seed=1)[0]], method="wb")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(outputs(vgg, fused, x), outputs(vgg, None, x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="cannot infer the input shape of SequenceClassifier.*pass example_input="):
        infer_example_input(SequenceClassifier((1, 8, 6), 10, "lstm", hidden=4))


def test_fusion_refuses_a_wrong_alignment_of_permuted_copies() -> None:
    from fedfuse.align import AlignmentError, fuse

    model, x = make_case("mlp")
    spec = derive_spec(model, x)
    permuted, _ = permute_model(model, spec, seed=3)
    partial = TransportSpec(spec.groups[1:])  # misses the first hidden group: cannot undo its permutation
    with pytest.raises(AlignmentError, match="holds model 0's weights in another order"):
        fuse([model, permuted], method="match", spec=partial)
    with pytest.raises(ConfigError, match="implies width"):  # an inconsistent (resized) state is refused too
        from fedfuse.align.fusion import check_alignment

        bad = dict(model.state_dict())
        bad["net.1.bias"] = bad["net.1.bias"][:-1]
        check_alignment([model.state_dict()], [bad], spec, 0)


def test_token_mixing_linear_keeps_the_channel_groups() -> None:
    class Mixer(nn.Module):  # MLP-Mixer block: a Linear over tokens between two channel Linears
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.tokens, self.head = nn.Linear(3, 8), nn.Linear(5, 5), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)  # (B, 5 tokens, 8 channels)
            h = h + F.gelu(self.tokens(h.transpose(1, 2))).transpose(1, 2)
            return self.head(h.mean(1))

    model, x = Mixer().eval(), torch.randn(4, 5, 3)
    spec = derive_spec(model, x)
    assert spec.names == ["embed"]  # the token Linear's own units stay fixed; the channels are one group
    permuted, _ = permute_model(model, spec, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)


def test_selfcheck_compares_in_float64_when_asked() -> None:
    from fedfuse.align.selfcheck import selfcheck

    # Prepare: a wide MLP; a permutation reorders every hidden sum, which float32 rounds differently
    torch.manual_seed(0)
    model, x = MLP((32,), 10, (256, 256, 256)).eval(), torch.randn(8, 32)
    # Execute
    in_f32 = selfcheck(model, x, methods=("match",), float64=False)
    in_f64 = selfcheck(model, x, methods=("match",), float64=True)
    # Assert: float32 shows rounding (still within rtol here), float64 shows none; both recover exactly
    assert in_f32.permuted_err is not None and in_f64.permuted_err is not None
    assert in_f32.permuted_err > 1e-9 and in_f64.permuted_err <= 1e-13
    assert in_f32.ok and in_f64.ok
