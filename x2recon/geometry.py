"""ProjectionGeometry: the one camera model used everywhere.

DRR rendering, box labels, SPIDER's feature sampling and X2B2 all project through this class;
nothing else in the project writes a projection formula.

Conventions
-----------
* World coordinates are LPS millimetres (x → patient Left, y → Posterior, z → Superior).
* Pixel coordinates are continuous ``(col, row)``; the centre of pixel ``[row, col]`` of an image
  array of shape ``(H, W)`` is at integer ``(col, row)``.  ``u`` is the world direction of
  increasing column, ``v`` the direction of increasing row.
* Views are named by the angle ``theta`` of the source about the patient's long (S) axis:
  ``theta = 0`` is AP (source anterior, detector posterior), ``90`` puts the source on the
  patient's right (a left-lateral, ``LAT``), ``180`` posterior.  Images are seen from the source,
  rows run head → feet.  ``PA`` is ``theta = 180`` mirrored left–right so that, as in clinical
  display, the patient's right is on the image's left (the same as AP).
* The reconstruction box is a cube of ``box_size`` mm centred on ``isocenter`` and aligned with
  LPS.  Networks work in normalised box coordinates ``(p - isocenter) / box_size`` ∈ [-½, ½]³, so
  that every output maps back to millimetres without knowing the answer (see DESIGN.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import X2ReconInputError, plain

#: Default chest radiography set-up (PA chest: 180 cm source–image distance, 43 cm × 43 cm detector
#: rendered at 512²).  The isocentre (patient midline) sits 200 mm in front of the detector: more
#: than half the reconstruction box, so no part of the box — nor of a lateral chest with its
#: arms — lies beyond the detector plane (150 mm cut ~1 % of the chest CT's body in LAT).
CHEST_DEFAULTS: dict[str, Any] = dict(
    sdd=1800.0,
    sod=1600.0,
    size=(512, 512),
    detector_mm=430.0,
    box_size=384.0,
    kind="cone",
)

#: Largest detector side (pixels) and the source's least distance from the detector plane (mm).
MAX_SIDE = 16384
#: the largest image x2recon reads or renders: 2^28 pixels (16384²; 512 MiB as 16-bit, 1 GiB as float32).
#: Radiographs are at most ~4300² (43 cm at 0.1 mm); anything larger is checked before it is decoded.
MAX_PIXELS = 1 << 28
MIN_SOURCE_DISTANCE_MM = 1.0

NAMED_VIEWS = {"AP": (0.0, False), "LAT": (90.0, False), "PA": (180.0, True)}

GEOMETRY_FORMAT = "x2recon.ProjectionGeometry/1"


#: Source–detector and source–isocentre distances (mm) and detector widths the command line accepts for a
#: DRR (``build-dataset``, ``drr``): clinical set-ups are 1000–1800 mm and 24–43 cm; 1e9 is a typo.
DISTANCE_RANGE_MM = (100.0, 10_000.0)
DETECTOR_RANGE_MM = (10.0, 2000.0)

#: Reconstruction box edges x2recon accepts (mm): a vertebra needs ≥ 10 mm, a whole adult torso ≤ 2 m; outside
#: this a box is a typo or a unit error (1e9 gave a mesh ±5×10⁸ mm wide), refused wherever a box is read or set.
BOX_SIZE_RANGE_MM = (10.0, 2000.0)


def check_box_size(value, what: str = "box_size") -> float:
    """``value`` as a finite box edge in :data:`BOX_SIZE_RANGE_MM`; a ``ValueError`` naming ``what`` otherwise
    (NaN passed the old ``<= 0`` test and was written into JSON as ``NaN``)."""
    lo, hi = BOX_SIZE_RANGE_MM
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of mm, got {plain(value)}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{what} must be a finite edge of {lo:g}–{hi:g} mm, got {v:g}")
    return v


def _vec(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise ValueError(f"ProjectionGeometry.{name} must be 3 finite numbers, got {plain(x)}")
    return a


@dataclass(frozen=True)
class ProjectionGeometry:
    """A cone- or parallel-beam X-ray set-up in LPS millimetres."""

    source: np.ndarray
    detector_center: np.ndarray
    u: np.ndarray
    v: np.ndarray
    spacing: tuple[float, float]
    size: tuple[int, int]  # (width = columns, height = rows)
    kind: str = "cone"
    isocenter: np.ndarray = field(default_factory=lambda: np.zeros(3))
    box_size: float = CHEST_DEFAULTS["box_size"]
    name: str = ""
    #: how the isocentre was chosen (``build-dataset --isocenter``: structures, thorax, ct); "" when unknown.
    #: Not part of the camera (equality ignores it): it lets ``reconstruct`` name a box placed unlike the model's.
    isocenter_mode: str = ""

    def __post_init__(self):
        object.__setattr__(self, "source", _vec(self.source, "source"))
        object.__setattr__(self, "detector_center", _vec(self.detector_center, "detector_center"))
        object.__setattr__(self, "isocenter", _vec(self.isocenter, "isocenter"))
        u, v = _vec(self.u, "u"), _vec(self.v, "v")
        if abs(np.linalg.norm(u) - 1) > 1e-6 or abs(np.linalg.norm(v) - 1) > 1e-6 or abs(u @ v) > 1e-6:
            raise ValueError(f"ProjectionGeometry: u and v must be orthonormal detector directions "
                             f"(|u| = {np.linalg.norm(u):.6g}, |v| = {np.linalg.norm(v):.6g}, u·v = {u @ v:.6g})")
        object.__setattr__(self, "u", u)
        object.__setattr__(self, "v", v)
        sp = tuple(float(s) for s in self.spacing)
        if len(sp) != 2 or not all(math.isfinite(s) and s > 0 for s in sp):
            raise ValueError(f"ProjectionGeometry: pixel spacing must be two positive numbers, got {plain(self.spacing)}")
        if len(self.size) != 2 or not all(float(s) == int(s) and 1 <= int(s) <= MAX_SIDE for s in self.size):
            raise ValueError(f"ProjectionGeometry: size must be (width, height), whole numbers of pixels in "
                             f"1…{MAX_SIDE}, got {plain(self.size)}")
        sz = tuple(int(s) for s in self.size)
        if sz[0] * sz[1] > MAX_PIXELS:  # before any detector-sized array is allocated
            raise ValueError(f"ProjectionGeometry: a {sz[0]}×{sz[1]} detector is over the {MAX_PIXELS:,}-pixel limit")
        object.__setattr__(self, "spacing", sp)
        object.__setattr__(self, "size", sz)
        if self.kind not in ("cone", "parallel"):
            raise ValueError(f"ProjectionGeometry: kind must be 'cone' or 'parallel', got {self.kind!r}")
        object.__setattr__(self, "box_size", check_box_size(self.box_size, "ProjectionGeometry: box_size"))
        self._check_placement()

    def _check_placement(self) -> None:
        """The source off the detector plane (≥ 1 mm), the beam not parallel to it, and the
        isocentre (the patient) between source and detector — not behind either."""
        d = self.detector_center - self.source
        height = abs(d @ np.cross(self.u, self.v))  # the source's distance from the detector plane
        if height < MIN_SOURCE_DISTANCE_MM:
            raise ValueError(f"ProjectionGeometry: the source lies on the detector plane ({height:.3g} mm from "
                             f"it); it must be at least {MIN_SOURCE_DISTANCE_MM:g} mm in front of the detector")
        if height < 1e-6 * np.linalg.norm(d):
            raise ValueError("ProjectionGeometry: the beam must not be parallel to the detector")
        depth = (self.isocenter - self.source) @ self.plane_normal
        if not 0 < depth < height:
            raise ValueError(f"ProjectionGeometry: the isocentre must lie between the source and the detector "
                             f"({depth:.1f} mm from the source along the beam, detector at {height:.1f} mm): "
                             "the source or the detector is on the wrong side of the patient")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_view(
        cls,
        view: str | float = "AP",
        isocenter=(0.0, 0.0, 0.0),
        *,
        sdd: float = CHEST_DEFAULTS["sdd"],
        sod: float = CHEST_DEFAULTS["sod"],
        size: tuple[int, int] = CHEST_DEFAULTS["size"],
        detector_mm: float | None = CHEST_DEFAULTS["detector_mm"],
        spacing: tuple[float, float] | None = None,
        kind: str = CHEST_DEFAULTS["kind"],
        box_size: float = CHEST_DEFAULTS["box_size"],
    ) -> "ProjectionGeometry":
        """A named view (``AP``, ``PA``, ``LAT``) or any angle in degrees about the long axis.

        ``detector_mm`` is the detector's width; ``spacing`` overrides it per pixel.  For a
        parallel beam, ``sod``/``sdd`` only place the source and detector planes.
        """
        if isinstance(view, str):
            key = view.strip().upper()
            if key in NAMED_VIEWS:
                theta, mirror = NAMED_VIEWS[key]
                name = key
            else:
                try:
                    theta, mirror, name = float(key), False, f"{float(key):g}"
                except ValueError:
                    raise ValueError(f"unknown view {view!r}: use AP, PA, LAT or an angle in degrees") from None
        else:
            theta, mirror, name = float(view), False, f"{float(view):g}"
        if not math.isfinite(theta):  # 1e309 parses as inf: "math domain error" from sin() otherwise
            raise ValueError(f"unknown view {view!r}: an angle must be a finite number of degrees (or AP, PA, LAT)")
        if not 0 < sod < sdd:
            raise ValueError(f"need 0 < sod < sdd, got sod={sod}, sdd={sdd}")
        iso = _vec(isocenter, "isocenter")
        t = math.radians(theta)
        s_dir = np.array([-math.sin(t), -math.cos(t), 0.0])
        u = np.array([math.cos(t), -math.sin(t), 0.0])
        if mirror:
            u = -u
        v = np.array([0.0, 0.0, -1.0])
        w, h = int(size[0]), int(size[1])
        if spacing is None:
            if detector_mm is None:
                raise ValueError("give detector_mm or spacing")
            spacing = (detector_mm / w, detector_mm / w)
        return cls(
            source=iso + sod * s_dir,
            detector_center=iso - (sdd - sod) * s_dir,
            u=u,
            v=v,
            spacing=tuple(spacing),
            size=(w, h),
            kind=kind,
            isocenter=iso,
            box_size=box_size,
            name=name,
        )

    # ------------------------------------------------------------------ derived quantities
    @property
    def normal(self) -> np.ndarray:
        """Unit beam direction at the detector centre (source → detector)."""
        d = self.detector_center - self.source
        return d / np.linalg.norm(d)

    @property
    def plane_normal(self) -> np.ndarray:
        """Unit normal of the detector plane, oriented away from the source."""
        n = np.cross(self.u, self.v)
        return n if n @ self.normal > 0 else -n

    @property
    def sdd(self) -> float:
        """Source–detector distance along the detector normal (mm)."""
        return float((self.detector_center - self.source) @ self.plane_normal)

    @property
    def principal_point(self) -> np.ndarray:
        """Continuous pixel coordinates (col, row) of the detector centre."""
        return np.array([(self.size[0] - 1) / 2.0, (self.size[1] - 1) / 2.0])

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def matrix(self) -> np.ndarray:
        """The 3×4 matrix ``P`` with ``P @ [x, y, z, 1] ∝ [col, row, 1]`` (LPS mm → pixels)."""
        u, v, c = self.u, self.v, self.detector_center
        su, sv = self.spacing
        cx, cy = self.principal_point
        if self.kind == "parallel":
            return np.array(
                [
                    [*(u / su), -(u @ c) / su + cx],
                    [*(v / sv), -(v @ c) / sv + cy],
                    [0.0, 0.0, 0.0, 1.0],
                ]
            )
        n, s = self.plane_normal, self.source
        f = (c - s) @ n
        a_u, a_v = (s - c) @ u, (s - c) @ v
        A = np.stack(
            [
                (f * u + a_u * n) / su + cx * n,
                (f * v + a_v * n) / sv + cy * n,
                n,
            ]
        )
        return np.concatenate([A, -(A @ s)[:, None]], axis=1)

    def project(self, points):
        """Project world points ``(..., 3)`` to continuous pixels ``(..., 2)`` as (col, row).

        Accepts numpy arrays or torch tensors (on any device) and returns the same kind.
        """
        P = self.matrix()
        if _is_torch(points):
            import torch

            Pt = torch.as_tensor(P, dtype=points.dtype, device=points.device)
            h = points @ Pt[:, :3].T + Pt[:, 3]
            return h[..., :2] / h[..., 2:3]
        pts = np.asarray(points, dtype=np.float64)
        h = pts @ P[:, :3].T + P[:, 3]
        return h[..., :2] / h[..., 2:3]

    def depth(self, points):
        """Distance of points from the source along the beam axis (mm); positive in front."""
        n = self.plane_normal
        if _is_torch(points):
            import torch

            nt = torch.as_tensor(n, dtype=points.dtype, device=points.device)
            st = torch.as_tensor(self.source, dtype=points.dtype, device=points.device)
            return (points - st) @ nt
        return (np.asarray(points, dtype=np.float64) - self.source) @ n

    def pixel_to_world(self, cols, rows) -> np.ndarray:
        """World position (mm) of continuous pixel coordinates on the detector plane."""
        cx, cy = self.principal_point
        cols = np.asarray(cols, dtype=np.float64)[..., None]
        rows = np.asarray(rows, dtype=np.float64)[..., None]
        return (
            self.detector_center
            + (cols - cx) * self.spacing[0] * self.u
            + (rows - cy) * self.spacing[1] * self.v
        )

    def rays(self, dtype=np.float64):
        """Per-pixel rays as ``(origins, directions, lengths)``, shaped ``(H, W, 3)``/``(H, W)``.

        Cone beam: every ray starts at the source and ends on its detector pixel.  Parallel
        beam: rays start on the source plane and run along the beam to the detector.  The
        directions are unit vectors, ``lengths`` the distance from origin to detector (mm).
        """
        w, h = self.size
        cols, rows = np.meshgrid(np.arange(w), np.arange(h))
        targets = self.pixel_to_world(cols, rows)
        if self.kind == "cone":
            d = targets - self.source
            lengths = np.linalg.norm(d, axis=-1)
            origins = np.broadcast_to(self.source, targets.shape).copy()
            dirs = d / lengths[..., None]
        else:
            n = self.plane_normal
            dist = (self.detector_center - self.source) @ n
            origins = targets - dist * n
            dirs = np.broadcast_to(n, targets.shape).copy()
            lengths = np.full((h, w), dist)
        return origins.astype(dtype), dirs.astype(dtype), lengths.astype(dtype)

    # ------------------------------------------------------------------ reconstruction box
    def to_box(self, points):
        """World mm → normalised reconstruction-box coordinates in [-½, ½]³."""
        iso = self.isocenter
        if _is_torch(points):
            import torch

            iso = torch.as_tensor(iso, dtype=points.dtype, device=points.device)
        return (points - iso) / self.box_size

    def from_box(self, points):
        """Normalised reconstruction-box coordinates → world mm."""
        iso = self.isocenter
        if _is_torch(points):
            import torch

            iso = torch.as_tensor(iso, dtype=points.dtype, device=points.device)
        return points * self.box_size + iso

    def box_to_grid_matrix(self) -> np.ndarray:
        """3×4 matrix ``M`` with ``M @ [bx, by, bz, 1] ∝ [gx, gy, 1]``: normalised box coordinates →
        ``torch.nn.functional.grid_sample`` coordinates of this image (``align_corners=False``:
        −1 and +1 are the outer edges of the first and last pixels).  Networks that sample image
        features at a point's projection (X2B pixel-aligned features, X2B2, SPIDER) use this."""
        T = np.eye(4)
        T[:3, :3] *= self.box_size
        T[:3, 3] = self.isocenter
        W, H = self.size
        N = np.array([[2.0 / W, 0.0, 1.0 / W - 1.0], [0.0, 2.0 / H, 1.0 / H - 1.0], [0.0, 0.0, 1.0]])
        return N @ self.matrix() @ T

    def pixel_shifted(self, dcol: float, drow: float) -> "ProjectionGeometry":
        """The geometry of this image with its content moved by (``dcol``, ``drow``) pixels: the
        detector slides in its plane, so a point that projected to (c, r) projects to
        (c + dcol, r + drow).  Keeps image-space augmentation consistent with the geometry."""
        shift = dcol * self.spacing[0] * self.u + drow * self.spacing[1] * self.v
        return replace(self, detector_center=self.detector_center - shift)

    def box_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) corners of the reconstruction box in world mm."""
        half = self.box_size / 2
        return self.isocenter - half, self.isocenter + half

    # ------------------------------------------------------------------ variants
    def resized(self, width: int, height: int | None = None) -> "ProjectionGeometry":
        """The same detector sampled with another pixel count (physical extent kept)."""
        height = width if height is None else height
        su = self.spacing[0] * self.size[0] / width
        sv = self.spacing[1] * self.size[1] / height
        return replace(self, size=(int(width), int(height)), spacing=(su, sv))

    def translated(self, offset) -> "ProjectionGeometry":
        """The whole set-up (source, detector, box) moved by ``offset`` mm."""
        o = _vec(offset, "offset")
        return replace(
            self,
            source=self.source + o,
            detector_center=self.detector_center + o,
            isocenter=self.isocenter + o,
        )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "format": GEOMETRY_FORMAT,
            "name": self.name,
            "kind": self.kind,
            "source": self.source.tolist(),
            "detector_center": self.detector_center.tolist(),
            "u": self.u.tolist(),
            "v": self.v.tolist(),
            "spacing": list(self.spacing),
            "size": list(self.size),
            "isocenter": self.isocenter.tolist(),
            "box_size": self.box_size,
            "coordinates": "LPS mm; pixel (col, row), centre of pixel [r, c] at (c, r)",
            **({"isocenter_mode": self.isocenter_mode} if self.isocenter_mode else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, *, path: str | Path | None = None) -> "ProjectionGeometry":
        if not isinstance(d, dict) or d.get("format") != GEOMETRY_FORMAT:
            raise X2ReconInputError(path, f"not an X2Recon geometry (expected format {GEOMETRY_FORMAT!r})")
        try:
            return cls(
                source=d["source"],
                detector_center=d["detector_center"],
                u=d["u"],
                v=d["v"],
                spacing=tuple(d["spacing"]),
                size=tuple(d["size"]),
                kind=d.get("kind", "cone"),
                isocenter=d.get("isocenter", (0, 0, 0)),
                box_size=d.get("box_size", CHEST_DEFAULTS["box_size"]),
                name=d.get("name", ""),
                isocenter_mode=str(d.get("isocenter_mode", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise X2ReconInputError(path, f"invalid geometry: {e}") from None

    def to_json(self) -> str:
        """The geometry as JSON text (``io.xray.write_geometry`` writes it to a file)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)  # every number was checked finite

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ProjectionGeometry":
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        if p is not None:
            if not p.is_file():
                raise X2ReconInputError(p, "geometry file not found")
            from .userfiles import read_json

            return cls.from_dict(read_json(p, "geometry JSON"), path=p)
        from .userfiles import parse_json

        return cls.from_dict(parse_json(str(path_or_text), None, "geometry JSON"))

    def __eq__(self, other) -> bool:
        if not isinstance(other, ProjectionGeometry):
            return NotImplemented
        return (
            self.kind == other.kind
            and self.size == other.size
            and np.allclose(self.spacing, other.spacing)
            and all(
                np.allclose(getattr(self, k), getattr(other, k))
                for k in ("source", "detector_center", "u", "v", "isocenter")
            )
            and math.isclose(self.box_size, other.box_size)
        )

    __hash__ = None  # mutable numpy members


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")
