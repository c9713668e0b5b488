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


def register(source, target, method: str = "gbcpd", **params) -> RegistrationResult:
    """Register ``source`` onto ``target`` with ``method`` (see ``METHODS``); ``params`` are the
    method's keyword arguments (Hirose's names for BCPD/GBCPD; ``nystrom`` also sets CPD's
    ``lowrank``). A parameter the method does not have is an error, not silently ignored."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
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
