"""X-ray inputs for reconstruction: an image in display intensities plus the geometry it was taken with.

Readers for what users bring — our DRR PNGs (with their ``<stem>.json`` geometry), other 8/16-bit
greyscale PNGs, DICOM radiographs, and 2D NIfTI/NRRD/MHA images — each turned into an ``XRay``:
``image`` (H, W) float32 in [0, 1], bone bright, row 0 at the top, and a ``ProjectionGeometry``
whose ``size`` is (W, H).  Files that are not already display images (DICOM, NIfTI, …) are mapped
as the dataset builder maps DRRs (robust linear window, then CLAHE), so the network sees what it
was trained on.  DICOM CR/DX: ImagerPixelSpacing (else PixelSpacing), DistanceSourceToDetector/-Patient,
MONOCHROME1 inverted, the VOI window (WindowCenter/WindowWidth) applied; a VOI LUT *sequence* is not
read (SimpleITK does not expose it): the robust window then stands in.

Without a geometry file the X-ray is *placed* (:func:`place_xray`), never silently given the chest
default: its lung fields are found and the detector is scaled (when the pixel spacing is unknown) and
shifted so that they land where the training patient's lungs lie in the training DRRs.  What was
assumed comes back as ``XRay.placement`` (``Placement.text()`` is printed by ``x2recon reconstruct``
and shown by the Slicer panel); ``--pixel-spacing``, ``--sdd``, ``--sod`` or ``--geometry`` override it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError
from ..geometry import CHEST_DEFAULTS, ProjectionGeometry
from . import native_path
from .atomic import atomic_write_text
from .image import area_matrix, read_grey_2d, read_png

MIN_SIZE = 32
PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


#: The training patient's lung fields (chest_lidc0001, TotalSegmentator lung lobes) in the patient plane,
#: relative to its imaging isocentre (the centre of the default structures): width (left–right extent) and
#: centre (LPS x, z) in mm.  An X-ray without geometry is scaled and shifted to put its lungs there.
TRAINING_LUNGS = {"width_mm": 251.7, "centre_mm": (-2.8, 17.5)}


@dataclass
class Placement:
    """How an X-ray was put into the model's geometry: each value and where it came from."""

    method: str  # "geometry file" | "lung fields" | "centred"
    pixel_mm: float
    sdd: float
    sod: float
    shift_px: tuple[float, float] = (0.0, 0.0)
    sources: dict = field(default_factory=dict)  # "pixel_mm" / "sdd" / "sod" / "position" → where from
    lungs_px: tuple[int, int, int, int] | None = None  # (left, right, top, bottom) found in the image

    @property
    def assumed(self) -> bool:
        """True when any value is an estimate or a default rather than read or given."""
        return any(v.startswith(("assumed", "estimated")) for v in self.sources.values())

    def text(self) -> str:
        head = ("geometry: " + ("ASSUMED — " if self.assumed else "") + f"{self.method}; pixel {self.pixel_mm:.3f} mm, "
                f"SDD {self.sdd:.0f} mm, SOD {self.sod:.0f} mm, shift ({self.shift_px[0]:+.1f}, {self.shift_px[1]:+.1f}) px")
        lines = [head] + [f"  {k}: {v}" for k, v in self.sources.items()]
        if self.assumed:
            lines.append("  give the real values with --pixel-spacing MM --sdd MM --sod MM, or --geometry FILE.json")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["assumed"] = self.assumed
        return d


@dataclass
class XRay:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    geometry: ProjectionGeometry
    source: str = "array"
    placement: Placement | None = None  # how the geometry was obtained (None: given with the array)

    @property
    def view_name(self) -> str:
        return self.geometry.name or "?"

    def resized(self, size: int) -> "XRay":
        """Area-resampled to ``size``² (the network's input), geometry resized to match."""
        H, W = self.image.shape
        if (W, H) == (size, size):
            return self
        ry, rx = area_matrix(H, size), area_matrix(W, size)
        img = (ry @ self.image.astype(np.float64) @ rx.T).astype(np.float32)
        return replace(self, image=img, geometry=self.geometry.resized(size, size))

    def network_input(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (1, size, size) float32, grid matrix (3, 4) float32)`` for X2B."""
        x = self.resized(size)
        return x.image[None].astype(np.float32), x.geometry.box_to_grid_matrix().astype(np.float32)


def _stem(path: Path) -> Path:
    name = path.name
    for suf in (".nii.gz",) + PNG_SUFFIXES + VOLUME_SUFFIXES + DICOM_SUFFIXES[:2]:
        if suf and name.lower().endswith(suf):
            return path.with_name(name[: -len(suf)])
    return path


def write_geometry(geometry: ProjectionGeometry, path: str | Path) -> Path:
    """``geometry`` as JSON in ``path`` (atomically), as ``read_xray --geometry`` and ``sidecar_geometry`` read it."""
    atomic_write_text(path, geometry.to_json())
    return Path(path)


def sidecar_geometry(path: str | Path) -> Path | None:
    """``<stem>.json`` beside an image (as ``write_drr`` writes it), if present."""
    p = _stem(Path(path)).with_suffix(".json") if not str(path).endswith(".json") else None
    return p if p is not None and p.is_file() else None


def model_geometry(config: dict) -> dict | None:
    """``sdd``, ``sod`` and ``box_size`` of the dataset build a checkpoint's config records (None if absent)."""
    build = (config.get("dataset") or {}).get("build") or {}
    out = {k: float(build[k]) for k in ("sdd", "sod", "box_size") if isinstance(build.get(k), (int, float))}
    return out if len(out) == 3 else None


def default_geometry(view: str | float, width: int, height: int, *, pixel_mm: float | None = None,
                     sdd: float | None = None, sod: float | None = None) -> ProjectionGeometry:
    """The chest default geometry of ``view`` for a ``width``×``height`` image, isocentre at the origin."""
    if pixel_mm is None:
        if width != height:
            raise ValueError(f"a {width}×{height} image without pixel spacing or a geometry file: the default "
                             "detector is square; give --geometry")
        detector = CHEST_DEFAULTS["detector_mm"]
    else:
        detector = pixel_mm * width
    g = ProjectionGeometry.from_view(view, (0.0, 0.0, 0.0), sdd=sdd or CHEST_DEFAULTS["sdd"],
                                     sod=sod or CHEST_DEFAULTS["sod"], size=(width, height),
                                     detector_mm=detector, kind=CHEST_DEFAULTS["kind"])
    return g


def _walk(p: np.ndarray, start: int, step: int, level: float) -> int:
    i = start
    while 0 <= i + step < len(p) and p[i] < level:
        i += step
    return i


def lung_fields(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` pixel extent of the lung fields of a frontal chest image (bone
    bright), from intensity profiles: the two dark valleys either side of the bright mediastinum in the
    upper-middle rows, each followed outwards to half the rise to the chest wall, and the same
    vertically over the lung columns.  None when the image does not show two lung fields."""
    from scipy import ndimage

    H, W = img.shape
    g = ndimage.gaussian_filter(np.asarray(img, np.float64), 0.01 * min(H, W))
    band = g[int(0.2 * H): int(0.6 * H)].mean(0)
    inside = np.flatnonzero(band > 0.25 * band.max())  # not the air beside a DRR's body
    if inside.size < 3:
        return None
    a0, a1 = int(inside.min()), int(inside.max())
    lo, hi = max(int(0.35 * W), a0 + 1), min(int(0.65 * W), a1 - 1)
    if hi <= lo:
        return None
    peak = lo + int(np.argmax(band[lo:hi]))
    lv = a0 + int(np.argmin(band[a0:peak]))
    rv = peak + int(np.argmin(band[peak:a1 + 1]))
    depth = band[peak] - max(band[lv], band[rv])
    if depth < 0.05 * (band.max() - band.min() + 1e-9):  # no mediastinum between two dark fields
        return None
    left = _walk(band, lv, -1, band[lv] + 0.5 * (band[:lv + 1].max() - band[lv]))
    right = _walk(band, rv, 1, band[rv] + 0.5 * (band[rv:].max() - band[rv]))
    half = max(int(0.05 * W), 1)
    cols = np.r_[max(lv - half, 0): lv + half, rv - half: min(rv + half, W)]
    prof = g[:, cols].mean(1)
    vrow = int(0.1 * H) + int(np.argmin(prof[int(0.1 * H): int(0.8 * H)]))
    top = _walk(prof, vrow, -1, prof[vrow] + 0.5 * (prof[:vrow + 1].max() - prof[vrow]))
    bottom = _walk(prof, vrow, 1, prof[vrow] + 0.5 * (prof[vrow:].max() - prof[vrow]))
    if right - left < 0.25 * W or bottom - top < 0.15 * H:
        return None
    return int(left), int(right), int(top), int(bottom)


def place_xray(image: np.ndarray, view: str | float, *, pixel_mm: float | None = None, sdd: float | None = None,
               sod: float | None = None, sources: dict | None = None,
               model_geometry: dict | None = None) -> tuple[ProjectionGeometry, Placement]:
    """The geometry of an X-ray that came without one, and what was assumed (see module doc).

    ``pixel_mm``/``sdd``/``sod`` are known values (DICOM, CLI flags; ``sources`` says where each came
    from); the others are estimated (pixel spacing from the lung width) or defaulted (distances).
    A frontal view is shifted so its lung centre lands on the training patient's; a lateral view is
    centred.  ``model_geometry`` (``sdd``, ``sod``, ``box_size`` of the model's training build) replaces
    the chest defaults for what is not known.
    """
    H, W = image.shape
    src = dict(sources or {})
    ref = {**CHEST_DEFAULTS, **(model_geometry or {})}
    whose = "the model's training geometry" if model_geometry else "chest default"
    if sdd is None:
        sdd, src["sdd"] = ref["sdd"], f"assumed: {ref['sdd']:.0f} mm ({whose})"
    if sod is None:
        sod, src["sod"] = ref["sod"], f"assumed: {ref['sod']:.0f} mm ({whose})"
    g0 = ProjectionGeometry.from_view(view, (0.0, 0.0, 0.0), sdd=sdd, sod=sod, size=(W, H), detector_mm=W)
    frontal = abs(g0.normal[1]) > 0.7  # beam along the anterior–posterior axis
    lungs = lung_fields(image) if frontal else None
    if pixel_mm is None:
        if lungs is not None:
            pixel_mm = TRAINING_LUNGS["width_mm"] * (sdd / sod) / (lungs[1] - lungs[0])
            src["pixel_mm"] = (f"estimated: lung fields {lungs[1] - lungs[0]} px wide scaled to the training "
                               f"patient's {TRAINING_LUNGS['width_mm']:.0f} mm")
        elif W == H:
            pixel_mm = CHEST_DEFAULTS["detector_mm"] / W
            src["pixel_mm"] = (f"assumed: {CHEST_DEFAULTS['detector_mm']:.0f} mm detector (chest default); "
                               + ("no lung fields found" if frontal else "lateral view"))
        else:
            raise ValueError(f"a {W}×{H} image without pixel spacing or a geometry file, and no lung fields to "
                             "scale it by (the default detector is square): give --pixel-spacing or --geometry")
    g = ProjectionGeometry.from_view(view, (0.0, 0.0, 0.0), sdd=sdd, sod=sod, size=(W, H), spacing=(pixel_mm, pixel_mm),
                                     kind=CHEST_DEFAULTS["kind"], box_size=float(ref["box_size"]))
    shift = (0.0, 0.0)
    if lungs is not None:
        dx, dz = TRAINING_LUNGS["centre_mm"]
        target = np.asarray(g.project(np.array([dx, 0.0, dz])), float).reshape(2)
        here = np.array([(lungs[0] + lungs[1]) / 2, (lungs[2] + lungs[3]) / 2])
        shift = tuple(float(x) for x in here - target)
        g = g.pixel_shifted(*shift)
        src["position"] = "estimated: lung-field centre put on the training patient's"
    else:
        src.setdefault("position", "assumed: patient centred on the detector")
    method = "lung fields" if lungs is not None else "centred"
    return g, Placement(method, float(pixel_mm), float(sdd), float(sod), shift, src, lungs)


def display_map(raw: np.ndarray, *, clahe: bool = True, clahe_clip: float = 0.01) -> np.ndarray:
    """Raw detector values (bone bright) → [0, 1] display as DRRs are made: linear between the 0.5th
    and 99.5th percentiles, then CLAHE."""
    a = np.asarray(raw, np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        raise ValueError("the image has no finite pixels")
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        raise ValueError("the image is constant")
    img = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0, 1)
    if clahe:
        from skimage.exposure import equalize_adapthist

        img = equalize_adapthist(img, clip_limit=clahe_clip)
    return img.astype(np.float32)


def xray_from_array(image: np.ndarray, geometry: ProjectionGeometry, source: str = "array") -> XRay:
    """An ``XRay`` from a display image: uint8 (/255), uint16 (/65535) or float in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.ndim != 2:
        raise X2ReconInputError(source, f"an X-ray must be one 2D greyscale image, got shape {a.shape}")
    H, W = a.shape
    if min(H, W) < MIN_SIZE:
        raise X2ReconInputError(source, f"image is {W}×{H} pixels; at least {MIN_SIZE}×{MIN_SIZE} are needed")
    if tuple(geometry.size) != (W, H):
        raise X2ReconInputError(source, f"image is {W}×{H} but its geometry is for {geometry.size[0]}×{geometry.size[1]}")
    if a.dtype == np.uint8:
        img = a / 255.0
    elif a.dtype == np.uint16:
        img = a / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6:
            raise X2ReconInputError(source, "float display images must lie in [0, 1]")
        img = np.clip(a, 0, 1)
    else:
        raise X2ReconInputError(source, f"unsupported pixel type {a.dtype}")
    if float(img.max()) - float(img.min()) < 1e-6:
        raise X2ReconInputError(source, "the image is blank (constant)")
    return XRay(img.astype(np.float32), geometry, str(source))


def _dicom_tag(img, key: str) -> str | None:
    return img.GetMetaData(key).strip() if img.HasMetaDataKey(key) else None


def _dicom_float(img, key: str) -> float | None:
    t = _dicom_tag(img, key)
    try:
        return float(t.split("\\")[0]) if t else None
    except ValueError:
        return None


def _as_unit(a: np.ndarray) -> np.ndarray:
    """A display image as floats in [0, 1] (8/16-bit scaled)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a / 255.0
    if a.dtype == np.uint16:
        return a / 65535.0
    return a.astype(np.float64)


@lru_cache(maxsize=1)
def reader_inverts_monochrome1() -> bool:
    """Whether SimpleITK's DICOM reader already turns MONOCHROME1 into bone-bright values (ITK's GDCM
    reader does from some version on): probed once on a tiny file, so we never invert twice."""
    import tempfile

    import SimpleITK as sitk

    from .volume import locale_kept

    a = np.array([[[0, 1000]]], np.uint16)
    with tempfile.TemporaryDirectory() as d, locale_kept():  # GDCM's writer may leave the C locale behind
        path = Path(d) / "probe.dcm"
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(native_path(path))
        w.Execute(sitk.GetImageFromArray(a))
        path.write_bytes(path.read_bytes().replace(b"MONOCHROME2", b"MONOCHROME1"))
        back = sitk.GetArrayFromImage(sitk.ReadImage(native_path(path))).ravel()
    return bool(back[0] > back[1])


def _read_dicom(path: Path, img, a: np.ndarray) -> tuple[np.ndarray, dict, dict]:
    """Apply a DICOM radiograph's VOI window and photometric interpretation; read its geometry tags.
    Returns ``(raw bone-bright array, known values, where each came from)``."""
    known, src = {}, {}
    for key, tag, what in (("pixel_mm", "0018|1164", "ImagerPixelSpacing"), ("pixel_mm", "0028|0030", "PixelSpacing"),
                           ("sdd", "0018|1110", "DistanceSourceToDetector"), ("sod", "0018|1111", "DistanceSourceToPatient")):
        v = _dicom_float(img, tag)
        if key not in known and v is not None and v > 0:
            known[key], src[key] = v, f"DICOM {what}"
    mono1 = _dicom_tag(img, "0028|0004") == "MONOCHROME1"
    flipped = mono1 and reader_inverts_monochrome1()  # then v' = type max − v, the window with it
    top = float(np.iinfo(a.dtype).max) if np.issubdtype(a.dtype, np.integer) else 0.0
    a = a.astype(np.float64)
    centre, width = _dicom_float(img, "0028|1050"), _dicom_float(img, "0028|1051")
    if centre is not None and width is not None and width > 1:
        c = top - centre if flipped else centre
        a = np.clip(a, c - width / 2, c + width / 2)
        src["window"] = f"DICOM VOI window centre {centre:g}, width {width:g}"
    if mono1:
        if not flipped:  # bone dark as stored: invert
            a = a.max() - a
        src["photometric"] = "MONOCHROME1 inverted" + (" (by the reader)" if flipped else "")
    return a, known, src


def read_xray(path: str | Path, *, view: str | float = "AP", geometry: ProjectionGeometry | str | Path | None = None,
              clahe_clip: float = 0.01, pixel_spacing: float | None = None, sdd: float | None = None,
              sod: float | None = None, model_geometry: dict | None = None) -> XRay:
    """Read an X-ray file (see module doc).  The geometry is, first found first: ``geometry`` (object or
    JSON path), else the ``<stem>.json`` sidecar unless ``pixel_spacing``/``sdd``/``sod`` are given, else
    placed by :func:`place_xray` from those values, the file's (DICOM) values and the image
    (``model_geometry``: the model's training ``sdd``/``sod``/``box_size`` for what is unknown)."""
    path = Path(path)
    if not path.exists():
        raise X2ReconInputError(path, "X-ray file not found")
    if path.is_dir():
        raise X2ReconInputError(path, "is a folder; give one X-ray image file")
    if isinstance(geometry, (str, Path)):
        geometry = ProjectionGeometry.from_json(Path(geometry))
    given = geometry is not None
    name = path.name.lower()
    known, src = {}, {}
    if name.endswith(PNG_SUFFIXES):
        display = read_png(path)  # already a display image (our DRRs, exported radiographs)
    elif name.endswith(JPEG_SUFFIXES):
        display = read_grey_2d(path, "X-ray")[1]
    else:
        with open(path, "rb") as f:
            head = f.read(132)
        is_dicom = len(head) >= 132 and head[128:132] == b"DICM"
        if not (is_dicom or name.endswith(VOLUME_SUFFIXES)):
            raise X2ReconInputError(path, "unsupported X-ray format: give a PNG, JPEG, DICOM file, or a 2D NIfTI/NRRD/MHA image")
        img, a = read_grey_2d(path, "X-ray")
        if is_dicom:
            a, known, src = _read_dicom(path, img, a)
        elif not np.allclose(img.GetSpacing()[:2], 1.0):
            known["pixel_mm"], src["pixel_mm"] = float(img.GetSpacing()[0]), "the image header's spacing"
        try:
            display = display_map(a, clahe_clip=clahe_clip)
        except ValueError as e:
            raise X2ReconInputError(path, str(e)) from None
    for key, value, flag in (("pixel_mm", pixel_spacing, "--pixel-spacing"), ("sdd", sdd, "--sdd"), ("sod", sod, "--sod")):
        if value is not None:
            known[key], src[key] = float(value), f"given ({flag})"
    placement = None
    if geometry is None and not any(v is not None for v in (pixel_spacing, sdd, sod)):
        side = sidecar_geometry(path)
        geometry = ProjectionGeometry.from_json(side) if side is not None else None
    if geometry is not None:
        g = geometry
        placement = Placement("geometry file", float(g.spacing[0]), g.sdd, float(np.linalg.norm(g.source - g.isocenter)),
                              sources={"geometry": "given (--geometry)" if given else "sidecar <stem>.json"})
    else:
        try:
            geometry, placement = place_xray(_as_unit(display), view, pixel_mm=known.get("pixel_mm"),
                                             sdd=known.get("sdd"), sod=known.get("sod"), sources=src,
                                             model_geometry=model_geometry)
        except ValueError as e:
            raise X2ReconInputError(path, str(e)) from None
    out = xray_from_array(display, geometry, str(path))
    return replace(out, placement=placement)
