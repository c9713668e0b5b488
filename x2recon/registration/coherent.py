"""Coherent Point Drift (Myronenko & Song, "Point set registration: coherent point drift", TPAMI 2010).

The target X (N points) is a sample of a Gaussian mixture centred on the moved source points
T(Y) (M points) plus a uniform outlier component of weight w. EM alternates the posterior
correspondences P (``estep``, block by block) with the closed-form M-steps of the paper's Figs. 2–4:

- ``rigid``: T(y) = sRy + t (``scale=False`` keeps s = 1), R from the SVD of XᵀPᵀY with det R = +1;
- ``affine``: T(y) = By + t;
- ``deformable``: T(Y) = Y + G·W, G the Gaussian kernel of width β over the source, regularised by
  λ (motion coherence); ``lowrank=K`` replaces G by its rank-K Nyström approximation (the paper's
  §5 uses the K largest eigenpairs; Nyström gives them without the M×M matrix).

σ² starts at Σ‖x_n − y_m‖²/(DNM) (the paper's initialisation); EM stops when the relative change of
the negative log-likelihood drops below ``tol`` (Myronenko's reference code: 1e-5, at most 150
iterations) or σ² reaches the precision floor. As in his code, both sets are first normalised to zero
mean and unit scale (rigid: one common scale, so that s = 1 stays meaningful), β and λ act in those
units, and every output is returned in the inputs' units.

    res = cpd(source, target, kind="rigid", w=0.1)       # arrays (N×D), trimesh meshes or mesh files
    res.Y_hat, res.R, res.t, res.s, res.sigma2, res.iterations
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .estep import EStepper, estep
from .inputs import load_pair
from .kernels import AUTO_RANK, FULL_RANK_MAX, check_full_rank, gaussian, gaussian_lowrank, solve_displacement
from .result import RegistrationResult
from .runtime import Monitor, block_elements, precise_on_cuda, resolve_device, resolve_dtype, sigma2_floor
from .sampling import voxel_sample

KINDS = ("rigid", "affine", "deformable")


def _init_sigma2(X: torch.Tensor, Y: torch.Tensor) -> float:
    N, D = X.shape
    M = Y.shape[0]
    s = N * (Y * Y).sum() + M * (X * X).sum() - 2 * (X.sum(0) * Y.sum(0)).sum()
    return float(s) / (D * N * M)


def _outlier_term(sigma2: float, w: float, D: int, M: int, N: int) -> float:
    """The uniform component's share of the E-step denominator (Myronenko & Song eq. 7)."""
    return (2 * math.pi * sigma2) ** (D / 2) * w / (1 - w) * M / N if w > 0 else 0.0


@dataclass
class _State:
    """CPD's transform and fit in normalised units (the fields its ``kind`` uses)."""

    T: torch.Tensor  # moved source (M, D)
    sigma2: float
    R: torch.Tensor
    t: torch.Tensor
    B: torch.Tensor
    s: float = 1.0
    W: torch.Tensor | None = None


def _linear_moments(e, X, Y, xx):
    """Weighted means and cross moments of the rigid/affine M-steps: μx, μy, X̂ᵀPᵀŶ, tr(X̂ᵀd(Pᵀ1)X̂), ŶᵀdP1Ŷ."""
    Np = float(e.P1.sum())
    mux = (e.Pt1 @ X) / Np
    muy = (e.P1 @ Y) / Np
    A = e.PX.t() @ Y - Np * torch.outer(mux, muy)  # X̂ᵀPᵀŶ (D×D)
    xPx = float(e.Pt1 @ xx) - Np * float(mux @ mux)
    YPY = (Y * e.P1.unsqueeze(1)).t() @ Y - Np * torch.outer(muy, muy)
    return Np, mux, muy, A, xPx, YPY


def _m_rigid(e, X, Y, xx, st: _State, scale: bool) -> None:
    """Rigid M-step (paper Fig. 2): R from the SVD of X̂ᵀPᵀŶ with det R = +1, then s, t, σ²."""
    Np, mux, muy, A, xPx, YPY = _linear_moments(e, X, Y, xx)
    D = X.shape[1]
    U, _, Vt = torch.linalg.svd(A)
    C = torch.ones(D, dtype=X.dtype, device=X.device)
    C[-1] = torch.sign(torch.linalg.det(U @ Vt))
    st.R = (U * C.unsqueeze(0)) @ Vt
    trAR = float((A * st.R).sum())
    st.s = trAR / float(YPY.trace()) if scale else 1.0
    st.t = mux - st.s * (st.R @ muy)
    st.sigma2 = (xPx - st.s * trAR) / (Np * D)
    st.T = st.s * (Y @ st.R.t()) + st.t


def _m_affine(e, X, Y, xx, st: _State) -> None:
    """Affine M-step (paper Fig. 3): B = X̂ᵀPᵀŶ·(ŶᵀdP1Ŷ)⁻¹, then t, σ²."""
    Np, mux, muy, A, xPx, YPY = _linear_moments(e, X, Y, xx)
    st.B = torch.linalg.solve(YPY, A.t()).t()  # A·YPY⁻¹ (YPY symmetric)
    st.t = mux - st.B @ muy
    st.sigma2 = (xPx - float((A * st.B).sum())) / (Np * X.shape[1])
    st.T = Y @ st.B.t() + st.t


def _m_deformable(e, X, Y, xx, st: _State, G, lam: float) -> float:
    """Deformable M-step (paper Fig. 4): W from (G + λσ²dP1⁻¹)W = dP1⁻¹PX − Y, then σ²; returns the
    regulariser λ/2·tr(WᵀGW) that the negative log-likelihood adds."""
    Np = float(e.P1.sum())
    nu = e.P1.clamp(min=1e-20)
    disp = solve_displacement(e.PX / nu.unsqueeze(1) - Y, nu, lam * st.sigma2, G)
    st.W = disp.coef
    st.T = Y + disp.V
    T = st.T
    st.sigma2 = (float(e.Pt1 @ xx) - 2 * float((e.PX * T).sum()) + float((e.P1 @ (T * T).sum(1)))) / (Np * X.shape[1])
    return lam / 2 * float((st.W * disp.V).sum())


def _deformable_kernel(Y0, Y, beta: float, lowrank, seed: int, info: dict):
    """CPD's Gaussian kernel over the normalised source: rank-``lowrank`` Nyström or full; returns (G, rank)."""
    M = len(Y0)
    if lowrank is None:
        lowrank = AUTO_RANK if M > FULL_RANK_MAX else 0
    if lowrank and lowrank < M:
        lm = voxel_sample(Y0, lowrank, 0.0, np.random.default_rng(seed))
        G = gaussian_lowrank(Y, beta, lm)
        info["kernel_rank"] = G.rank
        return G, lowrank
    check_full_rank(M)
    return gaussian(Y, Y, beta), lowrank


def _em(X, Y, kind, G, *, w, lam, scale, max_iter, tol, block, local, mon, sx):
    """EM until the relative change of the negative log-likelihood ≤ ``tol`` or σ² hits the floor."""
    N, D = X.shape
    M = Y.shape[0]
    dt, dev = X.dtype, X.device
    floor = sigma2_floor(dt)
    xx = (X * X).sum(1)
    eye = torch.eye(D, dtype=dt, device=dev)
    st = _State(T=Y.clone(), sigma2=_init_sigma2(X, Y), R=eye, t=torch.zeros(D, dtype=dt, device=dev), B=eye.clone())
    L_old, converged, history, it, e = None, False, [], 0, None
    es = EStepper(X, block, local)
    for it in range(1, max_iter + 1):
        e = es(st.T, st.sigma2, None, _outlier_term(st.sigma2, w, D, M, N))
        Np = float(e.P1.sum())
        if Np <= 0:
            raise ValueError("CPD: no target point is matched to the source (all outliers); "
                             "check that source and target overlap, or lower w")
        L = -e.log_den + D * Np / 2 * math.log(st.sigma2)
        if kind == "rigid":
            _m_rigid(e, X, Y, xx, st, scale)
        elif kind == "affine":
            _m_affine(e, X, Y, xx, st)
        else:
            L += _m_deformable(e, X, Y, xx, st, G, lam)
        st.sigma2 = abs(st.sigma2)
        history.append(st.sigma2 * sx * sx)
        ntol = abs(L - L_old) / max(abs(L), 1e-300) if L_old is not None else math.inf
        L_old = L
        mon(it / max_iter, f"CPD {kind}: iteration {it}, σ²={st.sigma2 * sx * sx:.4g}")
        if st.sigma2 <= floor:
            st.sigma2, converged = floor, True
            break
        if ntol <= tol:
            converged = True
            break
    return st, e, it, converged, history, es.local_steps


@precise_on_cuda
def cpd(source, target, kind: str = "deformable", *, w: float = 0.0, beta: float = 2.0, lam: float = 2.0,
        scale: bool = True, max_iter: int = 150, tol: float = 1e-5, lowrank: int | None = None, seed: int = 0,
        local: bool | None = None, device="auto", dtype=None, correspondence: bool = False, source_faces=None,
        progress=None, cancel=None) -> RegistrationResult:
    """Register ``source`` onto ``target`` with CPD; ``kind`` is ``rigid``, ``affine`` or ``deformable``.

    w: outlier weight in [0, 1) (paper's w). beta, lam: Gaussian kernel width β and regularisation λ
    (deformable only; in normalised units). scale: rigid with scale s (paper) or s = 1. lowrank: K > 0
    for a rank-K kernel, 0 for the full M×M one; None: full up to 2000 source points, else rank 300.
    correspondence: also return each target point's most probable source point.
    progress(fraction, message) may return False to cancel, as may cancel() → True (CancelledError).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= w < 1.0:
        raise ValueError(f"w (outlier weight) must be in [0, 1), got {w}")
    if beta <= 0 or lam <= 0:
        raise ValueError("beta and lambda must be positive")
    t0 = time.perf_counter()
    src, tgt = load_pair(source, target, source_faces)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    mon = Monitor(progress, cancel)
    Y0, X0 = src.points, tgt.points
    N = len(X0)
    M = len(Y0)

    # normalisation (Myronenko's cpd_normalize): zero mean, unit scale √(Σ‖x‖²/N)
    mx, my = X0.mean(0), Y0.mean(0)
    sx = math.sqrt(((X0 - mx) ** 2).sum() / N)
    sy = sx if kind == "rigid" else math.sqrt(((Y0 - my) ** 2).sum() / M)
    X = torch.as_tensor((X0 - mx) / sx, dtype=dt, device=dev)
    Y = torch.as_tensor((Y0 - my) / sy, dtype=dt, device=dev)
    block = block_elements(dev, dt)
    info: dict = {}
    G = None
    if kind == "deformable":
        G, lowrank = _deformable_kernel(Y0, Y, beta, lowrank, seed, info)
    st, e, it, converged, history, local_steps = _em(X, Y, kind, G, w=w, lam=lam, scale=scale, max_iter=max_iter,
                                                     tol=tol, block=block, local=local, mon=mon, sx=sx)
    info["local_estep_iterations"] = local_steps
    res = RegistrationResult(method=f"cpd-{kind}", Y_hat=np.empty(0), sigma2=st.sigma2 * sx * sx, iterations=it,
                             converged=converged, seconds=0.0, faces=src.faces, device=str(dev),
                             dtype=str(dt).replace("torch.", ""),
                             params=dict(kind=kind, w=w, max_iter=max_iter, tol=tol,
                                         **(dict(beta=beta, lam=lam, lowrank=lowrank) if kind == "deformable" else {}),
                                         **(dict(scale=scale) if kind == "rigid" else {})),
                             history=history, info=info)
    _to_input_units(res, st, kind, Y0, mx, my, sx, sy)
    res.P1 = e.P1.cpu().double().numpy()
    if correspondence:
        f = estep(X, st.T, st.sigma2, None, _outlier_term(st.sigma2, w, X.shape[1], M, N), block, want_match=True)
        res.match, res.match_prob = f.match.cpu().numpy(), f.match_prob.cpu().double().numpy()
    mon(1.0, f"CPD {kind}: done")
    res.seconds = time.perf_counter() - t0
    return res


def _to_input_units(res: RegistrationResult, st: _State, kind: str, Y0, mx, my, sx: float, sy: float) -> None:
    """The fitted transform and moved points back in the inputs' units (undoing both normalisations)."""
    if kind == "rigid":
        Rn = st.R.cpu().double().numpy()
        res.R, res.s = Rn, float(st.s)
        res.t = sx * st.t.cpu().double().numpy() + mx - st.s * Rn @ my
        res.Y_hat = st.s * Y0 @ Rn.T + res.t
    elif kind == "affine":
        Bn = st.B.cpu().double().numpy() * (sx / sy)
        res.B = Bn
        res.t = sx * st.t.cpu().double().numpy() + mx - Bn @ my
        res.Y_hat = Y0 @ Bn.T + res.t
    else:
        res.Y_hat = st.T.cpu().double().numpy() * sx + mx
        res.V = res.Y_hat - Y0
