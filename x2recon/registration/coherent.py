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
    N, D = X0.shape
    M = len(Y0)

    # normalisation (Myronenko's cpd_normalize): zero mean, unit scale √(Σ‖x‖²/N)
    mx, my = X0.mean(0), Y0.mean(0)
    sx = math.sqrt(((X0 - mx) ** 2).sum() / N)
    sy = sx if kind == "rigid" else math.sqrt(((Y0 - my) ** 2).sum() / M)
    X = torch.as_tensor((X0 - mx) / sx, dtype=dt, device=dev)
    Y = torch.as_tensor((Y0 - my) / sy, dtype=dt, device=dev)
    block = block_elements(dev, dt)
    floor = sigma2_floor(dt)

    G = None
    info: dict = {}
    if kind == "deformable":
        if lowrank is None:
            lowrank = AUTO_RANK if M > FULL_RANK_MAX else 0
        if lowrank and lowrank < M:
            lm = voxel_sample(Y0, lowrank, 0.0, np.random.default_rng(seed))
            G = gaussian_lowrank(Y, beta, lm)
            info["kernel_rank"] = G.rank
        else:
            check_full_rank(M)
            G = gaussian(Y, Y, beta)
    xx = (X * X).sum(1)
    T = Y.clone()
    sigma2 = _init_sigma2(X, Y)
    R = torch.eye(D, dtype=dt, device=dev)
    t = torch.zeros(D, dtype=dt, device=dev)
    s = 1.0
    B = torch.eye(D, dtype=dt, device=dev)
    W = None
    L_old, converged, history = None, False, []
    it = 0
    e = None
    es = EStepper(X, block, local)
    for it in range(1, max_iter + 1):
        c = (2 * math.pi * sigma2) ** (D / 2) * w / (1 - w) * M / N if w > 0 else 0.0
        e = es(T, sigma2, None, c)
        Np = float(e.P1.sum())
        if Np <= 0:
            raise ValueError("CPD: no target point is matched to the source (all outliers); "
                             "check that source and target overlap, or lower w")
        L = -e.log_den + D * Np / 2 * math.log(sigma2)
        if kind == "rigid" or kind == "affine":
            mux = (e.Pt1 @ X) / Np
            muy = (e.P1 @ Y) / Np
            A = e.PX.t() @ Y - Np * torch.outer(mux, muy)  # X̂ᵀPᵀŶ (D×D)
            xPx = float(e.Pt1 @ xx) - Np * float(mux @ mux)
            YPY = (Y * e.P1.unsqueeze(1)).t() @ Y - Np * torch.outer(muy, muy)
            if kind == "rigid":
                U, _, Vt = torch.linalg.svd(A)
                C = torch.ones(D, dtype=dt, device=dev)
                C[-1] = torch.sign(torch.linalg.det(U @ Vt))
                R = (U * C.unsqueeze(0)) @ Vt
                trAR = float((A * R).sum())
                s = trAR / float(YPY.trace()) if scale else 1.0
                t = mux - s * (R @ muy)
                sigma2 = (xPx - s * trAR) / (Np * D)
                T = s * (Y @ R.t()) + t
            else:
                B = torch.linalg.solve(YPY, A.t()).t()  # A·YPY⁻¹ (YPY symmetric)
                t = mux - B @ muy
                sigma2 = (xPx - float((A * B).sum())) / (Np * D)
                T = Y @ B.t() + t
        else:
            nu = e.P1.clamp(min=1e-20)
            disp = solve_displacement(e.PX / nu.unsqueeze(1) - Y, nu, lam * sigma2, G)
            W = disp.coef
            L += lam / 2 * float((W * disp.V).sum())
            T = Y + disp.V
            sigma2 = (float(e.Pt1 @ xx) - 2 * float((e.PX * T).sum()) + float((e.P1 @ (T * T).sum(1)))) / (Np * D)
        sigma2 = abs(sigma2)
        history.append(sigma2 * sx * sx)
        ntol = abs(L - L_old) / max(abs(L), 1e-300) if L_old is not None else math.inf
        L_old = L
        mon(it / max_iter, f"CPD {kind}: iteration {it}, σ²={sigma2 * sx * sx:.4g}")
        if sigma2 <= floor:
            sigma2, converged = floor, True
            break
        if ntol <= tol:
            converged = True
            break

    res = RegistrationResult(method=f"cpd-{kind}", Y_hat=np.empty(0), sigma2=sigma2 * sx * sx, iterations=it,
                             converged=converged, seconds=0.0, faces=src.faces, device=str(dev),
                             dtype=str(dt).replace("torch.", ""),
                             params=dict(kind=kind, w=w, max_iter=max_iter, tol=tol,
                                         **(dict(beta=beta, lam=lam, lowrank=lowrank) if kind == "deformable" else {}),
                                         **(dict(scale=scale) if kind == "rigid" else {})),
                             history=history, info=info)
    info["local_estep_iterations"] = es.local_steps
    if kind == "rigid":
        Rn = R.cpu().double().numpy()
        res.R, res.s = Rn, float(s)
        res.t = sx * t.cpu().double().numpy() + mx - s * Rn @ my
        res.Y_hat = s * Y0 @ Rn.T + res.t
    elif kind == "affine":
        Bn = B.cpu().double().numpy() * (sx / sy)
        res.B = Bn
        res.t = sx * t.cpu().double().numpy() + mx - Bn @ my
        res.Y_hat = Y0 @ Bn.T + res.t
    else:
        res.Y_hat = T.cpu().double().numpy() * sx + mx
        res.V = res.Y_hat - Y0
    res.P1 = e.P1.cpu().double().numpy()
    if correspondence:
        c = (2 * math.pi * sigma2) ** (D / 2) * w / (1 - w) * M / N if w > 0 else 0.0
        f = estep(X, T, sigma2, None, c, block, want_match=True)
        res.match, res.match_prob = f.match.cpu().numpy(), f.match_prob.cpu().double().numpy()
    mon(1.0, f"CPD {kind}: done")
    res.seconds = time.perf_counter() - t0
    return res
