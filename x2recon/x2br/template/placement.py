"""Templates placed from detections: X2BR's "DRR-specific template" (x2br-paper §3.2, Fig. 2).

For every detected structure the library's template is put where its box says, through the X-ray's
``ProjectionGeometry`` (the one camera model):

depth
    with a coarse shape (X2B's mesh): the median depth (``geometry.depth``: distance from the source
    along the beam axis) of the coarse mesh's vertices whose projection falls inside the box; without
    one (or with fewer than ``min_coarse_points`` there): the template's own reference depth — where
    its centroid sits in the source case's box, moved into this geometry's box.
in-plane position
    the template's centroid is put on the ray through the box centre at that depth
    (``point_on_ray``), then moved in the detector plane, at constant depth, until the centre of its
    projected bounding box is the box's centre.  An axis on which the box touches the image border is
    aligned by its inner edge instead (the structure continues outside the image).
scale
    one isotropic factor about the centroid: the geometric mean of box width / projected template
    width and box height / projected template height at that depth (axes clipped by the image border
    left out), clamped to ``scale_limits``; position and scale are refined together a few times.

Levels from group classes (:func:`assign_levels`)
    The paper's detector names groups (cervical, thoracic, lumbar, ribs); templates are per level.

    * Vertebrae: all vertebra boxes (group or level named) are sorted along the image's cranio-caudal
      axis (the projection of the patient's S axis, so any view works).  Consecutive boxes are one
      level apart, except where the gap between centres is ≥ 1.75× the local median spacing (a missed
      vertebra: the gap counts round(gap / spacing) levels).  The chain is then slid along
      C1…C7 T1…T12 L1…L5 to the offset where the most boxes' groups agree with their level's group
      (a level-named box counts 3 when its level matches): with a cervical/thoracic or
      thoracic/lumbar boundary in view, the boundary fixes the levels (e.g. the first thoracic box
      below the last cervical one is T1).  Among equally good offsets: the topmost box takes the first
      level of its group (T1, L1) — except a cervical-only chain, whose lowest box is C7.
    * Ribs: a rib box is *left* when its centre lies on the patient's-left side (the projection of the
      L axis) of the spine's midline (a line fitted through the vertebra box centres; the isocentre's
      projection without vertebrae).  This holds in views within ~20° of frontal (|projected L| ≥
      0.93 |projected S|); in more oblique views far-side ribs project across the spine, so rib boxes
      are dropped there (noted).  Per side, boxes sorted cranio-caudally get increasing numbers: 1, 2,
      3 … from the top unless ≥ 3 thoracic levels are known; then the first number is the one that
      best matches the boxes' top edges to the top edges of the thoracic vertebrae of the same
      numbers (rib *k* articulates with T*k*; ``_rib_numbers``), so a missed first rib does not shift
      the others.  A missed rib in the middle shifts the ribs above it by one (measured below).
    * Vertebra boxes overlapping by IoU > 0.7 across classes keep the more confident one; two boxes
      given the same name keep the more confident one.

Structures the library has no per-level template for but a part *covers* (a SKEL region:
``skel_thorax`` covers ribs and thoracic vertebrae) are placed once, from the union of their boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..detection.detections import Detection, box_iou
from ...structures import group_of

VERTEBRA_LEVELS = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
_LEVEL_GROUP = ["cervical"] * 7 + ["thoracic"] * 12 + ["lumbar"] * 5
VERTEBRA_GROUPS = ("cervical", "thoracic", "lumbar")
GAP_FACTOR = 1.75
DEDUP_IOU = 0.7
#: |projected L| / |projected S| below which rib boxes are not sided (cos 21°: views within ~20° of AP/PA)
FRONTAL_MIN = 0.93


@dataclass
class PlacedTemplate:
    name: str  # TotalSegmentator name (or a library part such as skel_thorax)
    mesh: object  # trimesh, LPS mm in the X-ray's geometry
    detection: Detection  # the box it was placed from (named by its assigned level)
    scale: float  # isotropic factor applied to the template
    depth: float  # mm from the source along the beam axis (of the centroid)
    depth_source: str  # "coarse" | "template"
    center: np.ndarray  # placed centroid, world mm
    projected_box: np.ndarray  # (x0, y0, x1, y1) of the placed mesh's projection
    source_class: str = ""  # the detector's class (e.g. "thoracic")
    notes: list = field(default_factory=list)


class Assembled(NamedTuple):
    mesh: object  # trimesh: all placed templates, vertices not shared
    part_ids: np.ndarray  # per vertex: index into ``names``
    names: list


# ------------------------------------------------------------------------------------ geometry
def point_on_ray(geometry, col: float, row: float, depth: float) -> np.ndarray:
    """World point (mm) that projects to pixel ``(col, row)`` at ``depth`` from the source (beam axis)."""
    target = geometry.pixel_to_world(col, row)
    n = geometry.plane_normal
    if geometry.kind == "cone":
        d = target - geometry.source
        return geometry.source + d * (depth / float(d @ n))
    return target + (depth - float((target - geometry.source) @ n)) * n


def _image_axes(geometry) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit image directions of the patient's caudal (−S) and left (+L) axes at the isocentre, and
    |projected L| / |projected S| (≈ |cos| of the angle from frontal)."""
    iso = geometry.isocenter
    p0 = geometry.project(iso)
    cc = geometry.project(iso + np.array([0.0, 0.0, -100.0])) - p0
    lat = geometry.project(iso + np.array([100.0, 0.0, 0.0])) - p0
    ncc, nlat = np.linalg.norm(cc), np.linalg.norm(lat)
    cc_u = cc / ncc if ncc > 1e-9 else np.array([0.0, 1.0])
    lat_u = lat / nlat if nlat > 1e-9 else np.array([1.0, 0.0])
    return cc_u, lat_u, float(nlat / ncc) if ncc > 1e-9 else 0.0


def _box_top(d: Detection, cc_u: np.ndarray) -> float:
    """Most cranial extent of a box along the cranio-caudal image axis."""
    corners = np.array([[d.x0, d.y0], [d.x1, d.y0], [d.x0, d.y1], [d.x1, d.y1]])
    return float((corners @ cc_u).min())


# ------------------------------------------------------------------------------ level assignment
def _is_vertebra(name: str) -> bool:
    return name in VERTEBRA_GROUPS or (name.startswith("vertebrae_") and name[10:] in VERTEBRA_LEVELS)


def _is_rib(name: str) -> bool:
    return name == "ribs" or name.startswith("rib_")


def _dedupe(dets: list[Detection], iou: float = DEDUP_IOU) -> list[Detection]:
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.confidence):
        if all(box_iou(d.box, k.box) <= iou for k in kept):
            kept.append(d)
    return kept


def _chain_positions(t: np.ndarray) -> np.ndarray:
    """Level steps between boxes sorted along the axis (gaps ≥ GAP_FACTOR × local spacing count more)."""
    pos = np.zeros(len(t), int)
    if len(t) < 2:
        return pos
    d = np.diff(t)
    steps = np.ones(len(d), int)
    if len(d) >= 4:
        for i in range(len(d)):
            ref = float(np.median(d[max(0, i - 2): i + 3]))
            if ref > 0 and d[i] / ref >= GAP_FACTOR:
                steps[i] = int(round(d[i] / ref))
    pos[1:] = np.cumsum(steps)
    return pos


def _assign_vertebrae(verts: list[Detection], cc_u: np.ndarray) -> tuple[list[Detection], dict]:
    if not verts:
        return [], {}
    verts = sorted(verts, key=lambda d: float(d.center @ cc_u))
    t = np.array([float(d.center @ cc_u) for d in verts])
    pos = _chain_positions(t)
    n_lv = len(VERTEBRA_LEVELS)
    if pos[-1] >= n_lv:  # more boxes than levels: drop the gap inference
        pos = np.arange(len(verts))
    pos = np.minimum(pos, n_lv - 1)
    groups = [d.name if d.name in VERTEBRA_GROUPS else _LEVEL_GROUP[VERTEBRA_LEVELS.index(d.name[10:])] for d in verts]
    exact = [None if d.name in VERTEBRA_GROUPS else VERTEBRA_LEVELS.index(d.name[10:]) for d in verts]
    top_group = groups[0]
    if set(groups) == {"cervical"}:
        k_pref = 6 - int(pos[-1])  # lowest box is C7
    else:
        k_pref = {"cervical": 0, "thoracic": 7, "lumbar": 19}[top_group]
    best = None
    for k in range(-int(pos[0]), n_lv - int(pos[-1])):
        score = 0
        for p, g, e in zip(pos, groups, exact):
            lv = k + int(p)
            if e is not None:
                score += 3 if lv == e else 0
            elif _LEVEL_GROUP[lv] == g:
                score += 1
        key = (score, -abs(k - k_pref))
        if best is None or key > best[0]:
            best = (key, k)
    k = best[1] if best is not None else 0
    out = []
    for d, p, e in zip(verts, pos, exact):
        out.append(d if e is not None else d.renamed(f"vertebrae_{VERTEBRA_LEVELS[k + int(p)]}"))
    tops = {o.name: _box_top(o, cc_u) for o in out}
    return out, tops


def _rib_numbers(sided: list[Detection], known: list[tuple[int, float]], cc_u: np.ndarray) -> list[int]:
    """Rib numbers for one side's boxes sorted cranio-caudally: consecutive, ``first, first + 1, …``.

    ``first`` is 1 unless ≥ 3 thoracic levels are known; then it is the value (ties: the smaller)
    whose numbering best matches each box's top edge to the top edge of the thoracic vertebra of the
    same number (median distance; levels interpolated between known ones, extrapolated linearly), so
    a missed first rib does not shift the others.  (Per-rib matching with gaps was tried: rib tops
    sit up to half a level from their vertebra's, so it mislabelled more than it fixed.)
    """
    n = len(sided)
    if len(known) < 3 or n >= 12:
        return [min(i + 1, 12) for i in range(n)]
    lv, tp = np.array([k for k, _ in known], float), np.array([t for _, t in known], float)
    slope = float(np.polyfit(lv, tp, 1)[0])

    def t_top(level: int) -> float:
        if level < lv[0]:
            return tp[0] + (level - lv[0]) * slope
        if level > lv[-1]:
            return tp[-1] + (level - lv[-1]) * slope
        return float(np.interp(level, lv, tp))

    tops = np.array([_box_top(d, cc_u) for d in sided])
    costs = {f: float(np.median(np.abs(tops - [t_top(f + i) for i in range(n)]))) for f in range(1, 13 - n + 1)}
    first = min(costs, key=lambda f: (round(costs[f], 6), f))
    return [first + i for i in range(n)]


def _assign_ribs(ribs: list[Detection], verts: list[Detection], vert_tops: dict, geometry, cc_u, lat_u,
                 frontal: float, notes: list) -> list[Detection]:
    named = [d for d in ribs if d.name != "ribs"]
    group = [d for d in ribs if d.name == "ribs"]
    if not group:
        return named
    if frontal < FRONTAL_MIN:
        notes.append(f"{len(group)} 'ribs' boxes dropped: left and right are told apart only in views within ~20° "
                     "of frontal")
        return named
    # midline: lateral image coordinate of the spine as a function of the cranio-caudal one
    if len(verts) >= 2:
        tc = np.array([float(v.center @ cc_u) for v in verts])
        lc = np.array([float(v.center @ lat_u) for v in verts])
        A = np.stack([np.ones_like(tc), tc], 1)
        coef = np.linalg.lstsq(A, lc, rcond=None)[0] if np.ptp(tc) > 1e-6 else np.array([lc.mean(), 0.0])
        midline = lambda t: coef[0] + coef[1] * t  # noqa: E731
    else:
        m0 = float(geometry.project(geometry.isocenter) @ lat_u)
        midline = lambda t: m0  # noqa: E731
    # thoracic tops by level number, interpolated over the known ones
    known = sorted((int(n[11:]), top) for n, top in vert_tops.items() if n.startswith("vertebrae_T"))
    out = list(named)
    for side in ("left", "right"):
        sided = [d for d in group if ((float(d.center @ lat_u) - midline(float(d.center @ cc_u))) > 0) == (side == "left")]
        if not sided:
            continue
        sided.sort(key=lambda d: float(d.center @ cc_u))
        taken = {int(d.name.rsplit("_", 1)[1]) for d in named if d.name.startswith(f"rib_{side}_")}
        numbers = _rib_numbers(sided, known, cc_u)
        for d, num in zip(sided, numbers):
            if num in taken:
                continue
            out.append(d.renamed(f"rib_{side}_{num}"))
    return out


def assign_levels(detections: list[Detection], geometry, notes: list | None = None) -> list[Detection]:
    """Detections with group classes renamed to TotalSegmentator levels (rules in the module doc).

    Level-named detections keep their names; other classes (sternum, …) pass through.
    """
    notes = notes if notes is not None else []
    cc_u, lat_u, frontal = _image_axes(geometry)
    verts = _dedupe([d for d in detections if _is_vertebra(d.name)])
    ribs = [d for d in detections if _is_rib(d.name)]
    others = [d for d in detections if not (_is_vertebra(d.name) or _is_rib(d.name))]
    verts_named, tops = _assign_vertebrae(verts, cc_u)
    ribs_named = _assign_ribs(ribs, verts_named, tops, geometry, cc_u, lat_u, frontal, notes)
    best: dict[str, Detection] = {}
    for d in verts_named + ribs_named + others:
        if d.name not in best or d.confidence > best[d.name].confidence:
            if d.name in best:
                notes.append(f"two boxes named {d.name}: kept the more confident")
            best[d.name] = d
    return list(best.values())


# ------------------------------------------------------------------------------------- placement
def _projected_box(geometry, pts: np.ndarray) -> np.ndarray:
    uv = geometry.project(pts)
    return np.r_[uv.min(0), uv.max(0)]


def place_one(template_rel: np.ndarray, faces: np.ndarray, ref_centroid: np.ndarray, box: np.ndarray, geometry,
              depth: float | None, *, scale_limits=(0.5, 2.0), iterations: int = 6, border_px: float = 1.0):
    """Place template vertices (mm relative to the box centre) from a pixel box.  Returns
    ``(world vertices, scale, depth, centroid, projected box)``; ``depth=None`` keeps the template's own."""
    W, H = geometry.size
    X = geometry.isocenter + template_rel
    C = geometry.isocenter + ref_centroid
    if depth is None:
        depth = float(geometry.depth(C))
    bx0, by0, bx1, by1 = (float(v) for v in box)
    clipped = [(bx0 <= -0.5 + border_px, bx1 >= W - 0.5 - border_px), (by0 <= -0.5 + border_px, by1 >= H - 0.5 - border_px)]
    P = point_on_ray(geometry, (bx0 + bx1) / 2, (by0 + by1) / 2, depth)
    X = X - C + P
    C = P
    s_total = 1.0
    for _ in range(iterations):
        tb = _projected_box(geometry, X)
        ratios = []
        for ax, (lo_c, hi_c) in enumerate(clipped):
            if not (lo_c or hi_c):
                bsz, tsz = box[ax + 2] - box[ax], tb[ax + 2] - tb[ax]
                if tsz > 1e-6 and bsz > 0:
                    ratios.append(bsz / tsz)
        if ratios:
            ds = float(np.exp(np.mean(np.log(ratios))))
            new_total = float(np.clip(s_total * ds, *scale_limits))
            ds = new_total / s_total
            X = C + (X - C) * ds
            s_total = new_total
            tb = _projected_box(geometry, X)
        shift = np.zeros(2)
        for ax, (lo_c, hi_c) in enumerate(clipped):
            if lo_c and hi_c:
                continue
            if lo_c:
                shift[ax] = box[ax + 2] - tb[ax + 2]
            elif hi_c:
                shift[ax] = box[ax] - tb[ax]
            else:
                shift[ax] = (box[ax] + box[ax + 2]) / 2 - (tb[ax] + tb[ax + 2]) / 2
        cpix = geometry.project(C)
        C_new = point_on_ray(geometry, cpix[0] + shift[0], cpix[1] + shift[1], depth)
        X = X + (C_new - C)
        C = C_new
        if np.abs(shift).max() < 0.01 and (not ratios or abs(ds - 1) < 1e-4):
            break
    return X, s_total, depth, C, _projected_box(geometry, X)


def _coarse_inside(coarse_uv: np.ndarray | None, box) -> np.ndarray | None:
    if coarse_uv is None:
        return None
    x0, y0, x1, y1 = box
    return (coarse_uv[:, 0] >= x0) & (coarse_uv[:, 0] <= x1) & (coarse_uv[:, 1] >= y0) & (coarse_uv[:, 1] <= y1)


def _fit_depth(X: np.ndarray, C: np.ndarray, depth0: float, geometry, coarse: np.ndarray, coarse_depth: np.ndarray,
               inside: np.ndarray, *, step: float = 2.0, cap: float = 10.0, n_points: int = 400) -> float:
    """Depth along the box centre's ray where the template (placed at ``depth0``, centroid ``C``)
    best overlaps the coarse vertices that project into the box: the template slides along the ray,
    magnified so its projection stays the box, and the depth with the smallest mean truncated distance
    (template points → coarse vertices, capped at ``cap`` mm) wins."""
    from scipy.spatial import cKDTree

    pts = coarse[inside]
    d_in = coarse_depth[inside]
    lo, hi = float(d_in.min()), float(d_in.max())
    if hi - lo < step:
        return float(np.median(d_in))
    tree = cKDTree(pts)
    rel = X - C
    if len(rel) > n_points:
        rel = rel[np.random.default_rng(0).choice(len(rel), n_points, replace=False)]
    cpix = geometry.project(C)
    best, best_d = np.inf, depth0
    for d in np.arange(lo, hi + step / 2, step):
        P = point_on_ray(geometry, cpix[0], cpix[1], d)
        mag = d / depth0 if geometry.kind == "cone" else 1.0
        dist = tree.query(P + rel * mag, distance_upper_bound=cap)[0]
        score = float(np.minimum(dist, cap).mean())
        if score < best:
            best, best_d = score, float(d)
    return best_d


def place_templates(library, detections: list[Detection], geometry, coarse_mesh=None, *, min_confidence: float = 0.0,
                    scale_limits=(0.5, 2.0), min_coarse_points: int = 10, assign: bool = True,
                    depth_method: str = "fit", notes: list | None = None) -> list[PlacedTemplate]:
    """Place the library's template of every detected structure (module doc); LPS mm, this geometry.

    ``detections``: from ``Detector.detect`` (group or level classes) or ground-truth boxes
    (``detections_from_boxes``).  ``coarse_mesh``: X2B's mesh (trimesh or vertices) in LPS mm.
    Detections with no template (and no covering part) are skipped and listed in ``notes``; a template
    wound inward is turned outward first (``mesh.orient``), so a placed part always has positive volume.
    """
    import trimesh

    notes = notes if notes is not None else []
    dets = [d for d in detections if d.confidence >= min_confidence]
    named = assign_levels(dets, geometry, notes) if assign else list(dets)
    key = lambda d: (d.x0, d.y0, d.x1, d.y1, d.confidence)  # noqa: E731 (renaming keeps the box)
    original = {key(d): d.name for d in dets}
    if depth_method not in ("fit", "median"):
        raise ValueError(f"depth_method must be 'fit' or 'median', got {depth_method!r}")
    coarse_uv = coarse_depth = coarse_v = None
    if coarse_mesh is not None:
        coarse_v = np.asarray(getattr(coarse_mesh, "vertices", coarse_mesh), float).reshape(-1, 3)
        if len(coarse_v):
            coarse_uv = geometry.project(coarse_v)
            coarse_depth = geometry.depth(coarse_v)
    # per-structure templates first; otherwise a covering part (union of its boxes)
    jobs: list[tuple[str, Detection, list[Detection]]] = []
    cover_groups: dict[str, list[Detection]] = {}
    for d in named:
        if d.name in library:
            jobs.append((d.name, d, [d]))
            continue
        part = next((p for p in library.names if d.name in library.covers(p) or group_of(d.name) in library.covers(p)),
                    None)
        if part is None:
            notes.append(f"no template for {d.name}: skipped")
            continue
        cover_groups.setdefault(part, []).append(d)
    for part, ds in cover_groups.items():
        if part in [j[0] for j in jobs]:
            continue
        box = np.array([min(d.x0 for d in ds), min(d.y0 for d in ds), max(d.x1 for d in ds), max(d.y1 for d in ds)])
        u = Detection(part, max(d.confidence for d in ds), *box.tolist(), -1)
        jobs.append((part, u, ds))
    from ...mesh.orient import orient_outward

    placed = []
    for name, det, members in jobs:
        m, turned = orient_outward(library.mesh(name))  # a user's (e.g. SKEL) file may wind inward
        if turned:
            notes.append(f"template of {name} was wound inward ({turned} shells): turned outward")
        rel, faces, ref_c = np.asarray(m.vertices, float), np.asarray(m.faces), library.reference_centroid(name)
        inside = _coarse_inside(coarse_uv, det.box)
        depth, source = None, "template"
        if inside is not None and int(inside.sum()) >= min_coarse_points:
            if depth_method == "median":
                depth, source = float(np.median(coarse_depth[inside])), "coarse-median"
            else:  # fit: start from the template's own depth, then slide along the ray
                X0, _, d0, C0, _ = place_one(rel, faces, ref_c, det.box, geometry, None, scale_limits=scale_limits)
                depth = _fit_depth(X0, C0, d0, geometry, coarse_v, coarse_depth, inside)
                source = "coarse-fit"
        X, s, depth, C, pb = place_one(rel, faces, ref_c, det.box, geometry, depth, scale_limits=scale_limits)
        pnotes = []
        if s in scale_limits:
            pnotes.append(f"scale clamped to {s}")
        src = ",".join(sorted({original.get(key(x), x.name) for x in members}))
        placed.append(PlacedTemplate(name, trimesh.Trimesh(X, faces, process=False), det, s, depth, source, C, pb,
                                     src, pnotes))
    return placed


def assemble(placed: list[PlacedTemplate]) -> Assembled:
    """One mesh of all placed templates (shells concatenated) with per-vertex part ids.

    Returns ``Assembled(mesh, part_ids, names)`` (unpacks as a tuple); ``mesh.vertex_attributes
    ["part_id"]`` and ``mesh.metadata["part_names"]`` carry the same.
    """
    import trimesh

    if not placed:
        raise ValueError("assemble: nothing was placed")
    verts, faces, ids, names = [], [], [], []
    off = 0
    for k, p in enumerate(placed):
        v = np.asarray(p.mesh.vertices, float)
        verts.append(v)
        faces.append(np.asarray(p.mesh.faces) + off)
        ids.append(np.full(len(v), k, np.int32))
        names.append(p.name)
        off += len(v)
    mesh = trimesh.Trimesh(np.concatenate(verts), np.concatenate(faces), process=False)
    part_ids = np.concatenate(ids)
    mesh.vertex_attributes["part_id"] = part_ids
    mesh.metadata["part_names"] = names
    return Assembled(mesh, part_ids, names)
