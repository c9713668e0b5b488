"""The atlas: a no-learning bone reconstruction — the library patient whose DRR looks most like the X-ray,
its skeleton placed on the X-ray.

A *library* is one or more built datasets (``x2recon build-dataset``: each case's DRRs with their geometry and
its bones in ``meshes/bones.ply``, LPS mm); undeformed scans and deformed variants are candidates alike.  Given
an X-ray and its geometry:

1. every library DRR of the same view (detector plane within :data:`VIEW_TILT_DEG`, in-plane rotation within
   :data:`VIEW_ROLL_DEG`; AP, PA and LAT never mix) is aligned to the X-ray in 2D — SimpleITK, scale per image
   axis + translation, normalised correlation, three resolutions — in *isocentre-plane millimetres*: each
   image's pixels are back-projected through its own source onto the plane through its isocentre
   perpendicular to the beam, so the cone-beam magnification (SOD/SDD) is taken out and the fit's scale is the
   patients' size ratio, not a detector's;
2. the case whose aligned DRR correlates best with the X-ray over the whole X-ray (outside the DRR: air) wins;
3. its ``bones.ply`` is moved into the X-ray's frame: the fit's horizontal and vertical scale and shift become
   the 3D scale and shift along the image's horizontal and vertical axes (about and between the two
   isocentres), and the depth along the beam is scaled as the horizontal axis (for a frontal view the body's
   width stands in for its depth, which one X-ray cannot see); the result is cut to the X-ray's
   reconstruction box and capped there, as a network's reconstruction is.

Off the isocentre plane a cone beam magnifies a little more or less (±6 % at ±100 mm with the chest set-up);
both images share that, so the 2D fit is read as a fit of the anatomy.  Deterministic: every pixel is used
(no random sampling) on one thread.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CancelledError, X2ReconInputError
from ..geometry import ProjectionGeometry
from ..io.xray import XRay

#: Side (pixels) both images are resampled to for the 2D alignment (area resampling keeps the geometry): 2 mm
#: pixels at a chest's isocentre; 128 and 256 gave the same fits within 0.4 mm on the test scenes, 256 at 2.5×
#: the CPU time.
REGISTRATION_SIZE = 192
#: Largest angle between the detector planes of the X-ray and a library DRR of "the same view" (degrees).
VIEW_TILT_DEG = 3.0
#: Largest in-plane rotation between them (degrees; radiograph-like DRRs turn the detector by up to 4°).
VIEW_ROLL_DEG = 10.0
#: The method's label in evaluation rows and tables.
METHOD = "atlas"


@dataclass(frozen=True)
class LibraryCase:
    """One built case of a library dataset."""

    root: Path
    case_id: str
    ct_sha256: str  # the CT voxels' checksum (meta.json inputs.ct_sha256): the patient's identity; "" if unrecorded
    views: tuple[str, ...]

    @property
    def folder(self) -> Path:
        return self.root / "cases" / self.case_id

    @property
    def label(self) -> str:
        return f"{self.root.name}/{self.case_id}"

    def geometry(self, view: str) -> ProjectionGeometry:
        from ..dataset.torch_data import _geometry

        return _geometry(str(self.folder / "images" / f"{view}.json"))


@dataclass(frozen=True)
class PlaneFit:
    """The 2D alignment library → X-ray in isocentre-plane mm along the X-ray's image axes (h: horizontal,
    v: vertical): ``x_xray = scale * x_library + shift``, and how well the aligned images correlate."""

    scale: tuple[float, float]
    shift: tuple[float, float]
    ncc: float


@dataclass
class AtlasResult:
    """The mesh (LPS mm, the X-ray's frame, cut to its box) and what made it."""

    mesh: object  # trimesh.Trimesh
    geometry: ProjectionGeometry  # the X-ray's
    case: LibraryCase
    view: str
    fit: PlaneFit
    seconds: float
    candidates: list[tuple[str, float]] = field(default_factory=list)  # (case label/view, NCC), best first

    def text(self) -> str:
        f = self.fit
        return (f"library case {self.case.label} ({self.view} DRR, NCC {f.ncc:.3f} after alignment; "
                f"{len(self.candidates)} DRRs compared): scale horizontal {f.scale[0]:.3f} (also depth), "
                f"vertical {f.scale[1]:.3f}, shift ({f.shift[0]:+.1f}, {f.shift[1]:+.1f}) mm at the isocentre "
                "plane")


# --------------------------------------------------------------------------- the library


def load_library(dirs) -> list[LibraryCase]:
    """Every built case of the datasets ``dirs`` (a folder, a list, or ``DIR,DIR`` text); an empty or missing
    one is an error naming it."""
    from ..dataset.model_fit import read_case_meta
    from ..dataset.torch_data import read_split

    if isinstance(dirs, (str, Path)):
        dirs = [d for d in str(dirs).split(",") if d.strip()]
    if not dirs:
        raise X2ReconInputError("--library", "needs at least one dataset folder (x2recon build-dataset)")
    cases = []
    for d in dirs:
        root = Path(str(d).strip()).expanduser()
        if not root.is_dir():
            raise X2ReconInputError(root, "library dataset folder not found")
        ids = read_split(root, "all")
        if not ids:
            raise X2ReconInputError(root, "the library dataset has no built case (no cases/<id>/meta.json)")
        for cid in ids:
            meta = read_case_meta(root, cid)
            ct = str((meta.get("inputs") or {}).get("ct_sha256") or "")
            cases.append(LibraryCase(root, cid, ct, tuple(meta.get("views") or ())))
    return cases


def library_geometry(cases: list[LibraryCase]) -> dict:
    """``sdd``, ``sod`` and ``box_size`` of the library's first case's build: what an X-ray without a geometry
    file is placed with (``reconstruct``), as a model's training geometry is used for a network."""
    from ..dataset.torch_data import dataset_build_config
    from ..io.xray import model_geometry

    return model_geometry({"dataset": {"build": dataset_build_config(cases[0].root)}})


def refuse_same_patient(cases: list[LibraryCase], scored: dict[str, str], data: Path) -> None:
    """An error before any work when a library case comes from the CT of a scored case (``scored``: case id →
    CT checksum) — the atlas would copy the answer — or when either side has no recorded checksum."""
    unknown = [c for c in cases if not c.ct_sha256]
    if unknown:
        raise X2ReconInputError(unknown[0].folder,
                                "the library case was built before x2recon recorded CT checksums: cannot tell "
                                "whether it is a scored patient; rebuild the library")
    missing = [cid for cid, ct in scored.items() if not ct]
    if missing:
        raise X2ReconInputError(data / "cases" / missing[0], "the case was built before x2recon recorded CT "
                                "checksums: cannot tell whether the library holds its patient; rebuild the dataset")
    by_ct = {}
    for cid, ct in scored.items():
        by_ct.setdefault(ct, cid)
    for c in cases:
        if c.ct_sha256 in by_ct:
            raise X2ReconInputError(c.folder, f"the library case has the same CT (checksum {c.ct_sha256[:16]}) as "
                                    f"the scored case {by_ct[c.ct_sha256]} of {data}: the atlas would copy the "
                                    "scored patient's own bones; leave that patient out of the library")


# --------------------------------------------------------------------------- isocentre-plane frames


def _basis(g: ProjectionGeometry) -> np.ndarray:
    """Rows: the image's horizontal axis, its vertical axis and the beam (plane normal) of ``g``."""
    return np.stack([g.u, g.v, g.plane_normal])


def _on_isocentre_plane(g: ProjectionGeometry, cols, rows) -> np.ndarray:
    """World points on the plane through ``g``'s isocentre perpendicular to its beam that project to the pixels
    (col, row): the detector points moved along their rays (cone: towards the source by SOD/SDD)."""
    d = g.pixel_to_world(cols, rows)
    n, c = g.plane_normal, g.isocenter
    if g.kind == "parallel":
        return d - ((d - c) @ n)[..., None] * n
    s = g.source
    t = ((c - s) @ n) / ((d - s) @ n)
    return s + t[..., None] * (d - s)


def same_view(target: ProjectionGeometry, other: ProjectionGeometry) -> bool:
    """Whether ``other`` images the patient from ``target``'s side with its image axes the same way up
    (see :data:`VIEW_TILT_DEG`, :data:`VIEW_ROLL_DEG`)."""
    if target.plane_normal @ other.plane_normal < math.cos(math.radians(VIEW_TILT_DEG)):
        return False
    return bool(target.u @ other.u >= math.cos(math.radians(VIEW_ROLL_DEG))
                and target.v @ other.v >= math.cos(math.radians(VIEW_ROLL_DEG)))


def plane_image(x: XRay, axes: np.ndarray):
    """``x`` as a SimpleITK image whose physical coordinates are millimetres on its isocentre plane along
    ``axes`` (rows: horizontal, vertical, beam of the X-ray the alignment is made in), origin at the
    isocentre: magnification and detector position taken out, a turned detector kept as the image's
    direction."""
    import SimpleITK as sitk

    g = x.geometry
    p = _on_isocentre_plane(g, np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])) - g.isocenter
    ab = p @ axes[:2].T  # (3, 2): pixel (0,0), (1,0), (0,1) in plane mm
    steps = np.stack([ab[1] - ab[0], ab[2] - ab[0]], axis=1)  # columns: one column, one row of pixels
    spacing = np.linalg.norm(steps, axis=0)
    u_, _, vt = np.linalg.svd(steps / spacing)  # the nearest rotation (a tilted detector is not quite one)
    img = sitk.GetImageFromArray(np.ascontiguousarray(x.image, np.float32))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in ab[0]])
    img.SetDirection([float(v) for v in (u_ @ vt).ravel()])
    return img


# --------------------------------------------------------------------------- 2D alignment


class AlignmentFailed(ValueError):
    """A library DRR whose 2D fit to the X-ray is no similarity of it (an image axis flipped)."""


def align(target, moving) -> PlaneFit:
    """Scale per axis + translation taking ``moving`` (a library DRR, :func:`plane_image`) onto ``target``
    (the X-ray): normalised correlation, shrink 4/2/1 with smoothing 2/1/0 pixels, identity start (both
    images are centred on their isocentres)."""
    import SimpleITK as sitk

    tx = sitk.AffineTransform(2)  # only the diagonal and the translation move (optimizer weights)
    r = sitk.ImageRegistrationMethod()
    r.SetNumberOfThreads(1)
    r.SetMetricAsCorrelation()
    r.SetMetricSamplingStrategy(r.NONE)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=1e-3, numberOfIterations=200,
                                               relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetOptimizerWeights([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    r.SetShrinkFactorsPerLevel([4, 2, 1])
    r.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    r.SetInitialTransform(tx, inPlace=True)
    r.Execute(target, moving)
    m = np.asarray(tx.GetMatrix(), float).reshape(2, 2)
    k = np.diag(m)
    if not np.all(k > 0):
        raise AlignmentFailed("the 2D alignment flipped an image axis")
    # fixed → moving: x_L = k x_X + T (centre 0); so x_X = x_L / k − T / k
    t = np.asarray(tx.GetTranslation(), float)
    scale, shift = 1.0 / k, -t / k
    return PlaneFit((float(scale[0]), float(scale[1])), (float(shift[0]), float(shift[1])),
                    _correlation(target, moving, tx))


def _correlation(target, moving, transform) -> float:
    """Pearson correlation of the X-ray with the aligned DRR over every X-ray pixel (outside the DRR: 0, air)."""
    import SimpleITK as sitk

    warped = sitk.GetArrayFromImage(sitk.Resample(moving, target, transform, sitk.sitkLinear, 0.0))
    a = sitk.GetArrayFromImage(target).ravel().astype(np.float64)
    b = warped.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else 0.0


# --------------------------------------------------------------------------- the mesh in the X-ray's frame


def placement_matrix(library: ProjectionGeometry, target: ProjectionGeometry, fit: PlaneFit) -> np.ndarray:
    """4×4 LPS-mm transform of the library case's bones into the X-ray's frame (module doc, step 3)."""
    axes = _basis(target)
    sh, sv = fit.scale
    a = axes.T @ np.diag([sh, sv, sh]) @ axes
    b = target.isocenter + axes.T @ np.array([fit.shift[0], fit.shift[1], 0.0]) - a @ library.isocenter
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = a, b
    return out


def placed_mesh(bones, matrix: np.ndarray, target: ProjectionGeometry, name: str):
    """``bones`` moved by ``matrix``, cut to the X-ray's reconstruction box and capped on its faces."""
    from ..dataset.box_coverage import clip_solid

    mesh = bones.copy()
    mesh.apply_transform(matrix)
    lo, hi = target.box_bounds()
    if np.all(mesh.bounds[0] >= lo) and np.all(mesh.bounds[1] <= hi):
        return mesh
    cut = clip_solid(mesh, lo, hi)
    if len(cut.faces) == 0:
        raise X2ReconInputError(name, "placed on the X-ray, the library case's bones lie outside its "
                                "reconstruction box")
    return cut


# --------------------------------------------------------------------------- reconstruction


def candidate_views(cases: list[LibraryCase], target: ProjectionGeometry) -> list[tuple[LibraryCase, str]]:
    """(case, view) of every library DRR of the X-ray's view (:func:`same_view`), in library order."""
    return [(c, v) for c in cases for v in c.views if same_view(target, c.geometry(v))]


def reconstruct_atlas(xray: XRay, cases: list[LibraryCase], *,
                      progress: Callable[[float, str], None] | None = None,
                      cancel: Callable[[], bool] | None = None) -> AtlasResult:
    """The atlas reconstruction of ``xray`` from the library ``cases`` (module doc).  ``progress(fraction,
    message)`` is called per library DRR; ``cancel()`` returning True stops with ``CancelledError``."""
    from ..dataset.torch_data import load_view
    from ..io.mesh import read_mesh

    t0 = time.perf_counter()
    pairs = candidate_views(cases, xray.geometry)
    if not pairs:
        raise X2ReconInputError(xray.source, f"no library DRR shows the X-ray's view ({xray.view_name}: beam "
                                f"{_direction(xray.geometry.plane_normal)}); the library has "
                                f"{', '.join(sorted({v for c in cases for v in c.views})) or 'no views'}")
    x = xray.resized(REGISTRATION_SIZE)
    axes = _basis(x.geometry)
    fixed = plane_image(x, axes)
    scored, failed = [], []
    for i, (case, view) in enumerate(pairs):
        if cancel is not None and cancel():
            raise CancelledError("atlas reconstruction cancelled")
        if progress is not None:
            progress(0.9 * i / len(pairs), f"aligning {case.label} {view}")
        drr = load_view(case.folder, view, REGISTRATION_SIZE)
        try:
            scored.append((align(fixed, plane_image(drr, axes)), case, view))
        except AlignmentFailed:  # this DRR cannot be fitted to the X-ray: no candidate (one bad fit must not end the run)
            failed.append(f"{case.label}/{view}")
    if not scored:
        raise X2ReconInputError(xray.source, f"no library DRR could be aligned with the X-ray ({len(failed)} tried: "
                                "every fit flipped an image axis)")
    best = max(range(len(scored)), key=lambda j: (scored[j][0].ncc, -j))  # ties: the first in library order
    fit, case, view = scored[best]
    if progress is not None:
        progress(0.9, f"placing {case.label}'s bones")
    bones_path = case.folder / "meshes" / "bones.ply"
    matrix = placement_matrix(case.geometry(view), xray.geometry, fit)
    mesh = placed_mesh(read_mesh(bones_path), matrix, xray.geometry, str(bones_path))
    if progress is not None:
        progress(1.0, "done")
    ranking = sorted(((f"{c.label}/{v}", f.ncc) for f, c, v in scored), key=lambda p: -p[1])
    return AtlasResult(mesh, xray.geometry, case, view, fit, time.perf_counter() - t0, ranking)


def _direction(n: np.ndarray) -> str:
    """A beam direction as LPS letters (``+P``: towards the patient's back)."""
    i = int(np.argmax(np.abs(n)))
    return ("+" if n[i] > 0 else "-") + "LPS"[i]


# --------------------------------------------------------------------------- evaluation


def evaluate_atlas(library, data: str | Path, *, split: str = "test", views: list[str] | None = None,
                   n_points: int = 100_000, out_csv: str | Path | None = None, mesh_dir: str | Path | None = None,
                   progress: bool = True, cancel: Callable[[], bool] | None = None,
                   log: Callable[[str], None] | None = None) -> list[dict]:
    """``evaluate_model``'s rows for the atlas (method :data:`METHOD`): every (case, view) of the split, each
    view (default: every rendered one) reconstructed from its DRR and scored in both protocols against the
    case's bones cut to its box (``x2b.evaluate._Scorer``).  ``library``: :func:`load_library`'s cases or
    what it reads.  Refused before any work: a library case from a scored case's CT
    (:func:`refuse_same_patient`), a view no library DRR shows.  ``log`` gets one line per reconstruction
    (the library case chosen and the fit)."""
    from ..dataset.model_fit import NOT_SEEN, read_case_meta
    from ..dataset.torch_data import load_view, read_split
    from ..metrics.report import write_csv
    from .evaluate import _progress_bar, _Scorer, _write_mesh, evaluation_items

    root = Path(data)
    cases = library if isinstance(library, list) else load_library(library)
    ids = read_split(root, split)
    refuse_same_patient(cases, {cid: str((read_case_meta(root, cid).get("inputs") or {}).get("ct_sha256") or "")
                                for cid in ids}, root)
    items = evaluation_items(root, split, "x2b", views, [])
    for cid, (v,) in items:
        g = load_view(root / "cases" / cid, v, REGISTRATION_SIZE).geometry
        if not candidate_views(cases, g):
            raise X2ReconInputError(root / "cases" / cid, f"no library DRR shows its {v} view (the library has "
                                    f"{', '.join(sorted({w for c in cases for w in c.views}))}); "
                                    "choose views with --views")
    rows: list[dict] = []
    bar = _progress_bar(len(items), split) if progress else None
    scorer = _Scorer(n_points)
    for cid, vs in items:
        if cancel is not None and cancel():
            raise CancelledError("evaluation cancelled")
        folder = root / "cases" / cid
        res = reconstruct_atlas(load_view(folder, vs[0], REGISTRATION_SIZE), cases, cancel=cancel)
        row = scorer(folder, vs, res, res.mesh, METHOD, res.seconds)
        rows.append({**row, "seen_in_training": NOT_SEEN})
        _write_mesh(mesh_dir, res.mesh, f"{cid}_{vs[0]}_{METHOD}")
        if log is not None:
            log(f"{cid} {vs[0]}: {res.text()}")
        if out_csv is not None:
            write_csv(rows, out_csv)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(cd_mm=f"{row['world_chamfer_l1']:.1f}", case=res.case.case_id)
    if bar is not None:
        bar.close()
    return rows
