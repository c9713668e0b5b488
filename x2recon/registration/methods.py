"""One entry point for every method, by name (the CLI's ``--method``): parameters checked per method."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import RegistrationResult

METHODS = {
    "cpd": "deformable CPD (Myronenko & Song 2010), Gaussian kernel",
    "cpd-affine": "affine CPD",
    "cpd-rigid": "rigid CPD (rotation, translation, scale)",
    "bcpd": "BCPD (Hirose 2021): similarity + displacement, Gaussian kernel; BCPD++ with downsample",
    "gbcpd": "GBCPD (Hirose 2022): BCPD with the source mesh's geodesic kernel; GBCPD++ with downsample",
}


_COMMON = {"w", "max_iter", "tol", "seed", "local", "device", "dtype", "correspondence", "source_faces",
           "progress", "cancel"}
_BCPD = _COMMON | {"lam", "beta", "gamma", "kappa", "nystrom", "min_iter", "transform", "normalize", "downsample",
                   "downsample_voxel"}
#: Keyword parameters each method accepts.
PARAMETERS = {
    "cpd": _COMMON | {"beta", "lam", "lowrank"},
    "cpd-affine": set(_COMMON),
    "cpd-rigid": _COMMON | {"scale"},
    "bcpd": _BCPD,
    "gbcpd": _BCPD | {"tau", "eps"},
}


#: Defaults of ``register`` (so of ``x2recon register`` and X2BR) where they differ from Hirose's program
#: (β = λ = 2, γ = 1, τ = 1, 30 iterations at least), which the functions ``bcpd``/``gbcpd`` keep. Chosen by
#: the worst case over three real bone deformations (neighbouring ribs pulled apart 12–18 mm, a bent T6–T9
#: segment, a vertebra scaled 10 %) × target fraction (100, 80, 60 % of the points, shuffled) × Gaussian
#: noise (0, 1 mm), two random targets a cell (Testing/benchmarks/bench_registration_sweep.py, table in
#: docs/registration.md). γ 0.3 (σ starts small, so each point is drawn to its near neighbours first) stops
#: a rib from being dragged onto its neighbour (Hirose's defaults: 15 mm there); τ 0.2 (a fifth geodesic)
#: lets the separate vertebrae of a spine bend together while ribs stay apart; β 2 and λ 200 (wider and
#: stiffer than the β 0.7, λ 50 chosen on one full-looking target) carry the motion across the gaps of a
#: partial target and average out noise (80 % rib targets: 0.67 → 0.15 mm; with 1 mm noise 0.97 → 0.33);
#: at least 200 iterations, because on partial targets σ can rest on a plateau for a while before the
#: last slide into place, with changes far below tol (min_iter 30 left one 80 % rib target at 1.13 mm,
#: 100 at 0.31; the unsimplified pair, 7 830 vertices: one 80 % target at 0.60 mm after 100, σ dropped
#: from 0.24 to 0.11 mm between iterations 100 and 150: 0.15 mm after 150 or 200).
DEFAULTS = {
    "gbcpd": dict(beta=2.0, lam=200.0, gamma=0.3, tau=0.2, min_iter=200),
    "bcpd": dict(beta=2.0, lam=200.0, gamma=0.3, min_iter=200),
}


def register(source, target, method: str = "gbcpd", **params) -> RegistrationResult:
    """Register ``source`` onto ``target`` with ``method`` (see ``METHODS``); ``params`` are the
    method's keyword arguments (Hirose's names for BCPD/GBCPD; ``nystrom`` also sets CPD's
    ``lowrank``), unset BCPD/GBCPD ones taken from ``DEFAULTS``. A parameter the method does not have
    is an error, not silently ignored."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    params = {**DEFAULTS.get(method, {}), **params}
    if method == "cpd" and "nystrom" in params:
        params["lowrank"] = params.pop("nystrom")
    unknown = set(params) - PARAMETERS[method]
    if unknown:
        raise ValueError(f"method {method} has no parameter(s) {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(sorted(PARAMETERS[method] - {'progress', 'cancel', 'source_faces'}))}")
    from .bayesian import bcpd, gbcpd
    from .coherent import cpd

    if method.startswith("cpd"):
        kind = {"cpd": "deformable", "cpd-affine": "affine", "cpd-rigid": "rigid"}[method]
        return cpd(source, target, kind=kind, **params)
    return (gbcpd if method == "gbcpd" else bcpd)(source, target, **params)
