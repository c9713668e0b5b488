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

Every registered part is checked against its placed template before it is kept (:func:`check_part`):
a registration that turns a part inside out (signed volume ≤ 0, a folded surface) or leaves it an
implausible size — enclosed volume outside [1/``PART_VOLUME_TOLERANCE``, ``PART_VOLUME_TOLERANCE``] =
[½, 2]× the placed template's, or an extent along x, y or z outside [1/``PART_EXTENT_TOLERANCE``,
``PART_EXTENT_TOLERANCE``] = [⅔, 1.5]× — is rejected: left out of the refined mesh and its parts, and
named with the reason.  (Placement already sized the template to its box, so the registration has
to refine the shape, not remake it; a part that doubles in volume or grows by half along an axis is
fitting the wrong bone.)  The result also says which of the library's structures it has and which
are missing (:func:`coverage`, e.g. "spine: 1 of 17 vertebrae (T1); missing: T2–T12, L1–L5").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import X2ReconInputError
from ..registration.methods import DEFAULTS as REGISTRATION_DEFAULTS

#: Registration settings for template → coarse shape, in Hirose's names: ``x2recon register``'s defaults
#: (``registration.methods.DEFAULTS``: β 2, λ 200, γ 0.3, GBCPD τ 0.2, ≥ 200 iterations), chosen by their
#: worst case over real bone deformations with partial, noisy targets in
#: Testing/benchmarks/bench_registration_sweep.py (neighbouring ribs pulled apart, a bent spine segment, a
#: scaled vertebra — the motions that separate a placed template from the bones),
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


#: A registered part is kept when its enclosed volume is within this factor of its placed template's.
PART_VOLUME_TOLERANCE = 2.0
#: … and its extent along each of x, y, z within this factor of the placed template's.
PART_EXTENT_TOLERANCE = 1.5


@dataclass
class X2BRResult:
    mesh: object  # trimesh: the registered template, the parts that passed the checks (LPS mm)
    parts: dict  # structure name → trimesh (passed the checks)
    part_ids: np.ndarray  # per vertex of ``mesh``: index into ``names``
    names: list[str]
    detections: list
    template: object  # trimesh: the placed template before registration (all parts)
    registration: object  # x2recon.registration.RegistrationResult
    seconds: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)  # structure → check_part's record (status "kept" or "rejected")
    coverage: dict = field(default_factory=dict)  # group → coverage()'s record
    notes: list = field(default_factory=list)  # placement's notes (levels, skipped detections, turned templates)

    @property
    def rejected(self) -> dict:
        """structure → why its registered part was left out."""
        return {n: c["reason"] for n, c in self.checks.items() if c["status"] == "rejected"}

    def summary_lines(self) -> list[str]:
        """What the result has and lacks, one line per group, then each rejected part and note."""
        lines = [coverage_line(g, c) for g, c in self.coverage.items()]
        lines += [f"rejected {n}: {why}" for n, why in self.rejected.items()]
        return lines + [f"note: {n}" for n in self.notes]

    def report(self) -> dict:
        """The checks, the coverage and the notes, for the detections JSON."""
        return {"part_checks": self.checks, "coverage": self.coverage, "notes": list(self.notes),
                "tolerances": {"volume_factor": PART_VOLUME_TOLERANCE, "extent_factor": PART_EXTENT_TOLERANCE}}


def check_part(registered, placed) -> dict:
    """Is a registered part plausible against its placed template (module doc)?  A record with
    ``status`` ("kept" | "rejected"), ``reason``, volumes (ml), extents (mm, x y z) and how far its
    centroid moved (mm)."""
    from ..mesh.extract import signed_volume

    v_r, v_t = signed_volume(registered), signed_volume(placed)
    e_r = np.ptp(np.asarray(registered.vertices, float), axis=0)
    e_t = np.ptp(np.asarray(placed.vertices, float), axis=0)
    moved = float(np.linalg.norm(np.asarray(registered.vertices).mean(0) - np.asarray(placed.vertices).mean(0)))
    rec = {"volume_ml": round(v_r / 1000, 3), "template_volume_ml": round(v_t / 1000, 3),
           "extent_mm": [round(float(x), 1) for x in e_r], "template_extent_mm": [round(float(x), 1) for x in e_t],
           "centroid_moved_mm": round(moved, 1)}
    size = f"{'×'.join(f'{x:.0f}' for x in e_r)} mm, {v_r / 1000:.1f} ml; template {'×'.join(f'{x:.0f}' for x in e_t)} mm, {v_t / 1000:.1f} ml"
    reason = ""
    if not v_r > 0:
        reason = f"turned inside out by the registration (signed volume {v_r / 1000:.1f} ml; {size})"
    elif not 1 / PART_VOLUME_TOLERANCE <= v_r / v_t <= PART_VOLUME_TOLERANCE:
        reason = f"volume {v_r / v_t:.2f}× its template's, outside [1/{PART_VOLUME_TOLERANCE:g}, {PART_VOLUME_TOLERANCE:g}] ({size})"
    else:
        ratio = e_r / np.maximum(e_t, 1e-9)
        bad = [f"{ax} {r:.2f}×" for ax, r in zip("xyz", ratio)
               if not 1 / PART_EXTENT_TOLERANCE <= r <= PART_EXTENT_TOLERANCE]
        if bad:
            reason = (f"extent {', '.join(bad)} its template's, outside [1/{PART_EXTENT_TOLERANCE:g}, "
                      f"{PART_EXTENT_TOLERANCE:g}] ({size})")
    return {"status": "rejected" if reason else "kept", "reason": reason, **rec}


def _group(name: str) -> str:
    """The coverage group of a structure: spine, left ribs, right ribs, or the structure itself."""
    if name.startswith("vertebrae_"):
        return "spine"
    if name.startswith("rib_left_"):
        return "left ribs"
    if name.startswith("rib_right_"):
        return "right ribs"
    return name


def coverage(expected: list[str], kept: list[str], detected: set[str] = frozenset()) -> dict:
    """Per group of ``expected`` structures (the library's): which are in the result (``found``) and
    which are ``missing``, those among them that were detected (then rejected) named apart."""
    from .template.placement import VERTEBRA_LEVELS

    def order(n: str):
        tail = n.rsplit("_", 1)[-1]
        if n.startswith("vertebrae_") and tail in VERTEBRA_LEVELS:
            return (0, VERTEBRA_LEVELS.index(tail))
        return (1, int(tail)) if tail.isdigit() else (2, n)

    out: dict = {}
    for n in sorted(expected, key=order):
        g = out.setdefault(_group(n), {"expected": [], "found": [], "missing": [], "detected_not_kept": []})
        g["expected"].append(n)
        g["found" if n in kept else "missing"].append(n)
        if n not in kept and n in detected:
            g["detected_not_kept"].append(n)
    return out


def _short(names: list[str]) -> str:
    """Structure names as runs: vertebrae by level (T2–T12, L1), ribs by number (3–5, 8)."""
    from .template.placement import VERTEBRA_LEVELS

    if not names:
        return ""
    if all(n.startswith("vertebrae_") and n[10:] in VERTEBRA_LEVELS for n in names):
        keys, labels = [VERTEBRA_LEVELS.index(n[10:]) for n in names], [n[10:] for n in names]
    elif all(n.startswith("rib_") and n.rsplit("_", 1)[-1].isdigit() for n in names):
        keys = [int(n.rsplit("_", 1)[-1]) for n in names]
        labels = [str(k) for k in keys]
    else:
        return ", ".join(names)
    runs, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[i - 1] + 1:
            runs.append(labels[start] if i - 1 == start else f"{labels[start]}–{labels[i - 1]}")
            start = i
    return ", ".join(runs)


def coverage_line(group: str, c: dict) -> str:
    """One printed line of :func:`coverage`, e.g. "spine: 1 of 17 vertebrae (T1); missing: T2–T12, L1–L5"."""
    what = {"spine": "vertebrae", "left ribs": "ribs", "right ribs": "ribs"}.get(group, "")
    n, k = len(c["expected"]), len(c["found"])
    line = f"{group}: {k} of {n}{' ' + what if what else ''} in the result"
    if c["found"] and what:
        line += f" ({_short(c['found'])})"
    if c["missing"]:
        line += f"; missing: {_short(c['missing'])}"
        if c["detected_not_kept"]:
            line += f" (detected but rejected: {_short(c['detected_not_kept'])})"
    return line


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
    notes: list = []
    placed = place_templates(library, detections, xray.geometry, coarse_mesh, notes=notes)
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
    parts = split_parts(refined, part_ids, names)
    placed_parts = split_parts(template, part_ids, names)
    checks = {n: check_part(parts[n], placed_parts[n]) for n in parts}
    kept = [n for n in parts if checks[n]["status"] == "kept"]
    cover = coverage(library.names, kept, {p.name for p in placed})
    if not kept:
        raise X2ReconInputError(xray.source, "no registered part is plausible — " + "; ".join(
            f"{n}: {c['reason']}" for n, c in checks.items()) + "; use the X2B mesh")
    if len(kept) < len(parts):
        keep_v = np.isin(part_ids, [names.index(n) for n in kept])
        new_index = np.cumsum(keep_v) - 1
        faces = np.asarray(refined.faces)
        faces = new_index[faces[keep_v[faces[:, 0]]]]
        refined = trimesh.Trimesh(np.asarray(refined.vertices)[keep_v], faces, process=False)
        part_ids = part_ids[keep_v]
    return X2BRResult(refined, {n: parts[n] for n in kept}, part_ids, names, detections, template, res, t,
                      checks, cover, notes)


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
