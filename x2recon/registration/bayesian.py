"""Bayesian Coherent Point Drift (Hirose, "A Bayesian formulation of coherent point drift", TPAMI 2021),
its geodesic-kernel variant GBCPD (Hirose, TPAMI 2022) and their "++" acceleration (Hirose,
"Acceleration of non-rigid point set registration with downsampling and Gaussian process
regression", TPAMI 2021).

Model (Hirose's ``-Tsrn``, default): T(y_m) = sR(y_m + v_m) + t — a similarity transform and a
displacement field v with a Gaussian-process prior of covariance G/λ (motion coherence). Variational
Bayes alternates: correspondences P (``estep``), the displacement v = G(G + cc·diag(1/ν))⁻¹E
(cc = λσ²/s²), the mixing coefficients α (when κ < ∞), the similarity (s, R, t) in closed form, σ².
As in Hirose's ``bcpd`` program (his defaults in brackets, his option letters in parentheses):

    w      (-w) outlier probability ω in [0, 1)                          [0]
    lam    (-l) λ, expected displacement length √(D/λ); larger = stiffer  [2]
    beta   (-b) β, kernel width (normalised units)                        [2]
    gamma  (-g) γ, σ starts at γ·√(mean squared distance/D)               [1]
    kappa  (-k) κ, Dirichlet prior of α; ∞ = equal mixing coefficients   [∞]
    nystrom(-K) rank K of G (Nyström); 0 = full                           [0; here: auto, see below]
    tol    (-c) stop when σ or its change < tol (normalised units)        [1e-4]
    max_iter (-n) / min_iter (-N) VB loops                                [500 / 30]
    normalize (-u) e: each set to zero mean, unit scale; x/y: both by X's/Y's; n: none   [e]
    transform (-T) srn, sr, rn, r, n, a, an                               [srn]
    downsample (-D B,n,r) "++": fit n points of each set (voxel r), interpolate v   [off]
    tau    (-G geodesic,τ,…) GBCPD's weight of the geodesic term          [GBCPD: 1]
    eps    (-z) drop kernel eigenvalues ≤ ε·max (geodesic kernel PSD)    [1e-3]

Hirose's Nyström approximation of P (``-J``) is not used: P's sums are computed exactly, block by
block (``estep``; on a GPU this is what makes 20k × 20k take seconds); on CPU, once σ is small, only
pairs within 7σ are summed (his KD-tree ``-p`` with ``-d7``, without his 0.15 radius cap: the
neglected terms are < 2e-11 of the largest; ``local=False`` turns it off). The posterior covariance
term of v (his ``-a``, off by default) is omitted as in his default run.
Without ``nystrom`` the Gaussian kernel is full rank up to 2000 fitted points and rank 300 above;
the geodesic kernel is exact up to 2000 source points and rank 300 above (his demos: 70–300).
Outputs are in the inputs' units: Y_hat = s·(Y + V)·Rᵀ + t.

    res = bcpd("template.ply", "recon.ply")                       # Gaussian kernel
    res = gbcpd("template.ply", "recon.ply", beta=0.7, lam=50, downsample=5000)   # GBCPD++
    res.mesh()  # the moved template, its faces kept
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..errors import X2ReconInputError
from .estep import EStepper, estep
from .geodesic import geodesic_kernel
from .inputs import load_pair
from .kernels import (AUTO_RANK, FULL_RANK_MAX, LowRank, check_full_rank, gaussian, gaussian_apply, gaussian_lowrank,
                      solve_displacement)
from .result import RegistrationResult
from .runtime import Monitor, block_elements, precise_on_cuda, resolve_device, resolve_dtype, sigma2_floor
from .sampling import voxel_sample

TRANSFORMS = ("srn", "sr", "rn", "r", "n", "a", "an")


def _normalizer(X: np.ndarray, Y: np.ndarray, mode: str):
    """Hirose's normalisation: centre, scale √(Σ‖x − μ‖²/(N·D)); of each set (e), X's (x), Y's (y), none (n)."""
    if mode == "n":
        D = X.shape[1]
        return np.zeros(D), 1.0, np.zeros(D), 1.0
    mx, my = X.mean(0), Y.mean(0)
    sx = math.sqrt(((X - mx) ** 2).mean())
    sy = math.sqrt(((Y - my) ** 2).mean())
    if mode == "x":
        my, sy = mx, sx
    elif mode == "y":
        mx, sx = my, sy
    elif mode != "e":
        raise ValueError(f"normalize must be one of e, x, y, n; got {mode!r}")
    return mx, sx, my, sy


def _core(X, Y, G, *, w, lam, kappa, gamma, transform, tol, max_iter, min_iter, block, floor, mon, local):
    """Hirose's VB loop on normalised fit sets; returns the state as a dict of tensors/floats."""
    N, D = X.shape
    M = Y.shape[0]
    dt, dev = X.dtype, X.device
    nonrigid = "n" in transform and G is not None
    affine = "a" in transform
    similarity = affine or "r" in transform
    with_scale = "s" in transform
    xx = (X * X).sum(1)
    alpha = torch.full((M,), 1.0 / M, dtype=dt, device=dev)
    s, R, t = 1.0, torch.eye(D, dtype=dt, device=dev), torch.zeros(D, dtype=dt, device=dev)
    u, y = Y.clone(), Y.clone()
    V = torch.zeros_like(Y)
    disp = None
    init = N * (Y * Y).sum() + M * (X * X).sum() - 2 * (X.sum(0) * Y.sum(0)).sum()
    r = math.sqrt(abs(float(init)) / (M * N * D)) * gamma  # σ (Hirose works with the s.d.)
    vol = float(torch.prod(X.max(0).values - X.min(0).values))
    history, converged, it, e, r0, done = [], False, 0, None, r, 0.0
    es = EStepper(X, block, local)
    for it in range(1, max_iter + 1):
        c = w / (1 - w) * (2 * math.pi * r * r) ** (D / 2) / vol if w > 0 else 0.0
        uniform = math.isinf(kappa)
        e = es(y, r * r, None if uniform else alpha, c * M if uniform else c)
        nu = e.P1.clamp(min=1e-20)
        Np = float(nu.sum())
        xhat = e.PX / nu.unsqueeze(1)
        if nonrigid:
            cc = lam * r * r / (s * s)
            if affine:
                ix = torch.linalg.solve(R, (xhat - t).t()).t()
            else:
                ix = (xhat - t) @ R / s
            disp = solve_displacement(ix - Y, nu, cc, G)
            V = disp.V
            u = Y + V
        if not math.isinf(kappa):
            alpha = torch.exp(torch.special.digamma(kappa + nu) - torch.special.digamma(
                torch.tensor(kappa * M + Np, dtype=dt, device=dev)))
        if similarity:
            ub = (nu @ u) / Np
            xb = e.PX.sum(0) / Np
            uc = u - ub
            Sxu = (e.PX - nu.unsqueeze(1) * xb).t() @ uc
            Suu = (nu.unsqueeze(1) * uc).t() @ uc
            if affine:
                R = torch.linalg.solve(Suu, Sxu.t()).t()  # Sxu·Suu⁻¹
                s = 1.0
            else:
                U_, _, Vt = torch.linalg.svd(Sxu)
                C = torch.ones(D, dtype=dt, device=dev)
                C[-1] = torch.sign(torch.linalg.det(U_ @ Vt))
                R = (U_ * C.unsqueeze(0)) @ Vt
                s = float((R * Sxu).sum()) / float(Suu.trace()) if with_scale else 1.0
            t = xb - s * (R @ ub)
            y = s * (u @ R.t()) + t
        else:
            y = u
        r_old = r
        r2 = (float(e.Pt1 @ xx) + float(nu @ (y * y).sum(1)) - 2 * float((e.PX * y).sum())) / (Np * D)
        r = math.sqrt(max(abs(r2), floor))
        history.append(r * r)
        # progress: iterations, or how far log σ has come towards log tol (BCPD stops long before max_iter)
        span = math.log(max(r0 / max(tol, floor ** 0.5), 1.0 + 1e-9))
        done = max(done, it / max_iter, min(0.99, math.log(r0 / r) / span))
        mon(done, f"iteration {it}, σ={r:.4g}")
        if it > min_iter and (r < tol or abs(r_old - r) < tol):
            converged = True
            break
        if r * r <= floor and it > min_iter:
            converged = True
            break
    return dict(y=y, u=u, V=V, s=s, R=R, t=t, r=r, disp=disp, nu=e.P1, iterations=it, converged=converged,
                history=history, affine=affine, local_steps=es.local_steps)


GEODESIC_NEEDS_FACES = ("GBCPD's geodesic kernel walks along the source mesh's triangles, and the source is a point "
                        "cloud (no faces): give the source as a mesh, or use --method bcpd or cpd (Euclidean "
                        "Gaussian kernel), which take point clouds")


def _check_parameters(transform, w, lam, beta, gamma, kappa, kernel, tau) -> None:
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if not 0.0 <= w < 1.0:
        raise ValueError(f"w (outlier probability ω) must be in [0, 1), got {w}")
    if lam <= 0 or beta <= 0 or gamma <= 0 or kappa <= 0:
        raise ValueError("lambda, beta, gamma and kappa must be positive")
    if kernel not in ("gaussian", "geodesic"):
        raise ValueError(f"kernel must be gaussian or geodesic, got {kernel!r}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")


def _kernel(kernel, Yn, Yfit, iy, faces, beta, tau, nystrom, eps, rng, dev, dt, mon, info):
    """(G over the fitted source points, G over all source points or None): the geodesic kernel of the
    source mesh, or the Gaussian one (Nyström low rank above ``FULL_RANK_MAX`` points or with ``nystrom``)."""
    M0, M = len(Yn), len(Yfit)
    if kernel == "geodesic":
        k = (AUTO_RANK if M0 > FULL_RANK_MAX else 0) if nystrom is None else nystrom
        mon(0.0, "geodesic kernel")
        Gfull, ginfo = geodesic_kernel(Yn, faces, beta, tau, k, eps, rng, dev, dt)
        info.update(ginfo)
        return (Gfull if iy is None else Gfull.rows(torch.as_tensor(iy, device=dev))), Gfull
    k = (AUTO_RANK if M > FULL_RANK_MAX else 0) if nystrom is None else nystrom
    Yt = torch.as_tensor(Yfit, dtype=dt, device=dev)
    if 0 < k < M:
        G = gaussian_lowrank(Yt, beta, voxel_sample(Yfit, k, 0.0, rng), eps=1e-9)
        info["kernel_rank"] = G.rank
        return G, None
    check_full_rank(M)
    return gaussian(Yt, Yt, beta), None


def _subsets(Yn, Xn, downsample: int, voxel: float, seed: int):
    """"++": (source indices or None, target indices or None) of the registered subsets, and the random
    generator of the kernel's landmarks.

    One independent stream per draw (source subset, target subset, landmarks): a draw does not depend on
    whether another one happened, and none repeats the stream of ``default_rng(seed)`` itself, which a
    caller's own sampling with the same seed uses (X2BR samples its target surface so: drawn from that
    stream, the "++" target subset held only the points of the last-listed faces, and with ``downsample``
    ≥ the source's vertex count the template ended farther from the target than it started)."""
    rng_y, rng_x, rng_k = (np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(3))
    iy = voxel_sample(Yn, downsample, voxel, rng_y) if 0 < downsample < len(Yn) else None
    ix = voxel_sample(Xn, downsample, voxel, rng_x) if 0 < downsample < len(Xn) else None
    return iy, ix, rng_k


def _interpolate_displacement(disp, Gfull, Yn, Y, beta, dev, dt, mon):
    """"++": the displacement fitted on the subset, at every source point."""
    mon(0.98, "interpolating the displacement")
    if isinstance(Gfull, LowRank):  # geodesic: v = Q_full·B (Hirose's interpolate2)
        return Gfull.Q @ disp.B
    # Gaussian: v(y) = g(y, Y_fit)·Z, the Gaussian-process mean (his interpolate1)
    return gaussian_apply(torch.as_tensor(Yn, dtype=dt, device=dev), Y, disp.coef, beta, block_elements(dev, dt))


def _set_correspondence(res, Xn, yout, r2: float, w: float, dev, dt) -> None:
    """Each moved source point's most likely target point and its probability (a last E-step)."""
    M, D = yout.shape
    Xa = torch.as_tensor(Xn, dtype=dt, device=dev)
    c = w / (1 - w) * (2 * math.pi * r2) ** (D / 2) / float(np.prod(np.ptp(Xn, 0))) if w > 0 else 0.0
    f = estep(Xa, yout, r2, None, c * M, block_elements(dev, dt), want_match=True)
    res.match, res.match_prob = f.match.cpu().numpy(), f.match_prob.cpu().double().numpy()


def _set_similarity(res, st, mx, sx, my, sy) -> None:
    """The fitted similarity (or affine map) in the caller's millimetres, undoing the normalisation."""
    R, t = st["R"].cpu().double().numpy(), st["t"].cpu().double().numpy()
    if st["affine"]:
        res.B = R * (sx / sy)
        res.t = sx * t + mx - res.B @ my
    else:
        res.s = st["s"] * sx / sy
        res.R = R
        res.t = sx * t + mx - res.s * R @ my


@precise_on_cuda
def bcpd(source, target, *, w: float = 0.0, lam: float = 2.0, beta: float = 2.0, gamma: float = 1.0,
         kappa: float = math.inf, nystrom: int | None = None, tol: float = 1e-4, max_iter: int = 500,
         min_iter: int = 30, transform: str = "srn", normalize: str = "e", downsample: int = 0,
         downsample_voxel: float = 0.08, kernel: str = "gaussian", tau: float = 1.0, eps: float = 1e-3,
         seed: int = 0, local: bool | None = None, device="auto", dtype=None, correspondence: bool = False,
         source_faces=None, progress=None, cancel=None) -> RegistrationResult:
    """BCPD (``kernel="gaussian"``) or GBCPD (``kernel="geodesic"``, see ``gbcpd``) of source onto target.

    Parameters carry Hirose's names and defaults (module docstring). ``downsample`` n > 0 runs the
    "++" variant: n points of each set (voxel-balanced, width ``downsample_voxel`` in normalised
    units) are registered and v is interpolated to every source point — by the kernel's Gaussian-
    process mean for the Gaussian kernel, through the full geodesic eigenvectors for GBCPD (as
    Hirose's ``interpolate2``). ``progress``/``cancel`` as in ``cpd``.
    """
    _check_parameters(transform, w, lam, beta, gamma, kappa, kernel, tau)
    t0 = time.perf_counter()
    src, tgt = load_pair(source, target, source_faces)
    if kernel == "geodesic" and "n" in transform and src.faces is None:
        raise X2ReconInputError(src.name if src.name != "source" else None, GEODESIC_NEEDS_FACES)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    mon = Monitor(progress, cancel)
    M0, D = src.points.shape
    mode = normalize
    if "n" not in transform and "s" not in transform and mode == "e":
        mode = "y"  # rigid: one scale for both sets (as Hirose's program does)
    mx, sx, my, sy = _normalizer(tgt.points, src.points, mode)
    Yn, Xn = (src.points - my) / sy, (tgt.points - mx) / sx
    nonrigid = "n" in transform
    info: dict = {}

    iy, ix, rng_k = _subsets(Yn, Xn, downsample, downsample_voxel, seed)
    Yfit = Yn if iy is None else Yn[iy]
    Xfit = Xn if ix is None else Xn[ix]
    M = len(Yfit)
    if iy is not None or ix is not None:
        info.update(fitted_source=int(M), fitted_target=int(len(Xfit)))

    G, Gfull = None, None
    if nonrigid:
        G, Gfull = _kernel(kernel, Yn, Yfit, iy, src.faces, beta, tau, nystrom, eps, rng_k, dev, dt, mon, info)
    X = torch.as_tensor(Xfit, dtype=dt, device=dev)
    Y = torch.as_tensor(Yfit, dtype=dt, device=dev)
    st = _core(X, Y, G, w=w, lam=lam, kappa=kappa, gamma=gamma, transform=transform, tol=tol,
               max_iter=max_iter, min_iter=min_iter, block=block_elements(dev, dt), floor=sigma2_floor(dt),
               mon=mon.sub(0.1 if kernel == "geodesic" else 0.0, 0.97), local=local)
    info["local_estep_iterations"] = st["local_steps"]

    s, R, t = st["s"], st["R"], st["t"]
    if iy is None:
        V = st["V"]
    elif not nonrigid:
        V = torch.zeros(M0, D, dtype=dt, device=dev)
    else:
        V = _interpolate_displacement(st["disp"], Gfull, Yn, Y, beta, dev, dt, mon)
    Yfull = torch.as_tensor(Yn, dtype=dt, device=dev)
    yout = s * ((Yfull + V) @ R.t()) + t  # affine: s = 1 and R holds the matrix; "n": s = 1, R = I, t = 0
    res = RegistrationResult(
        method=("gbcpd" if kernel == "geodesic" else "bcpd") + ("++" if iy is not None else ""),
        Y_hat=yout.cpu().double().numpy() * sx + mx, sigma2=st["r"] ** 2 * sx * sx, iterations=st["iterations"],
        converged=st["converged"], seconds=0.0, faces=src.faces, device=str(dev), dtype=str(dt).replace("torch.", ""),
        V=V.cpu().double().numpy() * sy, history=[h * sx * sx for h in st["history"]], info=info,
        params=dict(w=w, lam=lam, beta=beta, gamma=gamma, kappa=kappa if math.isfinite(kappa) else "inf",
                    nystrom=nystrom, tol=tol, max_iter=max_iter, min_iter=min_iter, transform=transform,
                    normalize=normalize, downsample=downsample, downsample_voxel=downsample_voxel,
                    kernel=kernel, seed=seed, **(dict(tau=tau, eps=eps) if kernel == "geodesic" else {})))
    _set_similarity(res, st, mx, sx, my, sy)
    if iy is None and ix is None:
        res.P1 = st["nu"].cpu().double().numpy()
    if correspondence:
        _set_correspondence(res, Xn, yout, st["r"] ** 2, w, dev, dt)
    mon(1.0, "done")
    res.seconds = time.perf_counter() - t0
    return res


def gbcpd(source, target, *, tau: float = 1.0, nystrom: int | None = None, eps: float = 1e-3,
          **kw) -> RegistrationResult:
    """GBCPD (GBCPD++ with ``downsample``): BCPD with the geodesic kernel of the source mesh.

    The source must be a mesh (a mesh file, a trimesh, or points with ``source_faces``). Hirose's
    GBCPD demos use β 0.7–1.2, λ 50–100, γ 3, K 200–300, τ 0.2–1 with ``normalize="x"``; the
    defaults here are his program's (β = λ = 2, γ = 1, normalize e) with τ = 1 (geodesic only);
    ``register`` and ``x2recon register`` use ``methods.DEFAULTS`` instead (measured on bones).
    """
    return bcpd(source, target, kernel="geodesic", tau=tau, nystrom=nystrom, eps=eps, **kw)
