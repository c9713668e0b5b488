"""SKEL bone meshes as template parts (``x2recon template build --skel DIR``).

What SKEL is, and why it is optional
    SKEL (Keller et al., SIGGRAPH Asia 2023) is the skeleton model the X2BR paper's templates come from
    (its BSM bones, OpenSim-derived).  It is licensed per user, must be downloaded by the user from its
    authors after registration, and may not be redistributed — X2Recon neither ships nor downloads it.

What this module can do
    Read per-bone meshes the user exported from SKEL (OBJ/PLY/STL/OFF/VTK files named after SKEL's 24
    bodies: ``thorax.obj``, ``lumbar_body.ply``, …, e.g. the faces of ``skel_mesh`` whose vertices'
    strongest ``skel_weights`` bone is that body), convert SKEL's frame (SMPL's: metres, +X the
    subject's left, +Y up, +Z anterior) to LPS millimetres, and add them to a template library as
    parts named in our vocabulary (:data:`SKEL_PARTS`):

    ============  =================  ==========================================================
    SKEL body     library part       covers (detector classes / structures it is placed from)
    ============  =================  ==========================================================
    thorax        ``skel_thorax``    ribs + sternum + costal cartilages + thoracic spine, one mesh
    lumbar_body   ``lumbar``         the lumbar spine (L1–L5) as one mesh
    head          ``skel_head``      skull (+ whatever SKEL's head body holds); placed only by name
    pelvis        ``skel_pelvis``    sacrum + both hips, one mesh
    scapula_l/r   ``scapula_left/right``, humerus_l/r ``humerus_left/right``, femur_l/r
                  ``femur_left/right`` (TotalSegmentator names)
    ============  =================  ==========================================================

    Each part is placed in the reconstruction box by matching its bounding box (centre and, by one
    isotropic factor, size) to the dataset templates it covers when the library has them; otherwise the
    SKEL skeleton is kept rigid and its thorax+lumbar bounding box is centred in the box.

What it cannot do
    SKEL has no separate vertebrae and no separate ribs: ``skel_thorax`` is one rigid piece, so a
    SKEL-only library gives one template per region, placed from the union of that region's
    detections, and the per-level accuracy of a dataset library (one mesh per vertebra and rib) is out
    of reach.  It cannot pose or shape SKEL (that needs SKEL's own code and model files): export the
    bones in the pose and shape you want.  Bones we have no name for (tibia, ulna, hand, …) are
    skipped and listed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import X2ReconInputError
from ...io.documents import recorded_path

#: SKEL body → (library part name, what it covers).
SKEL_PARTS: dict[str, tuple[str, list[str]]] = {
    "thorax": ("skel_thorax", ["ribs", "thoracic", "sternum", "costal_cartilages"]),
    "lumbar_body": ("lumbar", ["lumbar"]),
    "head": ("skel_head", []),
    "pelvis": ("skel_pelvis", ["sacrum", "hip_left", "hip_right"]),
    "scapula_l": ("scapula_left", ["scapula_left"]),
    "scapula_r": ("scapula_right", ["scapula_right"]),
    "humerus_l": ("humerus_left", ["humerus_left"]),
    "humerus_r": ("humerus_right", ["humerus_right"]),
    "femur_l": ("femur_left", ["femur_left"]),
    "femur_r": ("femur_right", ["femur_right"]),
}
#: SKEL's 24 bodies (kin_skel); the ones not in SKEL_PARTS are skipped.
SKEL_BODIES = ("pelvis", "femur_r", "tibia_r", "talus_r", "calcn_r", "toes_r", "femur_l", "tibia_l", "talus_l",
               "calcn_l", "toes_l", "lumbar_body", "thorax", "head", "scapula_r", "humerus_r", "ulna_r", "radius_r",
               "hand_r", "scapula_l", "humerus_l", "ulna_l", "radius_l", "hand_l")
#: Without at least one of these the folder is no use for chest X-rays.
REQUIRED_ANY = ("thorax", "lumbar_body")
MESH_EXTS = (".obj", ".ply", ".stl", ".off", ".vtk")

#: SMPL/SKEL frame (x left, y up, z anterior; metres) → LPS (x left, y posterior, z superior; mm).
SMPL_TO_LPS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def find_skel_meshes(folder: str | Path) -> dict[str, Path]:
    """SKEL body name → mesh file in ``folder`` (case-insensitive stems; ``.obj`` preferred)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise X2ReconInputError(folder, "SKEL mesh folder not found")
    found: dict[str, Path] = {}
    for ext in MESH_EXTS:
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() == ext:
                stem = p.stem.lower()
                for prefix in ("skel_", "bsm_"):
                    stem = stem.removeprefix(prefix)
                if stem in SKEL_BODIES:
                    found.setdefault(stem, p)
    if not any(b in found for b in REQUIRED_ANY):
        have = sorted(p.name for p in folder.iterdir())[:10]
        raise X2ReconInputError(folder, "no SKEL spine meshes: expected thorax.obj/.ply and/or lumbar_body.obj/.ply "
                                        "(per-bone meshes exported from SKEL, named after its bodies: "
                                        f"{', '.join(SKEL_BODIES[:14])}, …); the folder has {have or 'nothing'}")
    return found


def resolve_units(meshes: dict, units: str = "auto") -> str:
    """``m`` or ``mm``: ``auto`` is metres when the whole skeleton spans less than 5 units."""
    if units == "auto":
        allv = np.concatenate([np.asarray(m.vertices) for m in meshes.values()])
        return "m" if np.ptp(allv, axis=0).max() < 5.0 else "mm"
    if units not in ("m", "mm"):
        raise ValueError(f"units must be 'm', 'mm' or 'auto', got {units!r}")
    return units


def load_skel_meshes(folder: str | Path, *, axes: str = "smpl", units: str = "auto") -> dict[str, object]:
    """SKEL bodies of ``folder`` as trimeshes in LPS millimetres (SKEL's origin kept).

    ``axes``: ``smpl`` (SKEL's own frame, see :data:`SMPL_TO_LPS`) or ``lps`` (already LPS);
    ``units``: ``m``, ``mm`` or ``auto`` (metres when the whole skeleton spans less than 5 units).
    """
    import trimesh

    from ...io.mesh import read_mesh

    files = find_skel_meshes(folder)
    meshes = {b: read_mesh(p) for b, p in files.items()}
    units = resolve_units(meshes, units)
    if axes not in ("smpl", "lps"):
        raise ValueError(f"axes must be 'smpl' or 'lps', got {axes!r}")
    scale = 1000.0 if units == "m" else 1.0
    R = SMPL_TO_LPS if axes == "smpl" else np.eye(3)
    out = {}
    for b, m in meshes.items():
        v = (np.asarray(m.vertices) @ R.T) * scale
        out[b] = trimesh.Trimesh(v, np.asarray(m.faces), process=False)
    return out


def _union_bounds(records: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    if not records:
        return None
    lo = np.min([r["bounds_mm"][0] for r in records], axis=0)
    hi = np.max([r["bounds_mm"][1] for r in records], axis=0)
    return lo, hi


def add_skel_parts(folder: str | Path, out: Path, structures_doc: dict, *, box_size: float, axes: str = "smpl",
                   units: str = "auto") -> dict:
    """Add the SKEL parts of ``folder`` to a library being written in ``out`` (updates ``structures_doc``).

    Returns the ``skel`` record of library.json: files, mapping, alignment, skipped bodies.
    """
    from ...mesh.extract import MeshError, ensure_watertight
    from ...structures import group_of, resolve_structures
    from .store import write_template

    from ...io.mesh import read_mesh

    files = find_skel_meshes(folder)
    units = resolve_units({b: read_mesh(p) for b, p in files.items()}, units)
    meshes = load_skel_meshes(folder, axes=axes, units=units)
    skipped = sorted(b for b in meshes if b not in SKEL_PARTS)
    used = {b: m for b, m in meshes.items() if b in SKEL_PARTS}

    def covered_records(covers: list[str]) -> list[dict]:
        names = set()
        for c in covers:
            try:
                names.update(resolve_structures([c]))
            except ValueError:
                names.add(c)
        return [r for n, r in structures_doc.items() if r.get("source") == "dataset" and
                (n in names or group_of(n) in covers)]

    # rigid fallback: centre SKEL's thorax + lumbar bounding box in the box
    spine = [used[b] for b in REQUIRED_ANY if b in used]
    sv = np.concatenate([np.asarray(m.vertices) for m in spine])
    skel_shift = -(sv.min(0) + sv.max(0)) / 2
    parts, alignment = {}, {}
    for body, mesh in sorted(used.items()):
        part, covers = SKEL_PARTS[body]
        try:
            mesh = ensure_watertight(mesh.copy(), f"SKEL {body}")
            watertight_note = None
        except MeshError as e:  # SKEL's per-body submeshes can be open where bodies meet
            watertight_note = str(e.problem)
        v = np.asarray(mesh.vertices, float)
        lo, hi = v.min(0), v.max(0)
        target = _union_bounds(covered_records(covers))
        if target is not None:
            tlo, thi = target
            s = float(np.exp(np.mean(np.log(np.maximum(thi - tlo, 1e-6) / np.maximum(hi - lo, 1e-6)))))
            rel = (v - (lo + hi) / 2) * s + (tlo + thi) / 2
            alignment[part] = {"method": "bounding box of the covered dataset templates", "scale": round(s, 5)}
        else:
            rel = v + skel_shift
            alignment[part] = {"method": "SKEL skeleton centred in the box (thorax + lumbar bounding box)",
                               "scale": 1.0}
        rec = write_template(out, part, rel, np.asarray(mesh.faces), box_size)
        rec.update(source="skel", source_case=None, skel_body=body, selection="skel",
                   covers=covers or [part], skel_file=recorded_path(files[body]))
        if watertight_note:
            rec["note"] = f"not watertight: {watertight_note}"
        if part in structures_doc and structures_doc[part].get("source") == "dataset":
            part = f"{part}_skel"  # never replace a dataset template; keep both
            rec = write_template(out, part, rel, np.asarray(mesh.faces), box_size) | {
                k: rec[k] for k in ("source", "source_case", "skel_body", "selection", "covers", "skel_file")}
        structures_doc[part] = rec
        parts[body] = part
    return {"folder": recorded_path(folder), "axes": axes, "units": units, "parts": parts,
            "alignment": alignment, "skipped_bodies": skipped,
            "note": "SKEL has no separate vertebrae or ribs: its thorax is one part (skel_thorax)"}
