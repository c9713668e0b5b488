"""Motion-coherence kernels G (M×M over the source points) and the displacement solve they enter.

- Gaussian kernel g(y, y') = exp(−‖y − y'‖²/2β²) (CPD: Myronenko & Song 2010; BCPD: Hirose 2021).
- Low rank G ≈ Q·diag(L)·Qᵀ by the Nyström method (Hirose's ``-K``): K landmark columns G[:, U],
  eigendecomposition of the K×K block G[U, U] = VΛVᵀ, Q = √(K/M)·G[:, U]·V·Λ⁻¹, L = (M/K)·Λ.
  Eigenvalues ≤ ε·max are dropped (Hirose's ``-z``), which also makes an indefinite kernel (the
  geodesic one) positive semi-definite.
- The displacement update shared by both methods: v = G·(G + cc·diag(1/ν))⁻¹·E, with E the
  residual in the source frame, ν = P·1 and cc = λσ²/s² (BCPD; CPD: λσ², s = 1). Dense G: a Cholesky
  solve; low rank: the Woodbury identity, O(M·K²).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


#: Without an explicit rank, kernels over more than this many points are Nyström rank ``AUTO_RANK``
#: (a dense M×M kernel and its per-iteration solve stop being affordable; Hirose's demos use 70–300).
FULL_RANK_MAX = 2000
AUTO_RANK = 300


#: A full-rank kernel over more points than this is refused (M² memory, O(M³) work per solve).
FULL_RANK_LIMIT = 10000


def check_full_rank(M: int) -> None:
    if M > FULL_RANK_LIMIT:
        raise ValueError(f"a full-rank kernel over {M:,} points needs {M * M * 8 / 2**30:.1f} GiB and an O(M³) "
                         f"solve per iteration; use a Nyström rank (nystrom=300, --nystrom 300) and/or downsampling")


@dataclass
class LowRank:
    """G ≈ Q·diag(L)·Qᵀ."""

    Q: torch.Tensor  # (M, K)
    L: torch.Tensor  # (K,)

    @property
    def rank(self) -> int:
        return int(self.L.numel())

    def rows(self, idx) -> "LowRank":
        return LowRank(self.Q[idx], self.L)


def sq_dist(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖a − b‖² for all pairs (|A| × |B|), by the expansion (no ``torch.cdist``), clamped at 0."""
    d2 = torch.addmm((B * B).sum(1).unsqueeze(0), A, B.t(), beta=1.0, alpha=-2.0)
    return d2.add_((A * A).sum(1).unsqueeze(1)).clamp_(min=0.0)


def gaussian(A: torch.Tensor, B: torch.Tensor, beta: float) -> torch.Tensor:
    return sq_dist(A, B).mul_(-0.5 / beta**2).exp_()


def nystrom(columns: torch.Tensor, landmarks: np.ndarray, eps: float) -> LowRank:
    """Nyström eigen-approximation from the kernel's landmark columns ``columns = G[:, landmarks]``.

    Computed in float64 (K×K eigenproblem, one M×K product) and returned in the columns' dtype.
    """
    dt = columns.dtype
    C = columns.double()
    M, K = C.shape
    A = C[torch.as_tensor(landmarks, device=C.device)]
    lam, V = torch.linalg.eigh(0.5 * (A + A.t()))  # ascending
    keep = lam > max(eps, 1e-13) * lam.max().clamp(min=1e-300)
    lam, V = lam[keep].flip(0), V[:, keep].flip(1)
    Q = C @ (V / lam.unsqueeze(0)) * (K / M) ** 0.5
    return LowRank(Q.to(dt), (lam * (M / K)).to(dt))


def eig_lowrank(G: torch.Tensor, eps: float) -> LowRank:
    """Exact eigendecomposition (float64) of a symmetric, possibly indefinite G, keeping eigenvalues > ε·max."""
    lam, V = torch.linalg.eigh(0.5 * (G + G.t()).double())
    keep = lam > max(eps, 1e-13) * lam.max()
    return LowRank(V[:, keep].flip(1).contiguous().to(G.dtype), lam[keep].flip(0).to(G.dtype))


def gaussian_lowrank(Y: torch.Tensor, beta: float, landmarks: np.ndarray, eps: float = 1e-8) -> LowRank:
    return nystrom(gaussian(Y, Y[torch.as_tensor(landmarks, device=Y.device)], beta), landmarks, eps)


def gaussian_apply(Ynew: torch.Tensor, Ybase: torch.Tensor, W: torch.Tensor, beta: float, block: int) -> torch.Tensor:
    """G(Ynew, Ybase)·W without forming the full matrix (``block`` entries at a time)."""
    out = torch.empty(Ynew.shape[0], W.shape[1], dtype=W.dtype, device=W.device)
    rows = max(1, block // max(Ybase.shape[0], 1))
    for i in range(0, Ynew.shape[0], rows):
        out[i:i + rows] = gaussian(Ynew[i:i + rows], Ybase, beta) @ W
    return out


@dataclass
class Displacement:
    V: torch.Tensor  # (M, D) displacement
    coef: torch.Tensor  # (M, D) Z = (G + cc·diag(1/ν))⁻¹·E: V = G·Z; interpolates v(y) = g(y, Y)·Z
    B: torch.Tensor | None = None  # (K, D) low rank: V = Q·B (interpolates through Q's rows)


def solve_displacement(E: torch.Tensor, nu: torch.Tensor, cc: float, G) -> Displacement:
    """v = G·(G + cc·diag(1/ν))⁻¹·E for a dense ``G`` (M×M tensor) or a ``LowRank``.

    Low rank: Woodbury gives v = Q·A⁻¹·Qᵀ·diag(ν)·E with A = cc·diag(1/L) + Qᵀ·diag(ν)·Q — no division
    by cc, which is tiny once σ is (Hirose's form divides by it and loses float32 precision). The
    K×K (or M×M) systems are solved in float64 whatever the working precision: they are small, and
    their condition number grows like 1/σ².
    """
    dt = E.dtype
    if isinstance(G, LowRank):
        Q, L = G.Q, G.L
        C = nu.unsqueeze(1) * Q  # diag(ν)·Q
        A = (Q.t() @ C).double()
        A.diagonal().add_(cc / L.double())
        rhs = (C.t() @ E).double()
        B = _spd_solve(A, rhs).to(dt)
        return Displacement(Q @ B, (nu.unsqueeze(1) * E - C @ B) / cc, B)
    Gd = G.double()
    A = Gd.clone()
    A.diagonal().add_(cc / nu.double())
    Z = _spd_solve(A, E.double())
    return Displacement((Gd @ Z).to(dt), Z.to(dt))


def _spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    Lc, info = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(B, Lc) if int(info) == 0 else torch.linalg.lstsq(A, B).solution
