"""Derivation rules by op family (see :mod:`fedfuse.align.rules.core` for the layouts and the tables): this module
fills the tables."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedfuse.align.rules.attention import (
    matmul,
    multihead_attention,
    qkv_attention_module,
    scaled_dot_product_attention,
    shifted_window_attention,
)
from fedfuse.align.rules.core import (
    FIXED,
    FIXED_ID,
    FUNCTION_RULES,
    LEAF_RULES,
    METHOD_RULES,
    MODULE_RULES,
    Layout,
    ParamRef,
    Rule,
    Stacked,
    is_leaf,
    lookup_rule,
    register_leaf_rule,
    register_rule,
)
from fedfuse.align.rules.embedding import embedding, functional_embedding
from fedfuse.align.rules.hf import LEAVES as HF_LEAVES
from fedfuse.align.rules.hf import power, rms_norm
from fedfuse.align.rules.layers import (
    conv,
    conv_transpose,
    elementwise,
    fixed_output,
    flatten_module,
    functional_batch_norm,
    functional_conv,
    functional_group_norm,
    functional_layer_norm,
    functional_linear,
    layer_norm_module,
    linear,
    norm_rule,
    patch_merging,
    pool,
    rnn,
)
from fedfuse.align.rules.tensor_ops import (
    addcmul,
    binary,
    cat,
    expand_method,
    getattr_rule,
    getitem,
    glu,
    interpolate,
    max_min,
    move_dims,
    pad,
    reduce,
    repeat,
    repeat_interleave,
    reshape,
    roll,
    split,
    stack,
    unfold,
    vector_norm,
)
from fedfuse.align.rules.transformer import transformer_module

# --------------------------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------------------------

__all__ = [
    "FIXED",
    "FIXED_ID",
    "FUNCTION_RULES",
    "LEAF_RULES",
    "METHOD_RULES",
    "MODULE_RULES",
    "Layout",
    "ParamRef",
    "Rule",
    "Stacked",
    "elementwise",
    "is_leaf",
    "lookup_rule",
    "norm_rule",
    "qkv_attention_module",
    "register_leaf_rule",
    "register_rule",
    "supported_summary",
]

_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.ReLU6, nn.Hardtanh,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.SELU, nn.CELU, nn.Softsign, nn.Tanhshrink, nn.PReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_ACT_FUNCS: tuple[Any, ...] = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.gelu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.leaky_relu,
    F.elu, F.silu, F.softplus, F.relu6, F.hardtanh, F.mish, F.selu, F.celu, F.hardswish, F.hardsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
    operator.neg, torch.neg, torch.abs, torch.clone, torch.exp, torch.square, torch.erf, torch.sqrt, torch.rsqrt,
    "torchvision.ops.stochastic_depth.stochastic_depth",
)  # fmt: skip
_ACT_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "double",
    "half", "to", "type_as", "neg", "abs", "softmax", "log_softmax", "exp", "square", "cpu", "cuda", "sqrt",
)  # fmt: skip
_BINARY: tuple[Any, ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
)  # fmt: skip
_POOL_FUNCS: tuple[Any, ...] = (
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d,
)  # fmt: skip

for _t in _ACT_MODULES:
    register_rule(_t, elementwise)
for _t in _POOL_MODULES:
    register_rule(_t, pool)
for _t in (*_ACT_FUNCS, *_ACT_METHODS):
    register_rule(_t, elementwise)
for _t in _BINARY:
    register_rule(_t, binary)
for _t in _POOL_FUNCS:
    register_rule(_t, pool)
for _t in (torch.cat, torch.concat, torch.concatenate):
    register_rule(_t, cat)
for _t in ("view", "reshape", "flatten", "view_as", "reshape_as", torch.reshape, torch.flatten):
    register_rule(_t, reshape)
for _op in ("transpose", "permute", "squeeze", "unsqueeze"):
    register_rule(_op, move_dims(_op))
    register_rule(getattr(torch, _op), move_dims(_op))
for _t in (nn.GLU, F.glu):
    register_rule(_t, glu)
register_rule(F.normalize, elementwise)  # x / ‖x‖ along a dim: per unit, or a permutation-invariant norm
for _t in ("t", torch.t):
    register_rule(_t, move_dims("t"))
for _t in ("swapaxes", "swapdims", torch.swapaxes, torch.swapdims):
    register_rule(_t, move_dims("transpose"))
for _t in ("mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin):
    register_rule(_t, reduce)
register_rule(operator.getitem, getitem)
for _t in ("chunk", "split", torch.chunk, torch.split):
    register_rule(_t, split)
register_rule("expand", expand_method)
register_rule(F.interpolate, interpolate)
register_rule(nn.Upsample, interpolate)
register_rule(F.linear, functional_linear)
register_rule(F.pad, pad)
register_rule(torch.roll, roll)
register_rule("repeat", repeat)
for _t in ("repeat_interleave", torch.repeat_interleave):
    register_rule(_t, repeat_interleave)
register_rule(torch.stack, stack)
register_rule(nn.Unfold, unfold)
register_rule(getattr, getattr_rule)
for _t in ("max", "min", torch.max, torch.min):
    register_rule(_t, max_min)
register_rule(F.unfold, unfold)
for _t in (F.conv1d, F.conv2d):
    register_rule(_t, functional_conv)
for _t in ("Conv2dSame", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
    _mod = "conv2d_same" if _t == "Conv2dSame" else "std_conv"
    register_leaf_rule(f"timm.layers.{_mod}.{_t}", conv)  # a Conv2d whose forward pads or standardises its weight
register_rule("roll", roll)
for _t in (torch.addcmul, torch.addcdiv, "addcmul", "addcdiv"):
    register_rule(_t, addcmul)
for _t in ("norm", torch.norm, torch.linalg.vector_norm):
    register_rule(_t, vector_norm)
for _t in (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"):
    register_rule(_t, matmul)
register_rule(F.scaled_dot_product_attention, scaled_dot_product_attention)
register_leaf_rule("timm.layers.attention.Attention", qkv_attention_module)
register_leaf_rule("timm.models.swin_transformer.WindowAttention", qkv_attention_module)
register_rule(nn.Linear, linear)
register_rule(nn.Conv1d, conv)
register_rule(nn.Conv2d, conv)
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d):
    register_rule(_t, conv_transpose)
register_rule(nn.modules.batchnorm._BatchNorm, norm_rule(("weight", "bias", "running_mean", "running_var")))
register_rule(nn.modules.instancenorm._InstanceNorm, norm_rule(("weight", "bias", "running_mean", "running_var")))
register_rule(nn.GroupNorm, norm_rule(("weight", "bias"), check_groups=True))
register_rule(nn.LayerNorm, layer_norm_module)
register_rule(nn.Flatten, flatten_module)
register_rule(nn.RNNBase, rnn)
register_rule(nn.MultiheadAttention, multihead_attention)
register_rule(F.layer_norm, functional_layer_norm)
for _name, _rule in HF_LEAVES.items():
    register_leaf_rule(_name, _rule)
for _t in (torch.pow, operator.pow, "pow"):
    register_rule(_t, power)
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, rms_norm)
register_rule(nn.Embedding, embedding)
for _t in (nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
    register_rule(_t, transformer_module)
register_rule(nn.EmbeddingBag, embedding)
register_rule(F.embedding, functional_embedding)
register_rule(F.batch_norm, functional_batch_norm)
register_rule(F.group_norm, functional_group_norm)
register_rule("torchvision.models.swin_transformer.shifted_window_attention", shifted_window_attention)
register_rule("torchvision.models.swin_transformer._get_relative_position_bias", fixed_output)
register_rule("torchvision.models.swin_transformer._patch_merging_pad", patch_merging)


def supported_summary() -> str:
    """One line naming what the tables cover (for error messages)."""
    return (
        "Linear, Conv1d/2d (incl. depthwise/grouped), ConvTranspose1d/2d, weight_norm/spectral_norm, tied weights, "
        "BatchNorm/InstanceNorm, LayerNorm, RMSNorm, GroupNorm (units within their group, groups as blocks), "
        "functional layer_norm/batch_norm/group_norm, Embedding, RNN/LSTM/GRU, "
        "MultiheadAttention (self/cross-attention), "
        "TransformerEncoder/Decoder(+Layer), "
        "Swin window attention, Hugging Face attention (BERT, GPT-2, DistilBERT, ViT, Llama/Mistral), Conv1D, "
        "element-wise activations, pooling (incl. adaptive), flatten/view/reshape anywhere, "
        "transpose/permute/squeeze/unsqueeze/expand, indexing, residual add/sub/mul, addcmul, layer scale, torch.cat, "
        "chunk/split, GLU, F.normalize, F.pad, matmul (x @ W with W a parameter: a dense layer), "
        "scaled_dot_product_attention, mean/sum/norm over non-channel dims; "
        "add one with fedfuse.align.rules.register_rule"
    )
