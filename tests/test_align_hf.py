"""Transformers as modules, Hugging Face models and PEFT LoRA adapters: derived, permuted and recovered exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedfuse.align.fusion import fuse
from fedfuse.align.selfcheck import selfcheck
from fedfuse.align.spec import derive_spec
from fedfuse.align.transport import permute_model
from fedfuse.errors import ConfigError
from fedfuse.models.hf_models import tiny_hf


class TextClassifier(nn.Module):
    """Embedding → TransformerEncoder → mean over tokens → Linear (the issue's trivially-"exact" case)."""

    def __init__(self, decoder: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32, padding_idx=0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
        self.dec = (
            nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 48, 0.0, batch_first=True, norm_first=True), 1)
            if decoder
            else None
        )
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(x))
        if self.dec is not None:
            h = self.dec(self.emb(x[:, :3]), h)
        return self.fc(h.mean(1))


@pytest.mark.parametrize("decoder", [False, True])
def test_embedding_fed_transformer_aligns_stream_and_heads(decoder: bool) -> None:
    # Prepare
    torch.manual_seed(0)
    model, x = TextClassifier(decoder).eval(), torch.randint(0, 50, (4, 7))
    # Execute
    spec = derive_spec(model, x)
    res = selfcheck(model, x)
    # Assert: the residual stream (embedding width) is one group reaching every layer norm and projection; each
    # head has its q/k and v units; a permuted copy is recovered exactly by match and wb
    stream = spec["emb"]
    keys = {m.key for m in stream.members}
    assert {"emb.weight", "enc.layers.1.norm2.weight", "enc.layers.0.self_attn.in_proj_weight", "fc.weight"} <= keys
    assert {"enc.layers.0.self_attn.qk3", "enc.layers.1.self_attn.v0", "enc.layers.0.linear1"} <= set(spec.names)
    if decoder:
        assert {"dec.layers.0.multihead_attn.in_proj_weight", "dec.layers.0.norm3.bias"} <= keys
    assert res.ok and res.groups == len(spec.groups) and res.permuted_err < 1e-10, res
    assert set(res.errors) == {"match", "wb"}


@pytest.mark.parametrize("arch", ["bert", "gpt2-lm", "distilbert", "vit", "llama-lm"])
def test_hugging_face_models_recover_exactly(arch: str) -> None:
    pytest.importorskip("transformers")
    # Prepare: random init from a tiny config; keyword inputs as a dict
    model, x = tiny_hf(arch)
    # Execute
    spec = derive_spec(model, x)
    res = selfcheck(model, x)
    # Assert: heads' units move (q/k fixed under rotary embeddings), the permuted copy computes the same logits, and
    # match and wb recover it
    names = spec.names
    assert any(n.endswith(".v1") for n in names)
    assert any(n.endswith(".qk1") for n in names) == (arch != "llama-lm")
    assert res.ok and res.permuted_err < 1e-6 and set(res.errors) == {"match", "wb"}, res


def test_gpt2_tied_lm_head_moves_with_the_embedding() -> None:
    pytest.importorskip("transformers")
    # Prepare
    model, x = tiny_hf("gpt2-lm")
    spec = derive_spec(model, x)
    # Execute
    permuted, _ = permute_model(model, spec, seed=2)
    # Assert: the tied weights are one tensor after the permutation, and not the original one
    assert permuted.lm_head.weight is permuted.transformer.wte.weight
    assert not torch.equal(permuted.lm_head.weight, model.lm_head.weight)


def _lora(base: nn.Module, r: int, targets: list[str]) -> nn.Module:
    import copy

    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, target_modules=targets, task_type="SEQ_CLS", init_lora_weights=False)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def test_peft_lora_moves_ranks_and_keeps_the_base() -> None:
    pytest.importorskip("transformers")
    # Prepare
    base, x = tiny_hf("bert")
    model = _lora(base, 4, ["query", "value"])
    # Execute
    spec = derive_spec(model, x)
    res = selfcheck(model, x)
    permuted, _ = permute_model(model, spec, seed=3)
    # Assert: one rank group per adapted layer; the base is untouched, every B·A is unchanged; recovered exactly
    assert len(spec.groups) == 4 and all(g.size == 4 for g in spec.groups)
    sa, sb = model.state_dict(), permuted.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "lora_" not in k)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if "lora_A" in k)
    for k in (k for k in sa if "lora_A" in k):
        kb = k.replace("lora_A", "lora_B")
        torch.testing.assert_close(sb[kb] @ sb[k], sa[kb] @ sa[k])
    assert res.ok and set(res.errors) == {"match", "wb"}, res


@pytest.mark.parametrize(
    ("r", "targets", "message"),
    [
        (8, ["query", "value"], "LoRA rank at 'base_model.model.bert.encoder.layer.0.attention.self.query' is 8, "),
        (4, ["query", "key"], "LoRA targets differ from model 0's (layer 'base_model.model.bert.encoder.layer.0."),
    ],
)
def test_peft_adapters_of_other_ranks_or_targets_are_refused(r: int, targets: list[str], message: str) -> None:
    pytest.importorskip("transformers")
    base, x = tiny_hf("bert")
    with pytest.raises(ConfigError) as err:
        fuse([_lora(base, 4, ["query", "value"]), _lora(base, r, targets)], method="wb", example_input=x)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("hf:t5", "model='hf:t5' is not allowed; allowed: hf:bert, hf:distilbert, hf:gpt2, hf:llama, hf:vit"),
        ("hf:", "model='hf:' is not allowed; allowed: hf:bert"),
    ],
)
def test_bad_hf_model_is_one_line_and_exit_2(model: str, message: str, tmp_path, capsys) -> None:
    from tests.test_torchvision_cli import refused

    err = refused(model, [], tmp_path, capsys)
    assert message in err


def test_hf_model_without_transformers_says_how_to_install_it(tmp_path, capsys, monkeypatch) -> None:
    from fedfuse.models import hf_models
    from tests.test_torchvision_cli import refused

    monkeypatch.setattr(hf_models, "_transformers", lambda: None)
    err = refused("hf:bert", [], tmp_path, capsys)
    assert "model='hf:bert' needs transformers, which is not installed: pip install 'fedfuse[hf]'" in err


def test_hf_classifier_runs_on_fedfuse_data_and_recovers() -> None:
    pytest.importorskip("transformers")
    from fedfuse.models import build_model

    # Prepare: hf:gpt2 on digits-shaped inputs (64 features read as 64 tokens); its classifier picks the last token
    model = build_model("hf:gpt2", (1, 8, 8), 10, seed=0).eval()
    x = torch.randn(3, 1, 8, 8)
    # Execute
    res = selfcheck(model, x)
    # Assert
    assert model(x).shape == (3, 10)
    assert res.ok and res.groups > 10 and set(res.errors) == {"match", "wb"}, res


class CrossAttention(nn.Module):
    """Queries from one input, keys/values from another, through one nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(5, 16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kv = torch.relu(self.b(y))
        return self.fc(self.att(torch.relu(self.a(x)), kv, kv, need_weights=False)[0].mean(1))


def test_cross_attention_joins_query_and_key_streams() -> None:
    # Prepare
    torch.manual_seed(0)
    model, x = CrossAttention().eval(), (torch.randn(2, 4, 6), torch.randn(2, 3, 5))
    # Execute
    spec = derive_spec(model, x)
    res = selfcheck(model, x)
    # Assert: in_proj's columns serve queries and keys/values, so both projections are one group; heads move
    stream = spec.members_of("a.weight")[0][0]
    assert {m.key for m in stream.members} >= {"a.weight", "b.weight", "att.in_proj_weight"}
    assert {"att.qk1", "att.v0"} <= set(spec.names)
    assert res.ok and set(res.errors) == {"match", "wb"}, res


class FullTransformer(nn.Module):
    """``nn.Transformer`` (encoder + decoder, their final norms) between an input and an output Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.tr = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.fc(self.tr(h, h[:, :2]).mean(1))


def test_nn_transformer_is_traced_through_and_recovered_exactly_by_every_method() -> None:
    from fedfuse.align import align

    torch.manual_seed(0)
    for model, x in ((FullTransformer().eval(), torch.randn(32, 6, 5)), (TextClassifier().eval(), None)):
        x = torch.randint(0, 50, (32, 7)) if x is None else x
        spec = derive_spec(model, x[:2])  # nn.Transformer has no rule: its encoder and decoder have
        permuted, _ = permute_model(model, spec, seed=1)
        for method, kwargs in (("weight", {}), ("activation", {"batch": x}), ("ot", {"batch": x})):
            state = align(model, permuted, method=method, spec=spec, **kwargs)
            assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), (type(model), method)
        for method in ("match", "wb"):
            fused = fuse([model, permuted], method=method, spec=spec, init=0, bn_repair=None)
            assert all(torch.equal(fused[k], v) for k, v in model.state_dict().items()), (type(model), method)


@pytest.mark.parametrize("method", ["cca", "zip"])
def test_activation_merges_refuse_transformers_in_one_line_token_inputs_included(method: str) -> None:
    torch.manual_seed(0)
    cases = [(TextClassifier().eval(), torch.randint(0, 50, (16, 7)), "'emb.weight' belongs to Embedding"),
             (FullTransformer().eval(), torch.randn(16, 6, 5), "belongs to LayerNorm")]  # fmt: skip
    for model, x, where in cases:
        with pytest.raises(ConfigError, match=f"method='{method}' maps hidden units linearly.*{where}"):
            fuse([model, model], method=method, data=x)
