"""Leaf rules for Hugging Face ``transformers`` blocks (matched by qualified name: transformers need not be installed).

Attention (``q, k, v`` projections, optionally fused, and optionally the output projection; the attention itself
runs through transformers' attention interface, whose head split would fix every unit if traced). With ``H`` query
heads of ``hd`` dims and ``Hkv`` key/value heads (grouped-query attention; ``Hkv = H`` for multi-head), query head
``i`` reads key/value head ``j(i) = i // (H / Hkv)`` (``repeat_kv``). Exact symmetries used:

* per key/value head ``j``: a q/k group of ``hd`` units indexing k's rows of head ``j`` and q's rows of *every*
  query head that reads it (the score ``q_i·k_j`` is a sum over the head's dims, so all of them move jointly);
* per key/value head ``j``: a v group of ``hd`` units indexing v's rows of head ``j`` and the output projection's
  columns of every query head reading it (or, without an output projection, the output's units);
* rotary position embeddings (Llama) rotate dim pairs ``(m, m + hd/2)`` by a frequency that depends on ``m``: a
  permutation of q/k dims does not commute with them, so q/k rows stay fixed there (v's units still move);
* whole heads are reordered too (multi-head attention without rotary embeddings): head ``h``'s q, k, v rows and
  output columns move as one block (:class:`~fedfuse.align.spec.Blocks`, solved two-level by
  :mod:`fedfuse.align.heads`), unless a per-head parameter or mask tells heads apart. Under rotary embeddings q/k
  rows stay fixed, and with grouped-query attention (``H > Hkv``) a kv head's query heads are not one contiguous
  run of the query rows, so there heads stay in place (units still move within them).

``Conv1D`` (GPT-2's transposed linear: ``y = x W + b``, ``W`` is ``in × out``) and RMSNorm (a weight per unit,
statistics over all units) are leaf rules too.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from fedfuse.align.rules.attention import heads_alike
from fedfuse.align.rules.core import FIXED, FIXED_ID, Layout

HF = "transformers.models"


def _x(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("hidden_states", next(iter(node.kwargs.values()), None))


def _heads(mod: Any) -> tuple[int, int, int]:
    """``(H, Hkv, hd)`` of an attention module."""
    cfg = getattr(mod, "config", None)
    h = next(
        int(getattr(obj, a))
        for obj, a in (
            (mod, "num_heads"),
            (mod, "num_attention_heads"),
            (mod, "n_heads"),
            (cfg, "num_attention_heads"),
        )
        if obj is not None and getattr(obj, a, None) is not None
    )
    hkv = int(getattr(cfg, "num_key_value_heads", None) or h)
    hd = getattr(mod, "head_dim", None) or getattr(mod, "attention_head_size", None)
    return h, hkv, int(hd) if hd else 0


def _rows(d: Any, keys: tuple[str | None, ...], axis: int, segs: tuple[tuple[int, int], ...]) -> None:
    for key in keys:
        if key is None:
            continue
        for i, (gid, _) in enumerate(segs):
            d.add(gid, key, axis if key.endswith("weight") else 0, "out", 1, 1, segs if len(segs) > 1 else None, i)


def attention_rule(q: str, k: str, v: str, o: str | None, *, fused: str | None = None, rotary: bool = False) -> Any:
    """Rule for an attention module with Linear projections ``q``, ``k``, ``v`` (or one Conv1D ``fused`` = [q|k|v])
    and output projection ``o`` (None: the module returns the per-head values)."""

    def rule(d: Any, node: fx.Node, mod: Any) -> Any:
        name = str(node.target)
        x = _x(node)
        if getattr(mod, "is_cross_attention", False):
            raise d.unsupported(node, "cross-attention (keys/values from another sequence)")
        for a in node.all_input_nodes:  # masks, rotary cos/sin, cache positions: they index tokens
            if a is not x:
                d.fix(d.lay(a))
        rank = d.value(x).dim()
        lay = d.check_channel(node, d.lay(x), rank - 1)
        h, hkv, hd = _heads(mod)
        width = getattr(mod, "embed_dim", None) or (getattr(mod, fused).nx if fused else getattr(mod, q).in_features)
        hd = hd or (getattr(mod, fused).nf // 3 if fused else getattr(mod, q).out_features) // h
        if lay is None:
            lay = Layout(rank - 1, ((FIXED_ID, int(width)),))
        rep = h // hkv
        qk = [FIXED_ID if rotary else d.new_group(f"{name}.qk{j}", hd) for j in range(hkv)]
        vg = [d.new_group(f"{name}.v{j}", hd) for j in range(hkv)]
        q_segs = tuple((qk[i // rep], hd) for i in range(h))
        k_segs = tuple((g, hd) for g in qk)
        v_segs = tuple((g, hd) for g in vg)
        out_segs = tuple((vg[i // rep], hd) for i in range(h))
        own = tuple(p for p in (q, k, v, o, fused) if p)
        if not rotary and rep == 1 and heads_alike(d, node, mod, (x,), h, own):
            d.add_blocks((f"{name}.qk", f"{name}.v"), tuple(qk), tuple(vg))
        if fused:  # GPT-2: Conv1D weight (in, 3·E), rows are [q | k | v]
            w, b = f"{name}.{fused}.weight", f"{name}.{fused}.bias"
            d.add_inputs(w, 0, lay, x)
            _rows(d, (w, b), 1, q_segs + k_segs + v_segs)
        else:
            for p, segs in ((q, q_segs), (k, k_segs), (v, v_segs)):
                d.add_inputs(f"{name}.{p}.weight", 1, lay, x)
                bias = f"{name}.{p}.bias" if getattr(getattr(mod, p), "bias", None) is not None else None
                _rows(d, (f"{name}.{p}.weight", bias), 0, segs)
        out = d.values[node.name]
        out_rank = (out[0] if isinstance(out, tuple) else out).dim()
        if o is None:
            result: Any = Layout(out_rank - 1, out_segs)
        else:
            proj = getattr(mod, o)
            conv1d = fused is not None  # GPT-2's c_proj is a Conv1D too
            w = f"{name}.{o}.weight"
            in_axis, out_axis = (0, 1) if conv1d else (1, 0)
            for i, (gid, _) in enumerate(out_segs):
                d.add(gid, w, in_axis, "in", 1, 1, out_segs if len(out_segs) > 1 else None, i)
            n_out = proj.nf if conv1d else proj.out_features
            g = d.new_group(f"{name}.{o}", n_out)
            d.add(g, w, out_axis, "out")
            if getattr(proj, "bias", None) is not None:
                d.add(g, f"{name}.{o}.bias", 0, "out")
            result = Layout(out_rank - 1, ((g, n_out),))
        return (result,) + (None,) * (len(out) - 1) if isinstance(out, tuple) else result

    return rule


def conv1d(d: Any, node: fx.Node, mod: Any) -> Any:
    """transformers' ``Conv1D``: ``y = x W + b`` with ``W`` of shape ``(in, out)``: input units index ``W``'s rows
    (axis 0), a new group of ``out`` units its columns and the bias."""
    name = str(node.target)
    x = _x(node)
    rank = d.value(x).dim()
    lay = d.check_channel(node, d.lay(x), rank - 1)
    if lay is not None:
        d.add_inputs(f"{name}.weight", 0, lay, x)
    g = d.new_group(name, mod.nf)
    d.add(g, f"{name}.weight", 1, "out")
    d.add(g, f"{name}.bias", 0, "out")
    return Layout(rank - 1, ((g, mod.nf),))


def rms_norm(d: Any, node: fx.Node, mod: Any) -> Any:
    """RMSNorm ``x / rms(x) · w`` over the last dim: permutation-equivariant; ``w`` follows the units."""
    x = _x(node)
    lay = d.check_channel(node, d.lay(x), d.value(x).dim() - 1)
    if lay is None:
        return FIXED
    if getattr(mod, "weight", None) is not None:
        d.add_norm(str(node.target), lay, 0, ("weight",))
    return lay


_DISTIL = f"{HF}.distilbert.modeling_distilbert"
LEAVES: dict[str, Any] = {
    f"{HF}.bert.modeling_bert.BertSelfAttention": attention_rule("query", "key", "value", None),
    f"{HF}.roberta.modeling_roberta.RobertaSelfAttention": attention_rule("query", "key", "value", None),
    f"{HF}.vit.modeling_vit.ViTAttention": attention_rule("q_proj", "k_proj", "v_proj", "o_proj"),
    f"{HF}.vit.modeling_vit.ViTSelfAttention": attention_rule("query", "key", "value", None),
    f"{_DISTIL}.DistilBertSelfAttention": attention_rule("q_lin", "k_lin", "v_lin", "out_lin"),
    f"{_DISTIL}.MultiHeadSelfAttention": attention_rule("q_lin", "k_lin", "v_lin", "out_lin"),
    f"{HF}.gpt2.modeling_gpt2.GPT2Attention": attention_rule("", "", "", "c_proj", fused="c_attn"),
    f"{HF}.llama.modeling_llama.LlamaAttention": attention_rule("q_proj", "k_proj", "v_proj", "o_proj", rotary=True),
    f"{HF}.mistral.modeling_mistral.MistralAttention": attention_rule(
        "q_proj", "k_proj", "v_proj", "o_proj", rotary=True
    ),
    f"{HF}.electra.modeling_electra.ElectraSelfAttention": attention_rule("query", "key", "value", None),
    **{  # Llama-style decoders: rotary q/k (fixed), grouped-query attention; Qwen3's per-head q/k norms stay fixed
        f"{HF}.{m}.modeling_{m}.{c}Attention": attention_rule("q_proj", "k_proj", "v_proj", "o_proj", rotary=True)
        for m, c in (("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("gemma", "Gemma"))
    },
    **{f"{HF}.{m}.modeling_{m}.{c}RMSNorm": rms_norm for m, c in (("qwen2", "Qwen2"), ("qwen3", "Qwen3"))},
    f"{HF}.gemma.modeling_gemma.GemmaRMSNorm": rms_norm,  # x / rms(x) · (1 + w): still one weight per unit
    "transformers.pytorch_utils.Conv1D": conv1d,
    f"{HF}.llama.modeling_llama.LlamaRMSNorm": rms_norm,
    f"{HF}.mistral.modeling_mistral.MistralRMSNorm": rms_norm,
}


def power(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``x ** p`` / ``torch.pow(x, p)`` (GPT-2's tanh GELU): element-wise when the exponent is a number."""
    base, exp = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    if isinstance(exp, fx.Node) and not d.is_fixed(d.lay(exp)):
        raise d.unsupported(node, "an exponent that carries hidden units")
    lay = d.lay(base)
    return FIXED if d.is_fixed(lay) else lay
