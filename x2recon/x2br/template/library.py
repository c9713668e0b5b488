"""Template library: one watertight mesh per structure, from the dataset's own segmented CTs.

X2BR (x2br-paper §3.2) builds its patient-specific template from SKEL's skeleton meshes; SKEL needs
a licence, cannot be shipped and has no separate vertebrae or ribs (DESIGN.md, "Deviations").  So the
library is built from the per-structure meshes every dataset case already has
(``cases/<id>/meshes/<TotalSegmentator name>.ply``, watertight, LPS mm), and SKEL parts are added
when the user has them (``x2recon.x2br.template.skel``).

Which case gives a structure's template
    ``reference="median"`` (default): among the cases that have the structure (the ``train`` split,
    so test anatomy never leaks into templates), the one whose mesh *volume* is closest to the median
    volume — a typical size, and a real shape rather than an average that no patient has.  Ties go to
    the first case id.  ``reference=<case id>``: that case for every structure it has; structures it
    lacks fall back to the median rule (recorded per structure as ``"fallback"``).

Coordinates
    Each template is stored once, ``meshes/<name>.ply``, in LPS millimetres *relative to the source
    case's reconstruction-box centre* (its imaging isocentre); ``mesh(name, "box")`` gives it in that
    box's normalised coordinates ``(p - isocentre) / box_size`` (the networks' space) by dividing by
    the box size (a second stored copy doubled a bundled library's size).  A template
    thus keeps where the structure sits in a typical chest (its reference position and depth), which
    placement uses when there is no coarse shape to take the depth from.

``library.json`` (format ``x2recon.templates/1``) lists every structure with its source case, volume,
centroid and extent, what it ``covers`` (the detector classes it can be placed from), plus the box
size, the selection rule, the dataset and versions.  It is written last: a folder without it is not
a library.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import CancelledError, X2ReconInputError
from ...io.atomic import atomic_write_text
from ...io.documents import read_document, recorded_path
from .store import write_template

LIBRARY_FORMAT = "x2recon.templates/1"
SKIP_MESHES = ("bones", "bones_box")

Progress = Callable[[float, str], None]


class TemplateLibrary:
    """A built library (:func:`load_library`): ``.names``, ``.mesh(name)``, ``.info(name)``."""

    def __init__(self, folder: str | Path, doc: dict):
        self.folder = Path(folder)
        self.doc = doc
        self._cache: dict[tuple[str, str], object] = {}

    @property
    def names(self) -> list[str]:
        return list(self.doc["structures"])

    @property
    def box_size(self) -> float:
        return float(self.doc["box_size"])

    def __contains__(self, name: str) -> bool:
        return name in self.doc["structures"]

    def __len__(self) -> int:
        return len(self.doc["structures"])

    def info(self, name: str) -> dict:
        try:
            return self.doc["structures"][name]
        except KeyError:
            raise KeyError(f"no template for {name!r} in {self.folder} (it has {len(self)}: "
                           f"{', '.join(self.names[:8])}{'…' if len(self) > 8 else ''})") from None

    def covers(self, name: str) -> list[str]:
        """Detector classes / structures this template stands for (itself, or e.g. a SKEL region's groups)."""
        return list(self.info(name).get("covers") or [name])

    def reference_centroid(self, name: str) -> np.ndarray:
        """Centroid of the template in mm relative to the box centre (its typical position)."""
        return np.asarray(self.info(name)["centroid_mm"], float)

    def mesh(self, name: str, space: str = "mm"):
        """The template as a new trimesh: ``space="mm"`` (LPS mm relative to the box centre) or
        ``"box"`` (normalised box coordinates)."""
        import trimesh

        from ...io.mesh import read_mesh

        info = self.info(name)
        key = (name, space)
        if key not in self._cache:
            if space == "mm":
                m = read_mesh(self.folder / info["file"])
            elif space == "box":
                m = self.mesh(name, "mm")
                m = trimesh.Trimesh(np.asarray(m.vertices) / self.box_size, m.faces, process=False)
            else:
                raise ValueError(f"space must be 'mm' or 'box', got {space!r}")
            self._cache[key] = m
        m = self._cache[key]
        return trimesh.Trimesh(np.array(m.vertices), np.array(m.faces), process=False)

    def __repr__(self) -> str:
        return f"TemplateLibrary({str(self.folder)!r}, {len(self)} structures)"


def load_library(folder: str | Path) -> TemplateLibrary:
    """Open a library folder written by :func:`build_library`; fails naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise X2ReconInputError(folder, "template library folder not found")
    f = folder / "library.json"
    if not f.is_file():
        raise X2ReconInputError(folder, "not a template library (no library.json); build one with 'x2recon template build'")
    doc = read_document(f, LIBRARY_FORMAT, "template library")
    for name, info in doc.get("structures", {}).items():
        if not (folder / info["file"]).is_file():
            raise X2ReconInputError(folder / info["file"], f"template mesh of {name} missing")
    return TemplateLibrary(folder, doc)


# ------------------------------------------------------------------------------------------ build
def _case_ids(root: Path, split: str) -> list[str]:
    built = sorted(p.name for p in (root / "cases").iterdir() if (p / "meta.json").is_file())
    if split == "all":
        return built
    f = root / "splits" / f"{split}.txt"
    ids = [s.strip() for s in f.read_text().splitlines() if s.strip()] if f.is_file() else []
    ids = [i for i in ids if i in built]
    return ids or built


def _structure_order() -> dict[str, int]:
    from ...structures import totalseg_v2

    return {n: i for i, n in enumerate(totalseg_v2().values())}


def _dataset_inventory(root: Path, split: str) -> tuple[list[str], dict, dict, float]:
    """(case ids, their meta.json, structure → cases with its mesh, the one box size) of ``split``."""
    if not (root / "cases").is_dir():
        raise X2ReconInputError(root, "not an x2recon dataset (no cases/ folder); build one with 'x2recon build-dataset'")
    cases = _case_ids(root, split)
    if not cases:
        raise X2ReconInputError(root, "the dataset has no finished case (cases/*/meta.json)")
    metas, available = {}, {}
    for cid in cases:
        metas[cid] = json.loads((root / "cases" / cid / "meta.json").read_text())
        for p in sorted((root / "cases" / cid / "meshes").glob("*.ply")):
            if p.stem not in SKIP_MESHES:
                available.setdefault(p.stem, []).append(cid)
    if not available:
        raise X2ReconInputError(root, "the dataset's cases have no per-structure meshes (cases/<id>/meshes/"
                                      "<structure>.ply); rebuild it with 'x2recon build-dataset'")
    sizes = {float(metas[c]["box_size"]) for c in cases}
    if len(sizes) > 1:
        raise X2ReconInputError(root, f"cases use different reconstruction box sizes {sorted(sizes)}; "
                                      "a library needs one")
    return cases, metas, available, sizes.pop()


def _wanted_structures(root: Path, structures, available: dict) -> tuple[list[str], list[str]]:
    """(structures to build, in TotalSegmentator's order; requested ones without a mesh in the dataset)."""
    from ...structures import resolve_structures

    if structures is None:
        order = _structure_order()
        return sorted(available, key=lambda n: order.get(n, 10**6)), []
    wanted = resolve_structures(structures)
    missing = [s for s in wanted if s not in available]
    wanted = [s for s in wanted if s in available]
    if not wanted:
        raise X2ReconInputError(root, f"none of the requested structures has a mesh in the dataset "
                                      f"(asked for {structures!r}; it has {sorted(available)[:10]}…)")
    return wanted, missing


def _choose_template(root: Path, name: str, cands: list[str], reference: str):
    """(case, watertight mesh, rule, median volume) of the structure's template: the reference case, else
    the case whose mesh volume is closest to the median, else the next that can be made watertight;
    None when none can.  Pieces enclosing less than ``MIN_COMPONENT_MM3`` are dropped first (the rule of
    ground-truth meshes, which datasets built before it lack; counted in ``metadata["dropped_pieces"]``)."""
    from ...io.mesh import read_mesh
    from ...mesh.extract import MIN_COMPONENT_MM3, MeshError, drop_small_components, ensure_watertight

    meshes = {c: drop_small_components(read_mesh(root / "cases" / c / "meshes" / f"{name}.ply"), MIN_COMPONENT_MM3)
              for c in cands}
    meshes = {c: m for c, m in meshes.items() if len(m.faces)}
    if not meshes:
        return None
    cands = [c for c in cands if c in meshes]
    vols = {c: float(abs(m.volume)) for c, m in meshes.items()}
    med = float(np.median(list(vols.values())))
    ranked = sorted(cands, key=lambda c: (abs(vols[c] - med), c))
    rule = "median"
    if reference != "median":
        if reference in cands:
            ranked = [reference] + [c for c in ranked if c != reference]
            rule = "reference"
        else:
            rule = "fallback"
    for c in ranked:
        try:
            mesh = ensure_watertight(meshes[c].copy(), name)
            mesh.metadata["dropped_pieces"] = meshes[c].metadata["dropped_pieces"]
            return c, mesh, rule, med
        except MeshError:
            continue
    return None


def build_library(
    dataset_dir: str | Path | None,
    out_dir: str | Path,
    structures=None,
    reference: str = "median",
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    *,
    split: str = "train",
    skel: str | Path | None = None,
    skel_options: dict | None = None,
) -> TemplateLibrary:
    """Build a template library in ``out_dir`` from a dataset's per-case meshes (see module doc).

    ``structures``: TotalSegmentator names and/or groups (``ribs``, ``thoracic``…); default every
    structure the cases have meshes for.  ``split``: the cases to draw from (``train`` by default —
    all built cases when the dataset has no such split — or ``all``).  ``skel``: a folder of SKEL
    bone meshes to add (``x2recon.x2br.template.skel``); ``dataset_dir`` may then be ``None``.
    """
    report = progress or (lambda f, m: None)
    out = Path(out_dir)
    structures_doc: dict[str, dict] = {}
    doc: dict = {"format": LIBRARY_FORMAT}
    box_size = None
    missing: list[str] = []
    if dataset_dir is not None:
        root = Path(dataset_dir)
        cases, metas, available, box_size = _dataset_inventory(root, split)
        wanted, missing = _wanted_structures(root, structures, available)
        if reference != "median" and reference not in cases:
            raise X2ReconInputError(root, f"reference case {reference!r} is not among the {split} cases "
                                          f"({', '.join(cases[:6])}{'…' if len(cases) > 6 else ''})")
        for i, name in enumerate(wanted):
            if cancel is not None and cancel():
                raise CancelledError("template library: cancelled")
            report(0.9 * i / len(wanted), f"template {name}")
            choice = _choose_template(root, name, available[name], reference)
            if choice is None:
                missing.append(name)
                continue
            chosen, mesh, rule, med = choice
            rel = np.asarray(mesh.vertices, float) - np.asarray(metas[chosen]["isocenter"], float)
            rec = write_template(out, name, rel, np.asarray(mesh.faces), box_size)
            rec.update(source="dataset", source_case=chosen, selection=rule, covers=[name],
                       candidates=len(available[name]), median_volume_mm3=round(med, 3),
                       dropped_pieces=int(mesh.metadata["dropped_pieces"]))
            structures_doc[name] = rec
        doc.update(dataset=recorded_path(root), split=split, cases=cases)
    if skel is not None:
        from .skel import add_skel_parts

        report(0.92, "SKEL parts")
        skel_doc = add_skel_parts(skel, out, structures_doc, box_size=box_size or 384.0, **(skel_options or {}))
        doc["skel"] = skel_doc
        box_size = box_size or 384.0
    if not structures_doc:
        raise X2ReconInputError(dataset_dir or skel, "no template could be built")
    from ...dataset.case import versions

    doc.update(
        box_size=box_size,
        coordinates={"file": "LPS millimetres relative to the reconstruction-box centre (the source case's isocentre)",
                     "box": "normalised box coordinates (p - isocentre) / box_size, in [-1/2, 1/2]^3: file / box_size"},
        selection="median" if reference == "median" else f"case:{reference}",
        selection_rule=("per structure, the case whose mesh volume is closest to the median volume of the cases "
                        "that have it" if reference == "median" else
                        f"case {reference}; structures it lacks: the median rule"),
        structures=structures_doc,
        missing=missing,
        provenance={"versions": {**versions(), "x2recon.x2br.template": LIBRARY_FORMAT},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
    )
    atomic_write_text(out / "library.json", json.dumps(doc, indent=1))
    report(1.0, f"{len(structures_doc)} templates")
    return load_library(out)
