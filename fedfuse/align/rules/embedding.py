"""Rules for embeddings: ``nn.Embedding`` / ``F.embedding`` (a lookup of weight rows).

``y[..., j] = W[idx, j]``: the embedding width ``j`` is a new group of hidden units (a transformer's residual
stream once the blocks' residual adds join it); its members are the columns of ``W``. The vocabulary rows stay
(they are indexed by the input tokens, which are never transported); ``padding_idx`` (a zero row) and
``max_norm`` (a row renormalisation: a row's norm does not change when its columns are permuted) commute with it.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from fedfuse.align.rules.core import Layout, ParamRef, _arg


def _lookup(d: Any, node: fx.Node, idx: Any, key: str, width: int, name: str) -> Layout:
    d.fix(d.lay(idx))  # token ids: no hidden units (fixing is a no-op on an integer input)
    rank = d.values[node.name].dim()
    g = d.new_group(name, width)
    d.add(g, key, 1, "out")
    return Layout(rank - 1, ((g, width),))


def embedding(d: Any, node: fx.Node, mod: nn.Embedding) -> Any:
    """``nn.Embedding`` (and ``nn.EmbeddingBag``: a sum, mean or max over rows is still column-wise)."""
    name = str(node.target)
    return _lookup(d, node, node.args[0], f"{name}.weight", mod.embedding_dim, name)


def functional_embedding(d: Any, node: fx.Node, mod: Any = None) -> Any:
    """``F.embedding(idx, W, ...)`` with W a model parameter."""
    w = _arg(node, F.embedding, "weight")
    ref = d.lay(w)
    if not isinstance(ref, ParamRef) or ref.dims != (0, 1):
        raise d.unsupported(node, "its weight is computed, not a model parameter")
    name = ref.key.rsplit(".", 1)[0] if "." in ref.key else ref.key
    return _lookup(d, node, _arg(node, F.embedding, "input"), ref.key, d.value(w).shape[1], name)
