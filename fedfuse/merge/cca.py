"""CCA Merge (Horoi, Orozco Camacho, Belilovsky, Wolf, "Harmony in Diversity: Merging Neural Networks with
Canonical Correlation Analysis", ICML 2024, arXiv 2407.05385).

Per hidden group, with the reference model ``r``'s activations ``A`` and model ``i``'s ``B`` on the data (units ×
samples, centred; covariances ``Σ_AA, Σ_BB`` regularised by ``ε·mean(diag Σ)·I``, cross-covariance ``Σ_AB``),
CCA finds directions ``P_A = Σ_AA^{-1/2} U``, ``P_B = Σ_BB^{-1/2} V`` from the SVD
``Σ_AA^{-1/2} Σ_AB Σ_BB^{-1/2} = U diag(ρ) Vᵀ`` (``ρ`` the canonical correlations), so that ``P_Aᵀa`` and ``P_Bᵀb``
are maximally correlated coordinate by coordinate. Identifying the two canonical spaces maps model ``i``'s units
into the reference's:

    a ≈ M b,   M = P_A^{-T} P_Bᵀ = Σ_AA^{1/2} U Vᵀ Σ_BB^{-1/2},   M⁻¹ = Σ_BB^{1/2} V Uᵀ Σ_AA^{-1/2}

(the paper's ``T = P_B P_A^{-1}`` in row form). Model ``i`` is rewritten in the reference's coordinates layer by
layer — a unit's weights and bias ``W ← M_g W``, a consumer's columns ``W ← W M_g⁻¹`` — and the rewritten models are
λ-averaged. Exact between linear maps, approximate through ReLU and pooling (``M relu(z) ≈ relu(M z)``), as in the
paper. A permuted copy (``b = P a``) is mapped back exactly up to float error: the whitened cross-covariance is
``D Pᵀ`` with ``D`` symmetric positive definite, whose polar factor ``UVᵀ`` is ``Pᵀ``, so ``M = Pᵀ``. Units dead
on the data make ``D`` singular and leave their block arbitrary; they are paired one-to-one instead.
Multi-model form: every model is mapped into the reference's space (the largest-λ model by default; ``fuse(init=…)``
picks another) and the results averaged. ``M`` also matches second moments: ``M Σ_BB Mᵀ = Σ_AA`` (regularised covariances).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedfuse.merge.linear import Maps

__all__ = ["cca_maps", "cca_transform", "DEFAULT_REG"]

#: relative ridge ``ε`` on the covariances (dead or duplicate units make them singular); 0.1 measured on digits
#: (two MLPs trained apart: 1e-3 → 0.766, 1e-2 → 0.942, 0.1 → 0.950, 1.0 → 0.950 test accuracy)
DEFAULT_REG = 0.1


def _sym_pow(c: Tensor, p: float) -> Tensor:
    vals, vecs = torch.linalg.eigh(c)
    return (vecs * vals.clamp_min(1e-12).pow(p)) @ vecs.T


def cca_transform(a: Tensor, b: Tensor, reg: float = DEFAULT_REG) -> tuple[Tensor, Tensor]:
    """``(M, M⁻¹)`` (float32, ``n_a × n_b`` and ``n_b × n_a``) mapping ``b``'s units into ``a``'s: ``a ≈ M b``.

    ``a``, ``b``: activations, units × samples (the same samples)."""
    a, b = a.double(), b.double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    s = a.shape[1]
    caa, cbb, cab = a @ a.T / s, b @ b.T / s, a @ b.T / s

    def ridge(c: Tensor) -> Tensor:
        return c + reg * max(float(c.diagonal().mean()), 1e-12) * torch.eye(len(c), dtype=c.dtype)

    dead_a, dead_b = _dead(caa), _dead(cbb)
    caa, cbb = ridge(caa), ridge(cbb)
    ra, ra_inv, rb, rb_inv = _sym_pow(caa, 0.5), _sym_pow(caa, -0.5), _sym_pow(cbb, 0.5), _sym_pow(cbb, -0.5)
    u, _, vt = torch.linalg.svd(ra_inv @ cab @ rb_inv, full_matrices=False)
    m = ra @ u @ vt @ rb_inv
    m_inv = rb @ vt.T @ u.T @ ra_inv
    if dead_a.any() or dead_b.any():
        m, m_inv = _pair_dead(m, m_inv, dead_a, dead_b)
    return m.float(), m_inv.float()


def _dead(c: Tensor) -> Tensor:
    """Units whose variance is 0 on the data (a ReLU that never fires)."""
    var = c.diagonal()
    return var <= 1e-12 * max(float(var.max()), 1e-300)


def _pair_dead(m: Tensor, m_inv: Tensor, dead_a: Tensor, dead_b: Tensor) -> tuple[Tensor, Tensor]:
    """Dead units carry no signal, so CCA leaves their block an arbitrary rotation — mixing never-firing units with
    signed weights can wake them. *(our choice)*: dead units of B map one-to-one onto dead units of A (the
    assignment maximising ``|M|`` on that block), with nothing else in their rows/columns; unpaired ones drop."""
    from scipy.optimize import linear_sum_assignment

    block = m[dead_a][:, dead_b].abs().numpy()
    m, m_inv = m.clone(), m_inv.clone()
    m[dead_a, :], m[:, dead_b] = 0.0, 0.0
    m_inv[dead_b, :], m_inv[:, dead_a] = 0.0, 0.0
    if block.size:
        rows, cols = linear_sum_assignment(block, maximize=True)
        ia, ib = torch.nonzero(dead_a).flatten()[rows], torch.nonzero(dead_b).flatten()[cols]
        m[ia, ib], m_inv[ib, ia] = 1.0, 1.0
    return m, m_inv


def cca_maps(acts: Sequence[Mapping[str, Tensor]], ref: int, reg: float = DEFAULT_REG) -> list[Maps]:
    """Per model, ``{group: (M, M⁻ᵀ)}`` into the reference's space (the reference: none, it stays as it is)."""
    maps: list[Maps] = []
    for i, act in enumerate(acts):
        if i == ref:
            maps.append({})
            continue
        per: Maps = {}
        for name, b in act.items():
            m, m_inv = cca_transform(acts[ref][name], b, reg)
            per[name] = (m, m_inv.T.contiguous())
        maps.append(per)
    return maps
