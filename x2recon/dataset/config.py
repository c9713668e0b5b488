"""BuildConfig: every setting of a dataset build, recorded in each case's meta.json."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

from ..geometry import CHEST_DEFAULTS, ProjectionGeometry, check_box_size
from ..structures import DEFAULT_STRUCTURES, resolve_structures

#: What the X2BR paper states about its dataset, set by ``build-dataset --preset paper``: ribs, vertebrae and
#: costal cartilages without scapulae (§4.1), 512² DRRs with CLAHE (§4.1) and 224² network inputs (§3.1),
#: 100 000 occupancy points sampled uniformly as Occupancy Networks do (§3.3, §4.3), no augmentation (none is
#: mentioned).  Our default differs in ``near_surface_fraction`` (0.5); the README lists why.
PAPER_BUILD = {"structures": list(DEFAULT_STRUCTURES), "drr_size": 512, "x2b_size": 224, "clahe": True,
               "n_points": 100_000, "near_surface_fraction": 0.0, "variants": 0,
               "xray_realism": False}
PRESETS = ("ours", "paper")
#: Largest ``--variant-scale``: a body 1.5× or 0.5× as large along an axis is another body shape, not a patient.
MAX_VARIANT_SCALE = 0.5
#: Variant settings left out of the digest at these values, so datasets built before they existed keep theirs.
_VARIANT_DEFAULTS = {"variant_scale": 0.06, "variant_rotation_deg": 5.0, "variant_shift_mm": [0.0, 0.0, 0.0]}
#: Thresholds ``--threshold-hu`` accepts: values a CT holds for tissue (air −1000 … dense cortical bone 3000 HU);
#: NaN or 1e9 is a typo, not a threshold.
THRESHOLD_HU_RANGE = (-1000.0, 3000.0)


@dataclass
class BuildConfig:
    # segmentation
    structures: list[str] = field(default_factory=lambda: list(DEFAULT_STRUCTURES))
    label_convention: str = "totalseg"  # "totalseg" | "verse"
    segmentation: str = "auto"  # "auto" | "labels" | "totalsegmentator" | "threshold"
    threshold_hu: float = 150.0  # the clearly labelled fallback's bone threshold
    # geometry and DRRs
    views: list[str] = field(default_factory=lambda: ["AP", "PA", "LAT"])
    angles: list[float] = field(default_factory=list)  # extra training views, degrees about S
    drr_size: int = 512
    x2b_size: int = 224
    sdd: float = CHEST_DEFAULTS["sdd"]
    sod: float = CHEST_DEFAULTS["sod"]
    detector_mm: float = CHEST_DEFAULTS["detector_mm"]
    box_size: float = CHEST_DEFAULTS["box_size"]
    beam: str = CHEST_DEFAULTS["kind"]  # "cone" | "parallel"
    isocenter: str = "structures"  # "structures" (centre of the selected bones) | "ct" | "thorax" (lungs)
    clahe: bool = True
    clahe_clip: float = 0.01
    xray_realism: bool = False  # radiograph-like variation per DRR (drr/realism.py); off: clean DRRs (paper)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    # what lies outside the body outline (couch, blankets, tubes): air (-1024 HU) and no labels (False, the
    # default: a radiograph of a standing patient has no couch) or kept as scanned (True; every build before
    # this setting existed kept it, so a record without it reads as kept)
    keep_outside_body: bool = False
    # meshes and occupancy
    # Slicer's closed-surface smoothing factor, 0–1 (mesh/extract.py: windowed sinc after the slice-interpolated
    # surface; 0 = off)
    mesh_smoothing: float = 0.25
    n_points: int = 100_000
    near_surface_fraction: float = 0.5
    near_surface_sigma: float = 0.01  # in box units (× box_size mm)
    # SPIDER targets
    spider_grid: int = 128
    # augmentation
    variants: int = 0
    seed: int = 0
    # each variant's body size (per-axis scale 1 ± variant_scale), rotation (± degrees about each axis) and,
    # because the isocentre is found again on the deformed CT (which cancels a translation), a box jitter: the
    # variant's isocentre moves by up to ± variant_shift_mm (x L–R, y A–P = the AP view's depth, z S–I)
    variant_scale: float = 0.06
    variant_rotation_deg: float = 5.0
    variant_shift_mm: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    # "ours" | "paper": the preset the settings started from (a label; the values above are what count)
    preset: str = "ours"

    def __post_init__(self):
        self.structures = resolve_structures(self.structures)
        if self.label_convention not in ("totalseg", "verse"):
            raise ValueError(f"label_convention must be 'totalseg' or 'verse', got {self.label_convention!r}")
        if self.segmentation not in ("auto", "labels", "totalsegmentator", "threshold"):
            raise ValueError(f"unknown segmentation source {self.segmentation!r}")
        if self.beam not in ("cone", "parallel"):
            raise ValueError(f"beam must be 'cone' or 'parallel', got {self.beam!r}")
        if self.n_points <= 0 or not 0 <= self.near_surface_fraction <= 1:
            raise ValueError("n_points must be > 0 and near_surface_fraction in [0, 1]")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.variants < 0:
            raise ValueError("variants must be >= 0")
        if not (math.isfinite(float(self.mesh_smoothing)) and 0.0 <= float(self.mesh_smoothing) <= 1.0):
            raise ValueError(f"mesh_smoothing (--smoothing) must be a smoothing factor in 0…1, got {self.mesh_smoothing}")
        lo, hi = THRESHOLD_HU_RANGE
        if not (math.isfinite(float(self.threshold_hu)) and lo <= float(self.threshold_hu) <= hi):
            raise ValueError(f"threshold_hu (--threshold-hu) must be a finite threshold of {lo:g}–{hi:g} HU, "
                             f"got {float(self.threshold_hu):g}")
        self.box_size = check_box_size(self.box_size, "box_size (--box-size)")
        for v in self.views:
            ProjectionGeometry.from_view(v)  # raises on unknown view names
        self.angles = [float(a) for a in self.angles]
        if not (math.isfinite(float(self.variant_scale)) and 0.0 <= float(self.variant_scale) <= MAX_VARIANT_SCALE):
            raise ValueError(f"variant_scale (--variant-scale) must be 0–{MAX_VARIANT_SCALE:g}, got {self.variant_scale}")
        if not (math.isfinite(float(self.variant_rotation_deg)) and 0.0 <= float(self.variant_rotation_deg) <= 30):
            raise ValueError(f"variant_rotation_deg (--variant-rotation) must be 0–30 degrees, got {self.variant_rotation_deg}")
        shift = [float(x) for x in self.variant_shift_mm]
        if len(shift) != 3 or not all(math.isfinite(x) and 0.0 <= x <= self.box_size / 4 for x in shift):
            raise ValueError(f"variant_shift_mm (--variant-shift-mm) must be three distances x,y,z of 0–"
                             f"{self.box_size / 4:g} mm (a quarter of the box), got {self.variant_shift_mm}")
        self.variant_scale, self.variant_rotation_deg = float(self.variant_scale), float(self.variant_rotation_deg)
        self.variant_shift_mm = shift

    def deformation_params(self):
        """The limits each variant's deformation is drawn within (``dataset.augment.DeformationParams``)."""
        from .augment import DeformationParams

        return DeformationParams(max_rotation_deg=self.variant_rotation_deg, max_scale=self.variant_scale)

    def view_names(self) -> list[str]:
        """Named views plus extra angles, without duplicates (``'AP'``, ``'PA'``, ``'LAT'``, ``'30'``…)."""
        out = [v.upper() for v in self.views] + [f"{a:g}" for a in self.angles]
        seen = set()
        return [v for v in out if not (v in seen or seen.add(v))]

    def geometry(self, view: str, isocenter) -> ProjectionGeometry:
        """The DRR geometry of one view around ``isocenter`` (LPS mm), which records how the isocentre was
        chosen (``isocenter_mode``)."""
        return replace(ProjectionGeometry.from_view(
            view,
            isocenter,
            sdd=self.sdd,
            sod=self.sod,
            size=(self.drr_size, self.drr_size),
            detector_mm=self.detector_mm,
            kind=self.beam,
            box_size=self.box_size,
        ), isocenter_mode=self.isocenter)

    @classmethod
    def from_preset(cls, preset: str = "ours", **explicit) -> "BuildConfig":
        """The defaults (``ours``) or the paper's stated values (``paper``), then the ``explicit`` settings."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        base = PAPER_BUILD if preset == "paper" else {}
        return cls(**{**base, **explicit, "preset": preset})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        """Settings from a record (meta.json, a checkpoint's dataset).  ``smoothing_iterations``, which records
        written before the slice-interpolated surfaces carry, is read and left out: the extraction it tuned no
        longer exists, so such a record's cases are built with today's meshes at the default ``mesh_smoothing``
        (and, the digest being new, an older dataset's cases are rebuilt by the next build).  A record without
        ``keep_outside_body`` was built when the couch was kept: it reads as kept."""
        d = {k: v for k, v in d.items() if k != "smoothing_iterations"}
        d.setdefault("keep_outside_body", True)  # recorded before the setting existed: the couch was kept
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown build settings {sorted(unknown)}")
        return cls(**d)

    def digest(self) -> str:
        """Short hash of the settings: a case built with other settings is rebuilt.  The preset's name is
        left out: the same values under another name are the same data.  ``xray_realism`` counts only when
        on and ``keep_outside_body`` only when off, so datasets built before they existed keep their digest
        (and are rebuilt, without the couch, by a build with the defaults)."""
        d = {k: v for k, v in self.to_dict().items() if k != "preset" and not (k == "xray_realism" and not v)
             and not (k == "keep_outside_body" and v) and not (k in _VARIANT_DEFAULTS and v == _VARIANT_DEFAULTS[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
