"""X2BR (x2br-paper §3.2, Fig. 2): X2B's coarse bone mesh refined by a registered template.

  X-ray ─► X2B coarse mesh ───────────────────────────────┐ (target)
        └► YOLO detections ─► templates placed per box ─► assembled template ─► GBCPD++ ─► refined mesh
                                                           (source)

The template is assembled from the library for the structures detected on this X-ray, each placed
from its box (``x2recon.x2br.template.placement``), and registered onto the coarse shape's surface with
GBCPD++ (geodesic kernel over the template's own mesh: separate bones are separate graph components,
so the motion of one rib does not drag its neighbour — CPD's failure the paper's Table 3 shows) or,
for Table 3's baseline, CPD.  The output keeps the template's faces and its per-vertex part ids, so
every structure is its own mesh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import X2ReconInputError
from ..registration.methods import DEFAULTS as REGISTRATION_DEFAULTS

#: Registration settings for template → coarse shape, in Hirose's names: ``x2recon register``'s defaults
#: (``registration.methods.DEFAULTS``: β 0.7, λ 50, γ 0.3, GBCPD τ 0.2), chosen by their worst case over real
#: bone deformations in Testing/benchmarks/bench_registration_sweep.py (neighbouring ribs pulled apart, a
#: bent spine segment, a scaled vertebra — the motions that separate a placed template from the bones),
#: plus what the template's size needs: a 55 k-vertex template cannot have the exact kernel, so Nyström
#: K 300 (in the sweep, K 300 instead of the exact kernel added 0.13 mm on the spine at τ 1) and GBCPD++
#: with 4 000 points registered and interpolated.
#: CPD (the paper's Table 3 baseline): Myronenko & Song's defaults, on 4 000 template points, its motion
#: field then evaluated at every vertex (``cpd_on_subset``) — full CPD on a 55 k-vertex template against
#: 20 k points did not finish in 10 min on one CPU thread.
DEFAULT_PARAMS = {
    "gbcpd": dict(REGISTRATION_DEFAULTS["gbcpd"], w=0.0, nystrom=300, downsample=4000),
    "bcpd": dict(REGISTRATION_DEFAULTS["bcpd"], w=0.0, nystrom=300, downsample=4000),
    "cpd": dict(beta=2.0, lam=2.0, w=0.0, max_iter=100, downsample=4000),
}


@dataclass
class X2BRResult:
    mesh: object  # trimesh: the registered template, all parts (LPS mm)
    parts: dict  # structure name → trimesh
    part_ids: np.ndarray  # per vertex of ``mesh``: index into ``names``
    names: list[str]
    detections: list
    template: object  # trimesh: the placed template before registration
    registration: object  # x2recon.registration.RegistrationResult
    seconds: dict = field(default_factory=dict)


def split_parts(mesh, part_ids: np.ndarray, names: list[str]) -> dict:
    """One trimesh per part from a merged mesh whose vertices carry part ids."""
    import trimesh

    out = {}
    faces = np.asarray(mesh.faces)
    fid = part_ids[faces[:, 0]]
    for k, name in enumerate(names):
        f = faces[fid == k]
        if not len(f):
            continue
        used, inv = np.unique(f, return_inverse=True)
        out[name] = trimesh.Trimesh(np.asarray(mesh.vertices)[used], inv.reshape(-1, 3), process=False)
    return out


def refine_with_template(coarse_mesh, xray, detector, library, *, method: str = "gbcpd", conf: float = 0.25,
                         params: dict | None = None, target_points: int = 20_000, device: str = "auto",
                         seed: int = 0, progress: Callable[[float, str], None] | None = None,
                         cancel: Callable[[], bool] | None = None) -> X2BRResult:
    """Refine ``coarse_mesh`` (X2B's, LPS mm, in ``xray``'s geometry) with the template library.

    ``detector``: an ``x2recon.x2br.detection.Detector`` (or its detections, a list); ``library``: a
    ``TemplateLibrary``; ``method``: gbcpd (X2BR), cpd or bcpd (Table 3).  No detection, or none the
    library has a template for, is an ``X2ReconInputError`` (X2B's mesh is then the answer)."""
    from ..registration import register
    from .template.placement import assemble, place_templates

    report = progress or (lambda f, m: None)
    t = {}
    t0 = time.perf_counter()
    report(0.0, "detecting structures")
    detections = detector if isinstance(detector, list) else detector.detect(xray.image, conf=conf)
    t["detect"] = time.perf_counter() - t0
    if not detections:
        raise X2ReconInputError(xray.source, f"the detector found no vertebrae or ribs (confidence ≥ {conf}); "
                                             "nothing to build a template from — use the X2B mesh, or lower --conf")
    t1 = time.perf_counter()
    report(0.1, f"placing templates for {len(detections)} detections")
    placed = place_templates(library, detections, xray.geometry, coarse_mesh)
    if not placed:
        raise X2ReconInputError(xray.source, "no detected structure has a template in the library "
                                             f"(detected: {sorted({d.name for d in detections})})")
    template, part_ids, names = assemble(placed)
    t["place"] = time.perf_counter() - t1
    if coarse_mesh is None or len(coarse_mesh.vertices) < 10:
        raise X2ReconInputError(xray.source, "the coarse X2B mesh is empty: nothing to register the template onto")
    if len(coarse_mesh.faces):
        from ..metrics.mesh import sample_surface

        target, _ = sample_surface(coarse_mesh, target_points, seed)
    else:
        target = np.asarray(coarse_mesh.vertices)
    kw = {**DEFAULT_PARAMS.get(method, {}), **(params or {})}
    t2 = time.perf_counter()
    report(0.2, f"registering the template ({len(template.vertices):,} points) with {method.upper()}")
    prog = lambda f, m: report(0.2 + 0.8 * f, m)
    if method == "cpd" and kw.get("downsample"):
        res = cpd_on_subset(template, target, n=int(kw.pop("downsample")), device=device, seed=seed, cancel=cancel,
                            progress=prog, **kw)
    else:
        res = register(template, target, method=method, device=device, seed=seed, cancel=cancel, progress=prog, **kw)
    t["register"] = time.perf_counter() - t2
    import trimesh

    refined = trimesh.Trimesh(res.Y_hat, np.asarray(template.faces), process=False)
    return X2BRResult(refined, split_parts(refined, part_ids, names), part_ids, names, detections, template, res, t)


def cpd_on_subset(template, target, *, n: int, beta: float = 2.0, seed: int = 0, chunk: int = 8192, **kw):
    """Deformable CPD of ``n`` template vertices onto ``target``, then CPD's own motion field
    ``v(y) = Σ_m G(y, y_m) w_m`` (Myronenko & Song eq. 7; G Gaussian of width β in CPD's normalised
    units) evaluated at every template vertex, so the whole template moves as CPD moved the subset.
    Returns the ``RegistrationResult`` with ``Y_hat`` for all vertices."""
    from dataclasses import replace

    from ..registration import register

    Y0 = np.asarray(template.vertices, np.float64)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(Y0), size=min(n, len(Y0)), replace=False))
    Ys = Y0[idx]
    res = register(Ys, target, method="cpd", beta=beta, seed=seed, **kw)
    X0 = np.asarray(target, np.float64)
    mx, my = X0.mean(0), Ys.mean(0)  # CPD's normalisation (coherent.py): zero mean, unit RMS radius
    sx = np.sqrt(((X0 - mx) ** 2).sum() / len(X0))
    sy = np.sqrt(((Ys - my) ** 2).sum() / len(Ys))
    Yn = (Ys - my) / sy
    GW = (res.Y_hat - mx) / sx - Yn  # the motion CPD applied to the subset, normalised units

    def gauss(a, b):
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
        return np.exp(-np.maximum(d2, 0) / (2 * beta ** 2))

    G = gauss(Yn, Yn)
    W = np.linalg.solve(G + 1e-8 * np.eye(len(G)), GW)
    all_n = (Y0 - my) / sy
    out = np.empty_like(Y0)
    for s0 in range(0, len(Y0), chunk):
        a = all_n[s0:s0 + chunk]
        out[s0:s0 + chunk] = (a + gauss(a, Yn) @ W) * sx + mx
    return replace(res, Y_hat=out, V=None, P1=None, faces=np.asarray(template.faces),
                   info={**res.info, "subset": int(len(idx)), "interpolated": int(len(Y0))})
