"""X-ray inputs for reconstruction: an image in display intensities plus the geometry it was taken with.

Readers for what users bring — our DRR PNGs (with their ``<stem>.json`` geometry), other 8/16-bit
greyscale PNGs, DICOM radiographs, and 2D NIfTI/NRRD/MHA images — each turned into an ``XRay``:
``image`` (H, W) float32 in [0, 1], bone bright, row 0 at the top, and a ``ProjectionGeometry``
whose ``size`` is (W, H).  Files that are not already display images (DICOM, NIfTI, …) are mapped
as the dataset builder maps DRRs (robust linear window, then CLAHE), so the network sees what it
was trained on.  DICOM CR/DX: ImagerPixelSpacing (else PixelSpacing; see :func:`_dicom_spacing` for
ERMF and calibrated spacings), DistanceSourceToDetector/-Patient, MONOCHROME1 inverted, the VOI window
(WindowCenter/WindowWidth) applied unless it leaves the image constant; a VOI LUT *sequence* is not
read (SimpleITK does not expose it): the robust window then stands in.  The view is ``--view``, else the
file's ViewPosition (PatientOrientation says frontal or lateral and turns a mirrored or rotated image
the way the view is displayed), else assumed AP — and said.  A 16-bit PNG whose values use fewer bits
(12-bit data in 0–4095) is scaled by its significant bits or its range, not by 65 535.  A pixel spacing
from a file that would make the lung fields narrower or wider than any patient's is not used.

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
from .image import area_matrix, png_header, read_grey_2d, read_png

MIN_SIZE = 32
PNG_SUFFIXES = (".png",)
JPEG_SUFFIXES = (".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


#: The training patient's lung fields (chest_lidc0001, TotalSegmentator lung lobes) in the patient plane,
#: relative to its imaging isocentre (the centre of the default structures): width (left–right extent) and
#: centre (LPS x, z) in mm.  An X-ray without geometry is scaled and shifted to put its lungs there.
TRAINING_LUNGS = {"width_mm": 251.7, "centre_mm": (-2.8, 17.5)}

#: Lung-field width at the patient (mm, as :func:`lung_fields` measures it, on the scale of ``TRAINING_LUNGS``)
#: that a radiograph's pixel spacing may imply.  Adults: the thoracic width inside the ribs on a PA film (the
#: denominator of the cardiothoracic ratio) is about 24–34 cm — a normal heart, under 15.5 cm, is less than half
#: of it; the training patient's lungs measure 252 mm.  Children: roughly 13–14 cm at one year, 18–20 cm at ten
#: (approximate anthropometry, chest circumference / π).  120–400 mm admits children from about one year to the
#: largest adults, with margin for the finder's error; a newborn's (~10 cm) falls below — no model here is
#: trained on infants.  Outside it, a file's spacing is nearly always the full-resolution detector pitch kept
#: in a downsampled image (2–4× too small; NIH/PadChest-style exports) or a unit error (10×, 1000×).
LUNG_WIDTH_RANGE_MM = (120.0, 400.0)
#: Side of a radiograph's imaged field at the detector (mm): dental sensors ~20–40 mm, chest panels 430 mm,
#: stitched spine/leg images ~1.3 m.  A pixel spacing putting either side outside this is no radiograph's.
DETECTOR_RANGE_MM = (10.0, 2000.0)
#: DICOM ViewPosition (0018,5101) → the view x2recon places; other values (obliques, decubitus) need --view.
VIEW_POSITIONS = {"AP": "AP", "PA": "PA", "LL": "LAT", "LAT": "LAT", "LATERAL": "LAT", "RL": "-90"}
#: DICOM storage classes that hold no image (SOP class UID prefixes), named when such a file is given.
NON_IMAGE_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.": "structured report (SR)",
                         "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
                         "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document (PDF/CDA)",
                         "1.2.840.10008.5.1.4.1.1.9.": "waveform",
                         "1.2.840.10008.5.1.4.1.1.66": "raw data or registration object"}


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
    view: str = ""  # the view placed (AP, PA, LAT, degrees); sources["view"] says why
    warnings: list = field(default_factory=list)  # values of the file not used, and why

    @property
    def assumed(self) -> bool:
        """True when any value is an estimate or a default rather than read or given."""
        return any(v.startswith(("assumed", "estimated")) for v in self.sources.values())

    def text(self) -> str:
        head = ("geometry: " + ("ASSUMED — " if self.assumed else "") + f"{self.method}; "
                + (f"view {self.view}, " if self.view else "") + f"pixel {self.pixel_mm:.3f} mm, "
                f"SDD {self.sdd:.0f} mm, SOD {self.sod:.0f} mm, shift ({self.shift_px[0]:+.1f}, {self.shift_px[1]:+.1f}) px")
        lines = [head] + [f"  {k}: {v}" for k, v in self.sources.items()]
        lines += [f"  WARNING: {w}" for w in self.warnings]
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


def lung_width_mm(lungs: tuple[int, int, int, int], pixel_mm: float, sdd: float, sod: float) -> float:
    """Width of the lung fields ``lungs`` (pixels, :func:`lung_fields`) at the patient, in mm: the detector
    width demagnified by SOD/SDD."""
    return (lungs[1] - lungs[0]) * pixel_mm * sod / sdd


def _field_problem(su: float, sv: float, width: int, height: int) -> str | None:
    """Why pixels of ``su``×``sv`` mm cannot be a ``width``×``height`` radiograph's (``DETECTOR_RANGE_MM``)."""
    lo, hi = DETECTOR_RANGE_MM
    fw, fh = su * width, sv * height
    if np.isfinite(fw) and np.isfinite(fh) and lo <= min(fw, fh) and max(fw, fh) <= hi:
        return None
    return f"makes the {width}×{height} image {fw:.3g}×{fh:.3g} mm; a radiograph's detector is {lo:g}–{hi:g} mm across"


def spacing_problem(pixel_mm: float, width: int, height: int, lungs, sdd: float, sod: float) -> tuple[str, str] | None:
    """Why ``pixel_mm`` cannot be the detector pixel spacing of a ``width``×``height`` radiograph:
    ``("field", why)`` when the imaged field is no radiograph's (``DETECTOR_RANGE_MM``), ``("anatomy", why)``
    when the lung fields found (``lungs``) would be narrower or wider than any patient's
    (``LUNG_WIDTH_RANGE_MM``); None when it is plausible."""
    field = _field_problem(pixel_mm, pixel_mm, width, height)
    if field is not None:
        return "field", field
    if lungs is not None:
        a, b = LUNG_WIDTH_RANGE_MM
        w = lung_width_mm(lungs, pixel_mm, sdd, sod)
        if not a <= w <= b:
            return "anatomy", (f"makes the lung fields ({lungs[1] - lungs[0]} px) {w:.0f} mm wide at the patient; "
                               f"a patient's are {a:.0f}–{b:.0f} mm (children from about one year to large adults)")
    return None


def _checked_spacing(pixel_mm, W, H, lungs, sdd, sod, frontal, pixel_given, src, warnings):
    """``(pixel_mm, refused)``: a known spacing checked against the detector and the lung fields
    (:func:`spacing_problem`); one from a file that fails is dropped (``pixel_mm`` None, ``refused`` says
    why), one given (``--pixel-spacing``) is refused when no detector is that size, else kept with a
    warning.  ``src``/``warnings`` are updated."""
    refused = ""
    if pixel_mm is not None:
        problem = spacing_problem(pixel_mm, W, H, lungs, sdd, sod)
        if problem is None:
            src["spacing check"] = (f"lung fields {lung_width_mm(lungs, pixel_mm, sdd, sod):.0f} mm wide at the patient, "
                                    f"within {LUNG_WIDTH_RANGE_MM[0]:.0f}–{LUNG_WIDTH_RANGE_MM[1]:.0f} mm" if lungs is not None
                                    else "not checked against anatomy (" + ("no lung fields found)" if frontal else "not a frontal view)"))
        elif pixel_given:
            if problem[0] == "field":
                raise ValueError(f"--pixel-spacing {pixel_mm:g} mm {problem[1]}: give the detector's pixel spacing in mm")
            warnings.append(f"--pixel-spacing {pixel_mm:g} mm {problem[1]}; used because it was given")
        else:
            what = src.pop("pixel_mm", "the pixel spacing")
            refused = f"{what}{'' if ' mm' in what else f' {pixel_mm:g} mm'} {problem[1]}"
            warnings.append(refused + ": not used")
            pixel_mm = None
    return pixel_mm, refused


def place_xray(image: np.ndarray, view: str | float, *, pixel_mm: float | None = None, sdd: float | None = None,
               sod: float | None = None, sources: dict | None = None, model_geometry: dict | None = None,
               pixel_given: bool = False, pixel_at_patient: bool = False,
               magnification: float | None = None) -> tuple[ProjectionGeometry, Placement]:
    """The geometry of an X-ray that came without one, and what was assumed (see module doc).

    ``pixel_mm``/``sdd``/``sod`` are known values (DICOM, CLI flags; ``sources`` says where each came
    from); the others are estimated (pixel spacing from the lung width) or defaulted (distances).
    A frontal view is shifted so its lung centre lands on the training patient's; a lateral view is
    centred.  ``model_geometry`` (``sdd``, ``sod``, ``box_size`` of the model's training build) replaces
    the chest defaults for what is not known.  ``magnification`` (DICOM ERMF, SDD/SOD at the patient)
    gives the SOD when it is not known; ``pixel_at_patient``: ``pixel_mm`` is calibrated to the patient
    plane and is scaled by SDD/SOD to the detector's.

    A known spacing is checked (:func:`spacing_problem`): one from a file (DICOM, image header) that no
    radiograph or patient could have is not used — a warning says why — and the lung-field estimate takes
    its place; one given (``pixel_given``: ``--pixel-spacing``) is refused when no detector is that size,
    and kept with a warning when only the anatomy disagrees.
    """
    H, W = image.shape
    src = dict(sources or {})
    warnings: list[str] = []
    ref = {**CHEST_DEFAULTS, **(model_geometry or {})}
    whose = "the model's training geometry" if model_geometry else "chest default"
    if sdd is None:
        sdd, src["sdd"] = ref["sdd"], f"assumed: {ref['sdd']:.0f} mm ({whose})"
    if sod is None and magnification is not None:
        sod = sdd / magnification
        src["sod"] = f"DICOM EstimatedRadiographicMagnificationFactor {magnification:g}: SDD / {magnification:g}"
    if sod is None:
        sod, src["sod"] = ref["sod"], f"assumed: {ref['sod']:.0f} mm ({whose})"
    if pixel_mm is not None and pixel_at_patient:
        pixel_mm = pixel_mm * sdd / sod
        src["pixel_mm"] = src.get("pixel_mm", "pixel spacing") + f" × SDD/SOD {sdd / sod:.3f} = {pixel_mm:.4g} mm at the detector"
    g0 = ProjectionGeometry.from_view(view, (0.0, 0.0, 0.0), sdd=sdd, sod=sod, size=(W, H), detector_mm=W)
    frontal = abs(g0.normal[1]) > 0.7  # beam along the anterior–posterior axis
    lungs = lung_fields(image) if frontal else None
    pixel_mm, refused = _checked_spacing(pixel_mm, W, H, lungs, sdd, sod, frontal, pixel_given, src, warnings)
    if pixel_mm is None:
        instead = " (instead of the file's spacing: see the warning)" if refused else ""
        if lungs is not None:
            pixel_mm = TRAINING_LUNGS["width_mm"] * (sdd / sod) / (lungs[1] - lungs[0])
            src["pixel_mm"] = (f"estimated: lung fields {lungs[1] - lungs[0]} px wide scaled to the training "
                               f"patient's {TRAINING_LUNGS['width_mm']:.0f} mm" + instead)
        elif W == H:
            pixel_mm = CHEST_DEFAULTS["detector_mm"] / W
            src["pixel_mm"] = (f"assumed: {CHEST_DEFAULTS['detector_mm']:.0f} mm detector (chest default); "
                               + ("no lung fields found" if frontal else "lateral view") + instead)
        else:
            raise ValueError(f"a {W}×{H} image without " + ("a usable pixel spacing (" + refused + ")" if refused else
                             "pixel spacing") + " or a geometry file, and no lung fields to scale it by (the default "
                             "detector is square): give --pixel-spacing or --geometry")
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
    return g, Placement(method, float(pixel_mm), float(sdd), float(sod), shift, src, lungs, view=g.name,
                        warnings=warnings)


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


def _flat(a: np.ndarray) -> bool:
    """Whether ``a`` is constant as :func:`display_map` sees it (its 0.5th and 99.5th percentiles equal)."""
    f = a[np.isfinite(a)]
    return f.size == 0 or bool(np.subtract(*np.percentile(f, [99.5, 0.5])) <= 0)


def _dicom_spacing(img) -> tuple[dict, dict, list[str]]:
    """The detector pixel spacing a DICOM radiograph states: ``(known values, where each came from, warnings)``.

    DICOM PS3.3 §10.7.1 (Pixel Spacing Calibration): ImagerPixelSpacing (0018,1164) is at the detector and
    is what a projection geometry needs; PixelSpacing (0028,0030) beside it is a calibration to the patient
    and is not used.  PixelSpacing alone is at the patient when PixelSpacingCalibrationType (0028,0A02)
    says so (GEOMETRY, FIDUCIAL) or an EstimatedRadiographicMagnificationFactor (0018,1114, ERMF =
    SDD/SOD at the patient) accompanies it — then scaled back by the magnification; otherwise its plane is
    unknown and it is taken as the detector's (CR files without ImagerPixelSpacing store the plate's pitch
    there).  The ERMF gives the SOD when DistanceSourceToPatient is absent."""
    known, src, warnings = {}, {}, []
    ips, ps, ermf = (_dicom_float(img, t) for t in ("0018|1164", "0028|0030", "0018|1114"))
    ips, ps = (v if v is not None and v > 0 else None for v in (ips, ps))
    cal = (_dicom_tag(img, "0028|0a02") or _dicom_tag(img, "0028|0A02") or "").upper()
    if ips is not None:
        known["pixel_mm"], src["pixel_mm"] = ips, f"DICOM ImagerPixelSpacing {ips:g} mm (at the detector)"
        if ps is not None and not np.isclose(ps, ips, rtol=1e-3):
            src["pixel_mm"] += f"; its PixelSpacing {ps:g} mm is calibrated to the patient: not used"
    elif ps is not None:
        known["pixel_mm"] = ps
        if cal in ("GEOMETRY", "FIDUCIAL") or ermf is not None:
            known["pixel_at_patient"] = True
            src["pixel_mm"] = (f"DICOM PixelSpacing {ps:g} mm at the patient ("
                               + (f"PixelSpacingCalibrationType {cal})" if cal else "it comes with an ERMF)"))
        else:
            src["pixel_mm"] = f"DICOM PixelSpacing {ps:g} mm (no ImagerPixelSpacing: taken as the detector's)"
    if ermf is not None:
        if 1.0 < ermf <= 3.0:
            known["magnification"] = ermf
        else:
            warnings.append(f"DICOM EstimatedRadiographicMagnificationFactor {ermf:g} is no magnification "
                            "(SDD/SOD lies in 1–3): not used")
    return known, src, warnings


def _dicom_sop_class(path: Path) -> str | None:
    """The MediaStorageSOPClassUID (0002,0002) of a DICOM file's meta header (explicit VR little endian by
    the standard), or None when it cannot be read."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8192)
    pos = 132
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 2:
            return None
        vr = head[pos + 4: pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, pos = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, pos = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if elem == 2:
            return head[pos: pos + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += length
    return None


def _refuse_non_image_dicom(path: Path) -> None:
    """A clear error for a DICOM object that holds no image (a structured report, a presentation state…):
    ITK would only say it has no reader for it."""
    uid = _dicom_sop_class(path)
    for prefix, what in NON_IMAGE_SOP_CLASSES.items():
        if uid and uid.startswith(prefix):
            raise X2ReconInputError(path, f"is a DICOM {what} (SOP class {uid}), not an image: give the radiograph "
                                          "itself (a CR/DX DICOM file with pixel data)")


def _read_dicom(path: Path, img, a: np.ndarray) -> tuple[np.ndarray, dict, dict, list[str]]:
    """Apply a DICOM radiograph's VOI window and photometric interpretation; read its geometry tags.
    Returns ``(raw bone-bright array, known values, where each came from, warnings)``.  A VOI window that
    would leave every pixel at one value (a CT window on CR data, a window outside the stored range) is
    not applied: the data's own range is used, and said."""
    known, src, warnings = _dicom_spacing(img)
    for key, tag, what in (("sdd", "0018|1110", "DistanceSourceToDetector"), ("sod", "0018|1111", "DistanceSourceToPatient")):
        v = _dicom_float(img, tag)
        if v is not None and v > 0:
            known[key], src[key] = v, f"DICOM {what}"
    mono1 = _dicom_tag(img, "0028|0004") == "MONOCHROME1"
    flipped = mono1 and reader_inverts_monochrome1()  # then v' = type max − v, the window with it
    top = float(np.iinfo(a.dtype).max) if np.issubdtype(a.dtype, np.integer) else 0.0
    a = a.astype(np.float64)
    centre, width = _dicom_float(img, "0028|1050"), _dicom_float(img, "0028|1051")
    if centre is not None and width is not None and width > 1:
        c = top - centre if flipped else centre
        windowed = np.clip(a, c - width / 2, c + width / 2)
        if _flat(windowed) and not _flat(a):
            lo, hi = np.percentile(a[np.isfinite(a)], [0.5, 99.5])
            src["window"] = (f"DICOM VOI window centre {centre:g}, width {width:g} NOT applied: it leaves every pixel "
                             f"at one value (the data lie in {lo:g}–{hi:g}); the data's range used instead")
            warnings.append(f"the file's VOI window (centre {centre:g}, width {width:g}) would make the image constant "
                            f"(its values lie in {lo:g}–{hi:g}): windowed by the data's range instead")
        else:
            a = windowed
            src["window"] = f"DICOM VOI window centre {centre:g}, width {width:g}"
    if mono1:
        if not flipped:  # bone dark as stored: invert
            a = a.max() - a
        src["photometric"] = "MONOCHROME1 inverted" + (" (by the reader)" if flipped else "")
    return a, known, src, warnings


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
_AXIS = {"L": 0, "R": 0, "A": 1, "P": 1, "H": 2, "F": 2}


def _letter(vec: np.ndarray) -> str:
    """The patient direction (DICOM letter, LPS) a detector axis mostly points to."""
    i = int(np.argmax(np.abs(vec)))
    return ("L", "P", "H")[i] if vec[i] > 0 else ("R", "A", "F")[i]


def _orientation_letters(text: str | None) -> tuple[str, str] | None:
    """DICOM PatientOrientation (0020,0020) ``"L\\F"`` → ``("L", "F")``: the main patient direction of
    increasing column and of increasing row; None when absent or not understood."""
    parts = [p.strip().upper() for p in (text or "").split("\\")]
    if len(parts) != 2 or not all(p and p[0] in _AXIS for p in parts) or _AXIS[parts[0][0]] == _AXIS[parts[1][0]]:
        return None
    return parts[0][0], parts[1][0]


def _resolve_view(view, position: str | None, orientation: str | None, path: Path) -> tuple[str | float, str, list[str]]:
    """The view to place an X-ray in, why, and warnings: ``--view`` when given, else the file's DICOM
    ViewPosition, else a lateral when its PatientOrientation shows one, else AP — assumed and said."""
    warnings = []
    pos = (position or "").strip().upper()
    mapped = VIEW_POSITIONS.get(pos)
    if view is not None:
        if pos and (mapped is None or ProjectionGeometry.from_view(mapped).name != ProjectionGeometry.from_view(view).name):
            warnings.append(f"--view {view} given, but the file's DICOM ViewPosition is {pos}")
        return view, "given (--view)", warnings
    if pos:
        if mapped is None:
            raise X2ReconInputError(path, f"DICOM ViewPosition {pos} (an oblique or decubitus view?) is not a view x2recon "
                                          "can place: give --view (AP, PA, LAT or an angle in degrees)")
        return mapped, f"DICOM ViewPosition {pos}", warnings
    letters = _orientation_letters(orientation)
    if letters is not None and any(_AXIS[c] == 1 for c in letters):
        return "LAT", (f"assumed: LAT — DICOM PatientOrientation {orientation} shows a lateral image (no ViewPosition; "
                       "left lateral assumed)"), warnings
    return "AP", "assumed: AP (no --view, and the file names no view; give --view PA for a PA film)", warnings


def _orient(a: np.ndarray, orientation: str | None, g: ProjectionGeometry) -> tuple[np.ndarray, str | None, str | None]:
    """``a`` turned so that its DICOM PatientOrientation matches how the view ``g`` is displayed (columns
    towards ``g.u``'s patient direction, rows towards ``g.v``'s — e.g. L\\F for AP and PA), as the network's
    training images are; ``(array, what was done, warning)``."""
    if orientation is None:
        return a, None, None
    letters = _orientation_letters(orientation)
    eu, ev = _letter(g.u), _letter(g.v)
    if letters is None:
        return a, None, f"DICOM PatientOrientation {orientation!r} not understood: not used"
    fu, fv = letters
    if {_AXIS[fu], _AXIS[fv]} != {_AXIS[eu], _AXIS[ev]}:
        return a, None, (f"DICOM PatientOrientation {orientation} is not a {g.name} view's ({eu}\\{ev}): not used — "
                         "is the view right?")
    done = []
    if _AXIS[fu] != _AXIS[eu]:
        a, (fu, fv) = a.T, (fv, fu)
        done.append("transposed")
    if fu != eu:
        a = a[:, ::-1]
        done.append("mirrored left–right")
    if fv != ev:
        a = a[::-1]
        done.append("flipped top–bottom")
    text = (f"DICOM PatientOrientation {orientation}: " + (", ".join(done) + f" to the {g.name} view's {eu}\\{ev}"
                                                           if done else f"as a {g.name} view is displayed"))
    return np.ascontiguousarray(a), text, None


def _png_display(path: Path) -> tuple[np.ndarray, dict]:
    """A PNG as a display image (uint8/uint16 as stored, or floats in [0, 1]) and what was done to it.
    A 16-bit PNG whose top bit is never set is no full-range display image but 10–15-bit data (12-bit
    radiographs, 0–4095, as PadChest and many archives ship them): divided by 65 535 it would lie in
    [0, 0.06].  It is scaled by its significant bits when an sBIT chunk gives them and the values fit,
    else windowed to the data's own range."""
    info = png_header(path)
    a = read_png(path)
    notes = {}
    if info["colour_type"] == 4:
        notes["pixels"] = ("grey + alpha PNG: the alpha channel dropped (opaque everywhere)"
                           + ("; 16-bit grey read at 8 bits" if info["bit_depth"] == 16 else ""))
    if a.dtype == np.uint16 and int(a.max()) < 1 << 15:
        lo, hi, n = int(a.min()), int(a.max()), info["significant_bits"]
        if n and n < 16 and hi < 1 << n:
            a = (a / float((1 << n) - 1)).astype(np.float32)
            notes["pixels"] = (f"16-bit PNG with {n} significant bits (sBIT), values {lo}–{hi}: "
                               f"scaled by 1/{(1 << n) - 1}, not 1/65535")
        elif hi > lo:
            a = ((a - lo) / float(hi - lo)).astype(np.float32)
            notes["pixels"] = (f"16-bit PNG using only {hi.bit_length()} of its 16 bits (values {lo}–{hi}): "
                               "windowed to that range, not divided by 65535")
    return a, notes


def _read_pixels(path: Path):
    """The file's pixels: ``(display, raw, known, sources, warnings, tags)`` — a display image for PNG/JPEG
    (``raw`` None), else the raw array with what the file (DICOM, image header) says of its spacing,
    distances and view."""
    name = path.name.lower()
    known, src, warnings, tags, a, display = {}, {}, [], {}, None, None
    if name.endswith(PNG_SUFFIXES):
        display, src = _png_display(path)  # already a display image (our DRRs, exported radiographs)
    elif name.endswith(JPEG_SUFFIXES):
        display = read_grey_2d(path, "X-ray")[1]
    else:
        with open(path, "rb") as f:
            head = f.read(132)
        is_dicom = len(head) >= 132 and head[128:132] == b"DICM"
        if not (is_dicom or name.endswith(VOLUME_SUFFIXES)):
            raise X2ReconInputError(path, "unsupported X-ray format: give a PNG, JPEG, DICOM file, or a 2D NIfTI/NRRD/MHA image")
        if is_dicom:
            _refuse_non_image_dicom(path)
        try:
            img, a = read_grey_2d(path, "X-ray")
        except X2ReconInputError:
            if is_dicom and b"\xe0\x7f\x10\x00" not in path.read_bytes():  # no (7FE0,0010) Pixel Data element
                raise X2ReconInputError(path, f"is a DICOM object without pixel data (SOP class "
                                              f"{_dicom_sop_class(path) or 'unknown'}), not an image: give the "
                                              "radiograph itself (a CR/DX DICOM file with pixel data)") from None
            raise
        if is_dicom:
            a, known, src, warnings = _read_dicom(path, img, a)
            tags = {"position": _dicom_tag(img, "0018|5101"), "orientation": _dicom_tag(img, "0020|0020")}
        elif not np.allclose(img.GetSpacing()[:2], 1.0):
            known["pixel_mm"] = float(img.GetSpacing()[0])
            src["pixel_mm"] = f"the image header's spacing {known['pixel_mm']:g} mm"
    return display, a, known, src, warnings, tags


def read_xray(path: str | Path, *, view: str | float | None = None,
              geometry: ProjectionGeometry | str | Path | None = None, clahe_clip: float = 0.01,
              pixel_spacing: float | None = None, sdd: float | None = None, sod: float | None = None,
              model_geometry: dict | None = None, orient: bool = True) -> XRay:
    """Read an X-ray file (see module doc).  The geometry is, first found first: ``geometry`` (object or
    JSON path), else the ``<stem>.json`` sidecar unless ``pixel_spacing``/``sdd``/``sod`` are given, else
    placed by :func:`place_xray` from those values, the file's (DICOM) values and the image
    (``model_geometry``: the model's training ``sdd``/``sod``/``box_size`` for what is unknown).
    ``view``: None (not given) takes the file's DICOM ViewPosition, else AP, and says which.  ``orient``:
    turn a DICOM image whose PatientOrientation is mirrored or rotated the way its view is displayed
    (``x2recon detect`` keeps the file's pixels)."""
    path = Path(path)
    if not path.exists():
        raise X2ReconInputError(path, "X-ray file not found")
    if path.is_dir():
        raise X2ReconInputError(path, "is a folder; give one X-ray image file")
    if view is not None:
        try:  # a bad view is named as such, not blamed on the pixels later
            ProjectionGeometry.from_view(view)
        except ValueError as e:
            raise X2ReconInputError(path, str(e)) from None
    geometry_path = Path(geometry) if isinstance(geometry, (str, Path)) else None
    if geometry_path is not None:
        geometry = ProjectionGeometry.from_json(geometry_path)
    given = geometry is not None
    if geometry is None and not any(v is not None for v in (pixel_spacing, sdd, sod)):
        side = sidecar_geometry(path)
        if side is not None:
            geometry_path, geometry = side, ProjectionGeometry.from_json(side)
    display, a, known, src, warnings, tags = _read_pixels(path)
    if geometry is None:
        view, src["view"], more = _resolve_view(view, tags.get("position"), tags.get("orientation"), path)
        warnings += more
    if a is not None:
        if orient and geometry is None and tags.get("orientation"):  # a geometry file describes the stored pixels
            a, done, warn = _orient(a, tags["orientation"], ProjectionGeometry.from_view(view))
            src.update({"orientation": done} if done else {})
            warnings += [warn] if warn else []
        try:
            display = display_map(a, clahe_clip=clahe_clip)
        except ValueError as e:
            raise X2ReconInputError(path, str(e)) from None
    for key, value, flag in (("pixel_mm", pixel_spacing, "--pixel-spacing"), ("sdd", sdd, "--sdd"), ("sod", sod, "--sod")):
        if value is not None:
            known[key], src[key] = float(value), f"given ({flag})"
    if pixel_spacing is not None:
        known.pop("pixel_at_patient", None)
    placement = None
    if geometry is not None:
        g = geometry
        problem = _field_problem(g.spacing[0], g.spacing[1], g.size[0], g.size[1])
        if problem is not None:  # 1e-300 mm pixels: the geometry's fault, not the image's
            raise X2ReconInputError(geometry_path or path, f"geometry: pixel spacing {g.spacing[0]:g}×{g.spacing[1]:g} "
                                                           f"mm {problem}")
        kept = {k: v for k, v in src.items() if k in ("pixels", "window", "photometric")}
        placement = Placement("geometry file", float(g.spacing[0]), g.sdd, float(np.linalg.norm(g.source - g.isocenter)),
                              sources={"geometry": "given (--geometry)" if given else "sidecar <stem>.json", **kept},
                              view=g.name, warnings=warnings)
    else:
        try:
            geometry, placement = place_xray(_as_unit(display), view, pixel_mm=known.get("pixel_mm"),
                                             sdd=known.get("sdd"), sod=known.get("sod"), sources=src,
                                             model_geometry=model_geometry, pixel_given=pixel_spacing is not None,
                                             pixel_at_patient=bool(known.get("pixel_at_patient")),
                                             magnification=known.get("magnification"))
        except ValueError as e:
            raise X2ReconInputError(path, str(e)) from None
        placement.warnings[:0] = warnings
    out = xray_from_array(display, geometry, str(path))
    return replace(out, placement=placement)
