"""Point-set and surface registration: CPD, BCPD, GBCPD (and their "++" acceleration) in torch, CPU and CUDA.

X2BR (paper §3.2) refines the X2B reconstruction by registering a template with GBCPD++; Table 3
compares it with CPD. Methods (all ``f(source, target, **params) -> RegistrationResult``):

- ``cpd(source, target, kind="rigid"|"affine"|"deformable", w=0, beta=2, lam=2, ...)`` —
  Myronenko & Song 2010;
- ``bcpd(source, target, w=0, lam=2, beta=2, gamma=1, kappa=inf, nystrom=None, downsample=0, ...)`` —
  Hirose 2021 (BCPD++ with ``downsample``), his parameter names and defaults;
- ``gbcpd(source_mesh, target, tau=1, ...)`` — Hirose 2022: the geodesic kernel of the source mesh
  keeps close-but-separate parts (ribs, fingers) from being dragged together; GBCPD++ with
  ``downsample``;
- ``register(source, target, method="cpd"|"cpd-affine"|"cpd-rigid"|"bcpd"|"gbcpd", **params)`` — the
  entry point of the CLI and X2BR; unset BCPD/GBCPD parameters take ``methods.DEFAULTS`` (β 2, λ 200,
  γ 0.3, τ 0.2, min_iter 200: measured on real bones by Testing/benchmarks/bench_registration_sweep.py, where
  Hirose's defaults, kept by ``bcpd``/``gbcpd`` themselves, drag a rib onto its neighbour).

Inputs: (N, D) arrays, trimesh meshes, or mesh/point-cloud/point files (``x2recon.io.mesh.read_points``). Outputs
(``RegistrationResult``) are in the inputs' units; ``result.mesh()`` is the moved source mesh.
``device="auto"|"cpu"|"cuda"``; float64 on CPU and float32 on CUDA unless ``dtype`` says otherwise.
The correspondence sums are computed block by block (memory O(block × M)), with a KD-tree local
E-step on CPU once σ is small; ``progress(fraction, message)`` reports, and returning False from it
(or ``cancel()`` → True) raises ``x2recon.errors.CancelledError``.

    from x2recon.io.mesh import write_mesh
    from x2recon.registration import gbcpd
    res = gbcpd("template.ply", "x2b_bones.ply", beta=1.0, lam=20, downsample=5000)
    write_mesh(res.mesh(), "registered.ply"); print(res.summary())

Command line: ``x2recon register SOURCE TARGET --method gbcpd --out OUT.ply`` (``x2recon.cli.register``).

Modules, one job each: ``coherent`` (CPD), ``bayesian`` (BCPD, GBCPD, "++"), ``estep`` (blocked and
local correspondence sums), ``kernels`` (Gaussian kernel, Nyström, the displacement solve),
``geodesic`` (mesh graph, Dijkstra, PSD geodesic kernel), ``sampling`` (downsampling, landmarks),
``inputs`` (arrays/meshes/files → checked points), ``result``, ``runtime`` (device, precision,
progress), ``methods`` (by-name dispatch). Importing the package is light; torch loads with the
first method used.
"""

from .methods import METHODS, PARAMETERS, register

__all__ = ["cpd", "bcpd", "gbcpd", "register", "METHODS", "PARAMETERS", "RegistrationResult"]

_LAZY = {"cpd": ".coherent", "bcpd": ".bayesian", "gbcpd": ".bayesian", "RegistrationResult": ".result"}


def __getattr__(name):  # torch and scipy load with the first method used, not with the package
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
