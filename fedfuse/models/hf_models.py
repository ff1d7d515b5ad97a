"""Hugging Face ``transformers`` architectures as fedfuse models: ``--model hf:ARCH``, random init from a small
documented config (no hub access, no download).

=========== ============================================= ======================================================
ARCH        transformers class                            small config (hidden 32, 2 layers, 4 heads, FFN 64)
=========== ============================================= ======================================================
bert        BertForSequenceClassification                 vocab 64, 32 positions
distilbert  DistilBertForSequenceClassification           vocab 64, 32 positions
gpt2        GPT2ForSequenceClassification (LM: GPT2LMHeadModel, tied lm_head)   vocab 64, 32 positions
llama       LlamaForSequenceClassification (LM: LlamaForCausalLM)  RMSNorm, SwiGLU, rotary, 2 key/value heads (GQA)
vit         ViTForImageClassification                     patch = a divisor of the image side (≤ side/2)
=========== ============================================= ======================================================

On fedfuse's data sets (numbers, not text) a text architecture reads each input feature as a token: the features
are standardised per sample and bucketed into the vocabulary (``vocab`` equal-width buckets over ±3 std), so a
``(1, 8, 8)`` digits image is a sequence of 64 tokens. :func:`tiny_hf` builds the bare transformers model and a
keyword example input (what the alignment tests and ``benchmarks/hf_coverage.py`` use). transformers is optional:
without it ``hf:ARCH`` is refused with one line saying how to install it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedfuse.errors import ConfigError

__all__ = ["ARCHS", "PREFIX", "build_hf", "check_hf_name", "tiny_hf"]

PREFIX = "hf:"
ARCHS = ("bert", "distilbert", "gpt2", "llama", "vit")
LM_ARCHS = ("gpt2-lm", "llama-lm")  # causal LMs (tiny_hf only: their output is per-token logits)
VOCAB, MAX_POS = 64, 128


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def check_hf_name(name: str) -> str | None:
    """Why ``name`` (without the prefix) is not an ``hf:`` architecture this machine can build, or None."""
    if _transformers() is None:
        return "needs transformers, which is not installed: pip install 'fedfuse[hf]'"
    if name not in ARCHS:
        return f"is not allowed; allowed: {', '.join(PREFIX + a for a in ARCHS)}"
    return None


def _config(arch: str, num_classes: int, image: Sequence[int] | None = None) -> Any:
    t = _transformers()
    text = {"vocab_size": VOCAB, "num_labels": int(num_classes), "pad_token_id": 0}
    base = arch.removesuffix("-lm")
    if base == "bert":
        return t.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=MAX_POS, **text,
        )  # fmt: skip
    if base == "distilbert":
        return t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=MAX_POS, **text)
    if base == "gpt2":
        return t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POS, eos_token_id=1, bos_token_id=1, **text)
    if base == "llama":
        return t.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=MAX_POS, **text,
        )  # fmt: skip
    c, h, w = (int(s) for s in (image or (3, 16, 16)))
    patch = max(p for p in range(1, max(2, min(h, w) // 2) + 1) if h % p == 0 and w % p == 0 and h == w)
    return t.ViTConfig(
        image_size=h, patch_size=patch, num_channels=c, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=int(num_classes),
    )  # fmt: skip


_CLASSES = {
    "bert": "BertForSequenceClassification",
    "distilbert": "DistilBertForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "vit": "ViTForImageClassification",
    "gpt2-lm": "GPT2LMHeadModel",
    "llama-lm": "LlamaForCausalLM",
}


def tiny_hf(arch: str, num_classes: int = 3, seed: int = 0, tokens: int = 6) -> tuple[nn.Module, dict[str, Any]]:
    """The bare transformers model of ``arch`` (eval mode) and a keyword example input of 2 samples."""
    if _transformers() is None or (arch not in ARCHS and arch not in LM_ARCHS):
        raise ConfigError(f"arch {arch!r}: {check_hf_name(arch) or 'is not allowed'}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(_transformers(), _CLASSES[arch])(_config(arch, num_classes))
    if arch == "vit":
        return model.eval(), {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    ids = torch.randint(2, VOCAB, (2, tokens), generator=gen)
    mask = torch.ones_like(ids)
    if arch != "gpt2":  # GPT-2's classifier reads the last non-pad token: keep the batch unpadded there
        mask[1, tokens - 2 :] = 0
    return model.eval(), {"input_ids": ids, "attention_mask": mask}


class HFClassifier(nn.Module):
    """A transformers classifier on fedfuse's inputs: images go to ViT as ``pixel_values``; otherwise the features
    (standardised per sample) are bucketed into ``VOCAB`` tokens. Returns the logits tensor."""

    def __init__(self, model: nn.Module, image: bool) -> None:
        super().__init__()
        self.model = model
        self.image = image
        self.register_buffer("edges", torch.linspace(-3.0, 3.0, VOCAB - 1), persistent=False)
        # a classifier needs no key/value cache (and its objects cannot be traced)
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:
            return self.model(pixel_values=x).logits
        flat = x.flatten(1)
        z = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)
        ids = torch.bucketize(z, self.edges)
        return self.model(input_ids=ids, **self.extra).logits


def build_hf(name: str, input_shape: Sequence[int], num_classes: int, *, seed: int | None = None) -> nn.Module:
    """``hf:ARCH`` for inputs of ``input_shape`` and ``num_classes`` (see the module docstring)."""
    reason = check_hf_name(name)
    if reason:
        raise ConfigError(f"model={PREFIX + name!r} {reason}")
    shape = tuple(int(s) for s in input_shape)
    if name == "vit" and (len(shape) != 3 or shape[1] != shape[2]):
        raise ConfigError(f"{PREFIX}vit needs square images (C, H, W); this data set's inputs are {shape}")
    tokens = int(torch.tensor(shape).prod())
    if name != "vit" and tokens > MAX_POS:
        raise ConfigError(f"{PREFIX}{name} reads each feature as a token: {tokens} features exceed {MAX_POS} positions")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        cfg = _config(name, num_classes, shape if name == "vit" else None)
        model = getattr(_transformers(), _CLASSES[name])(cfg)
    return HFClassifier(model, image=name == "vit").train()
