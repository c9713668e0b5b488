"""The E-step shared by CPD and BCPD: posterior correspondences of a Gaussian mixture, block by block.

For target points x_n and (moved) source points y_m,

    p_mn = b_m·exp(−‖x_n − y_m‖²/2σ²) / (Σ_k b_k·exp(−‖x_n − y_k‖²/2σ²) + c_n)

(CPD: b_m = 1, c_n = (2πσ²)^{D/2}·w/(1−w)·M/N — Myronenko & Song 2010, eq. 7; BCPD: b_m = α_m,
c_n = (2πσ²)^{D/2}·ω/(1−ω)/V — Hirose 2021, with V the volume of the target's bounding box.)
Only the sums the M-steps need are formed — P·1 (M), Pᵀ·1 (N), P·X (M×D) and Σ_n log(denominator) —
over blocks of target rows, so memory is O(block × M), never a dense N×M matrix. Squared distances
come from ‖x‖² + ‖y‖² − 2x·y (one matrix product per block: no ``torch.cdist``); callers work in
normalised coordinates so that this expansion keeps its precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EStep:
    P1: torch.Tensor  # (M,) Σ_n p_mn
    Pt1: torch.Tensor  # (N,) Σ_m p_mn  (= 1 − outlier probability of x_n)
    PX: torch.Tensor  # (M, D) Σ_n p_mn x_n
    log_den: float  # Σ_n log(denominator_n)
    match: torch.Tensor | None = None  # (N,) argmax_m p_mn, −1 when the outlier class wins
    match_prob: torch.Tensor | None = None  # (N,)


def estep(X: torch.Tensor, Y: torch.Tensor, sigma2: float, b: torch.Tensor | None, c, block: int,
          want_match: bool = False) -> EStep:
    """Blocked E-step. ``X`` (N, D) targets, ``Y`` (M, D) moved source, ``b`` (M,) weights or None,
    ``c`` outlier term (float or (N,) tensor), ``block`` entries per block (rows × M).

    Memory-bound on CPU, so each block is touched few times: one product gives the exponent
    −‖x − y‖²/2σ² + log b = [x, 1, ‖x‖²]·[y/σ², −‖y‖²/2σ² + log b, −1/2σ²]ᵀ, then clamp, exp, the row sums,
    and one product Kᵀ·[1/den, x/den] gives P·1 and P·X together (P itself is never formed).
    """
    N, D = X.shape
    M = Y.shape[0]
    dt, dev = X.dtype, X.device
    tiny = torch.finfo(dt).tiny * 1e3
    k = -0.5 / sigma2
    # exp() of arguments below ≈ −708 (float32: −87) takes a slow path (5–20× slower); such terms are
    # < 1e-304 anyway, so the exponent is capped at −700 (−80) and the capped value subtracted: they
    # become exact zeros, every other term moves by < 1e-304 (1e-35).
    lo = 80.0 if dt == torch.float32 else 700.0
    floor = math.exp(-lo)
    ones = torch.ones(N, 1, dtype=dt, device=dev)
    XA = torch.cat([X, ones, (X * X).sum(1, keepdim=True)], 1)  # (N, D+2)
    col = k * (Y * Y).sum(1) + (torch.log(b) if b is not None else 0.0)
    YA = torch.cat([-2 * k * Y, col.unsqueeze(1), torch.full((M, 1), k, dtype=dt, device=dev)], 1).t().contiguous()
    acc = torch.zeros(M, D + 1, dtype=dt, device=dev)  # [P·1, P·X]
    Pt1 = torch.empty(N, dtype=dt, device=dev)
    log_den = torch.zeros((), dtype=dt, device=dev)
    match = torch.empty(N, dtype=torch.long, device=dev) if want_match else None
    match_prob = torch.empty(N, dtype=dt, device=dev) if want_match else None
    c_vec = torch.is_tensor(c)
    rows = max(1, min(N, block // max(M, 1)))
    buf = torch.empty(rows, M, dtype=dt, device=dev)  # reused: no fresh pages per block
    for i in range(0, N, rows):
        n = min(rows, N - i)
        K = torch.mm(XA[i:i + n], YA, out=buf[:n])
        K.clamp_(min=-lo, max=0.0).exp_().sub_(floor)
        ci = c[i:i + n] if c_vec else c
        ksum = K.sum(1)
        den = (ksum + ci).clamp_(min=tiny)
        inv = 1.0 / den
        acc.addmm_(K.t(), torch.cat([inv.unsqueeze(1), X[i:i + n] * inv.unsqueeze(1)], 1))
        Pt1[i:i + n] = ksum * inv
        log_den += torch.log(den).sum()
        if want_match:
            pm, im = K.max(1)
            pm = pm * inv
            out = ci * inv > pm  # the outlier class is more probable than any source point
            match[i:i + n] = torch.where(out, torch.full_like(im, -1), im)
            match_prob[i:i + n] = pm
    return EStep(acc[:, 0].contiguous(), Pt1, acc[:, 1:].contiguous(), float(log_den), match, match_prob)


#: Local E-step radius in units of σ (Hirose's ``-d``, default 7): exp(−7²/2) ≈ 2e-11.
LOCAL_RADIUS = 7.0


class EStepper:
    """Chooses, each iteration, between the dense blocked E-step and a local one (CPU only).

    Local (Hirose's KD-tree search, ``-p``): once σ is small, only source points within 7σ of a target
    point carry weight, so the pairs are found with ``scipy.spatial.cKDTree`` (the moved source's tree
    against fixed trees of target blocks) and the sums are formed over those pairs only — O(pairs)
    instead of O(N·M). A target point with no source point within 7σ keeps its 4 nearest ones, so it
    is normalised as in the dense E-step rather than dropped. Used when the estimated pairs are under
    5 % of N·M (where it starts to pay off); never on CUDA, where the dense E-step is fast.
    """

    #: Largest fraction of N·M pairs for which the local E-step is used.
    MAX_FRACTION = 0.05

    def __init__(self, X: torch.Tensor, block: int, local: bool | None = None):
        self.X, self.block = X, block
        self.local = (X.device.type == "cpu") if local is None else bool(local and X.device.type == "cpu")
        self._Xn = X.detach().cpu().double().numpy() if self.local else None
        self._probe = None
        self._blocks: dict = {}  # block rows → list of (start, cKDTree of that block of targets)
        self.local_steps = 0

    def __call__(self, Y: torch.Tensor, sigma2: float, b, c, want_match: bool = False) -> EStep:
        if self.local and not want_match:
            from scipy.spatial import cKDTree

            N, M = self.X.shape[0], Y.shape[0]
            rho = LOCAL_RADIUS * sigma2 ** 0.5
            Yn = Y.detach().cpu().double().numpy()
            tree = cKDTree(Yn)
            if self._probe is None:
                self._probe = np.random.default_rng(0).choice(N, min(N, 256), replace=False)
            per_row = tree.query_ball_point(self._Xn[self._probe], rho, return_length=True).mean()
            if per_row < self.MAX_FRACTION * M:
                self.local_steps += 1
                rows = 1 << int(np.log2(max(256, min(N, self.block // max(per_row, 1.0)))))
                if rows not in self._blocks:
                    self._blocks[rows] = [(s, cKDTree(self._Xn[s:s + rows])) for s in range(0, N, rows)]
                bn = None if b is None else b.detach().cpu().double().numpy()
                cn = c.detach().cpu().double().numpy() if torch.is_tensor(c) else float(c)
                return _estep_local(self._Xn, Yn, tree, self._blocks[rows], rho, sigma2, bn, cn, self.X.dtype)
        return estep(self.X, Y, sigma2, b, c, self.block, want_match)


def _estep_local(Xn, Yn, tree, blocks, rho, sigma2, b, c, dtype) -> EStep:
    """E-step over the (target, source) pairs closer than ``rho``, one block of targets at a time (numpy)."""
    N, D = Xn.shape
    M = len(Yn)
    tiny = np.finfo(np.float64).tiny * 1e3
    P1 = np.zeros(M)
    PX = np.zeros((M, D))
    Pt1 = np.empty(N)
    log_den = 0.0
    c_vec = not np.isscalar(c)
    for s, tx in blocks:
        n = tx.n
        pairs = tree.sparse_distance_matrix(tx, rho, output_type="ndarray")  # i: source, j: target in block
        m, t, d = pairs["i"], pairs["j"], pairs["v"]
        counts = np.bincount(t, minlength=n)
        lonely = np.flatnonzero(counts == 0)
        if len(lonely):  # keep the nearest few, as the dense E-step's normalisation would
            k = min(4, M)
            dd, nn = tree.query(Xn[s + lonely], k=k)
            m = np.concatenate([m, np.asarray(nn).ravel()])
            t = np.concatenate([t, np.repeat(lonely, k)])
            d = np.concatenate([d, np.asarray(dd).ravel()])
        kv = np.exp(d * d * (-0.5 / sigma2))
        if b is not None:
            kv *= b[m]
        ksum = np.bincount(t, kv, minlength=n)
        den = np.maximum(ksum + (c[s:s + n] if c_vec else c), tiny)
        p = kv / den[t]
        Pt1[s:s + n] = ksum / den
        P1 += np.bincount(m, p, minlength=M)
        x = Xn[s:s + n]
        for k_ in range(D):
            PX[:, k_] += np.bincount(m, p * x[t, k_], minlength=M)
        log_den += float(np.log(den).sum())
    as_t = lambda a: torch.from_numpy(a).to(dtype)  # noqa: E731
    return EStep(as_t(P1), as_t(Pt1), as_t(PX), log_den)
