"""ZipIt!-style zipping (Stoica, Bolya, Bjorner, Ramesh, Hearn, Hoffman, "ZipIt! Merging Models from Different
Tasks without Training", ICLR 2024).

Per hidden group, the ``N`` models' units (``N·n`` features) are compared by the correlation of their activations
on the data — *within and across* models — and merged greedily into ``n`` merged features: repeatedly the two
clusters with the highest (average-linkage) correlation are joined, a cluster holding at most ``N`` features.
With two models this is ZipIt!'s greedy pair matching on the concatenated correlation matrix (every feature in
exactly one pair, pairs inside one model allowed); for ``N`` models it is our generalisation *(our reading:
average linkage, the Lance–Williams update ``ρ(c₁∪c₂, k) = (|c₁|ρ(c₁,k) + |c₂|ρ(c₂,k)) / (|c₁|+|c₂|)``)*.

A merged feature ``c`` is the λ-weighted mean of its members (``Λ_c = Σ_{f∈c} λ_{m(f)}``): for model ``i``,
out-side ``O_i[c, f] = 1/Λ_c`` (so ``Σ_i λ_i O_i W_i`` is that mean) and in-side ``S_i[c, f] = 1`` ("unmerge": a
consumer of model ``i`` reads the merged feature in place of each of its members, so its columns for the members
of ``c`` are summed). The fused model is ``Σ_i λ_i (O_i, S_i)``-mapped parents, of the reference's widths.

For REPAIR every parent is also written in the merged coordinates on its own: ``O_i[c, f] = 1/|c ∩ i|`` (the mean
of its members of ``c``); a merged feature with no member of model ``i`` takes the fused model's unit there
*(our choice: it then pulls REPAIR's target toward the fused unit's own statistics)*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedfuse.merge.linear import Maps

__all__ = ["zip_clusters", "zip_maps"]


def _correlation(x: Tensor) -> np.ndarray:
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    sd = x.norm(dim=1, keepdim=True)
    x = torch.where(sd > 1e-12, x / sd.clamp_min(1e-300), torch.zeros_like(x))  # a dead unit correlates 0
    return (x @ x.T).numpy()


def zip_clusters(corr: np.ndarray, n_out: int, cap: int) -> np.ndarray:
    """Labels ``0..n_out-1`` of the features after greedy average-linkage merging of the most correlated pairs,
    clusters of at most ``cap`` features (ties broken by the lowest index: deterministic)."""
    m = corr.shape[0]
    if not 1 <= n_out <= m:
        raise ValueError(f"cannot merge {m} features into {n_out} clusters")
    link = corr.astype(np.float64, copy=True)
    np.fill_diagonal(link, -np.inf)
    size = np.ones(m, dtype=np.int64)
    parent = np.arange(m)
    for _ in range(m - n_out):
        total = size[:, None] + size[None, :]
        cand = np.where(total > cap, -np.inf, link)
        if not np.isfinite(cand).any():  # the size cap leaves no pair (sizes that cannot pack): smallest merge
            alive = np.isfinite(link)
            cand = np.where(alive & (total == total[alive].min()), link, -np.inf)
        i, j = divmod(int(np.argmax(cand)), m)
        i, j = min(i, j), max(i, j)
        si, sj = size[i], size[j]
        with np.errstate(invalid="ignore"):
            row = (si * link[i] + sj * link[j]) / (si + sj)  # -inf (dead clusters, the diagonal) stays -inf
        row[i] = -np.inf
        link[i], link[:, i] = row, row
        link[j], link[:, j] = -np.inf, -np.inf
        parent[parent == j] = i
        size[i], size[j] = si + sj, 0
    roots = np.unique(parent)
    return np.searchsorted(roots, parent)


def zip_maps(
    acts: Sequence[Mapping[str, Tensor]], lam: Sequence[float], ref: int
) -> tuple[list[Maps], list[Maps], dict[str, list[Tensor]]]:
    """Per model: fusion maps ``(O_i, S_i)``, REPAIR maps ``(O_i with 1/|c∩i|, S_i)``, and per group the merged
    features without members of model ``i`` (``empty[g][i]``: indices)."""
    n_models = len(acts)
    fuse_maps: list[Maps] = [{} for _ in acts]
    own_maps: list[Maps] = [{} for _ in acts]
    empty: dict[str, list[Tensor]] = {}
    for name in acts[ref]:
        widths = [a[name].shape[0] for a in acts]
        labels = zip_clusters(_correlation(torch.cat([a[name] for a in acts])), widths[ref], n_models)
        owner = np.repeat(np.arange(n_models), widths)
        k = widths[ref]
        lam_c = np.zeros(k)
        np.add.at(lam_c, labels, np.asarray(lam, dtype=np.float64)[owner])
        empty[name] = []
        start = 0
        for i, w in enumerate(widths):
            lab = torch.as_tensor(labels[start : start + w])
            start += w
            s = torch.zeros(k, w)
            s[lab, torch.arange(w)] = 1.0
            count = s.sum(1, keepdim=True)
            fuse_maps[i][name] = (s / torch.as_tensor(lam_c, dtype=torch.float32)[:, None].clamp_min(1e-12), s)
            own_maps[i][name] = (s / count.clamp_min(1.0), s)
            empty[name].append(torch.nonzero(count[:, 0] == 0).flatten())
    return fuse_maps, own_maps, empty
