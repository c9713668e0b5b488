"""Radiograph-like variation for training DRRs, seeded and recorded per image.

A DRR is a clean line-integral image; a real radiograph is not.  This module samples, per image,
the ways a radiograph differs and applies them, so networks trained on DRRs meet real X-rays less
surprised.  Every sampled value lives in :class:`RealismParams`, which goes into the DRR's metadata
(``mapping["realism"]`` in the case's ``meta.json``); ``apply_realism(line_integral, params)``
reproduces the image from it exactly (the noise has its own recorded seed).

The chain, in the order a radiograph forms:

1. **patient position** — shift in the detector plane, magnification, a few degrees of in-plane
   rotation — applied to the *geometry* before rendering (:func:`perturb_geometry`): the stored
   geometry JSON is the moved one, the reconstruction box stays on the patient, so box labels,
   occupancy and projected features stay exact;
2. **beam / attenuation**: primary transmission ``T = exp(−k·L)`` with an effective-attenuation
   scale ``k`` (beam energy and hardening);
3. **scatter**: a low-frequency haze ``spr · G_σ(T)`` (scatter-to-primary ratio ``spr``) added to T;
4. **quantum noise**: Poisson counts at ``dose`` photons per pixel for unattenuated beam;
5. **detector blur**: a Gaussian of ``blur_px`` pixels on the detected counts;
6. **log and display**: ``s = −log(counts / dose)``, mixed with the unlogged ``1 − T`` by ``log_mix``
   (processing that is not a pure log), windowed between sampled percentiles and raised to ``gamma``;
7. **collimation**: unexposed bands at the edges (bright, as an unexposed detector shows);
8. **burnt-in markers**: a block-glyph "L" or "R" (lead: bright) near a corner.

The display map (CLAHE) that every DRR gets follows, as without realism.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..geometry import ProjectionGeometry

#: 5×3 block glyphs of the burnt-in side markers (rows top → bottom).
GLYPHS = {
    "L": ["X..", "X..", "X..", "X..", "XXX"],
    "R": ["XX.", "X.X", "XX.", "X.X", "X.X"],
}


@dataclass(frozen=True)
class RealismParams:
    """One image's sampled variation (all that ``apply_realism`` needs; JSON-serialisable)."""

    noise_seed: int = 0
    k: float = 1.0  # effective attenuation scale of the line integrals
    spr: float = 0.0  # scatter-to-primary ratio of the haze
    scatter_sigma: float = 0.1  # haze width, fraction of the image's smaller side
    dose: float = 0.0  # photons per pixel of unattenuated beam; 0 = noise-free
    blur_px: float = 0.0
    log_mix: float = 0.0  # 0: log display, 1: linear in (1 − T)
    window: tuple[float, float] = (0.0, 100.0)  # display window, percentiles of the body's values
    gamma: float = 1.0
    collimation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # top, bottom, left, right (fraction)
    marker: str = ""  # "", "L" or "R"
    marker_at: tuple[float, float] = (0.05, 0.05)  # (col, row) of the glyph's top-left, fraction of the image
    marker_px: int = 0  # block size of the glyph in pixels
    shift_mm: tuple[float, float] = (0.0, 0.0)  # detector-plane (u, v) shift of the camera
    magnification: float = 1.0
    rotation_deg: float = 0.0

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "RealismParams":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


@dataclass(frozen=True)
class RealismRanges:
    """Where each value is drawn from (uniform unless said otherwise)."""

    k: tuple[float, float] = (0.7, 1.4)
    spr: tuple[float, float] = (0.0, 0.6)
    scatter_sigma: tuple[float, float] = (0.05, 0.2)
    log_dose: tuple[float, float] = (np.log(300.0), np.log(20000.0))  # dose is log-uniform
    blur_px: tuple[float, float] = (0.0, 1.5)
    log_mix: tuple[float, float] = (0.0, 0.5)
    window_low: tuple[float, float] = (0.0, 5.0)
    window_high: tuple[float, float] = (97.0, 100.0)
    gamma: tuple[float, float] = (0.7, 1.4)
    collimation_max: float = 0.08
    collimation_p: float = 0.5  # chance of each edge being collimated
    marker_p: float = 0.5
    shift_mm: float = 25.0
    magnification: tuple[float, float] = (0.9, 1.1)
    rotation_deg: float = 4.0
    extra: dict = field(default_factory=dict)


def sample_params(seed: int, size: tuple[int, int], ranges: RealismRanges | None = None) -> RealismParams:
    """Draw one image's variation from ``seed`` (the same seed gives the same parameters)."""
    r = ranges or RealismRanges()
    g = np.random.default_rng(seed)
    u = lambda lohi: float(g.uniform(*lohi))
    W, H = size
    coll = tuple(float(g.uniform(0, r.collimation_max)) if g.random() < r.collimation_p else 0.0 for _ in range(4))
    marker = str(g.choice(["L", "R"])) if g.random() < r.marker_p else ""
    return RealismParams(
        noise_seed=int(g.integers(0, 2**31 - 1)), k=u(r.k), spr=u(r.spr), scatter_sigma=u(r.scatter_sigma),
        dose=float(np.exp(u(r.log_dose))), blur_px=u(r.blur_px), log_mix=u(r.log_mix),
        window=(u(r.window_low), u(r.window_high)), gamma=u(r.gamma), collimation=coll, marker=marker,
        marker_at=(u((0.03, 0.2)) if g.random() < 0.5 else u((0.75, 0.9)), u((0.03, 0.2))),
        marker_px=max(1, int(round(min(W, H) * u((0.006, 0.012))))) if marker else 0,
        shift_mm=(float(g.uniform(-r.shift_mm, r.shift_mm)), float(g.uniform(-r.shift_mm, r.shift_mm))),
        magnification=u(r.magnification), rotation_deg=float(g.uniform(-r.rotation_deg, r.rotation_deg)),
    )


def perturb_geometry(geom: ProjectionGeometry, p: RealismParams) -> ProjectionGeometry:
    """The camera moved as ``p`` says, the patient (and the reconstruction box) left where it is.

    The source and detector slide together by ``shift_mm`` in the detector plane; the detector
    rotates by ``rotation_deg`` about its normal through the principal ray; magnification scales the
    detector's pixel spacing by ``1 / magnification`` (the patient covers more pixels).
    """
    du, dv = p.shift_mm
    move = du * geom.u + dv * geom.v
    n = geom.plane_normal
    a = np.deg2rad(p.rotation_deg)
    u = np.cos(a) * geom.u + np.sin(a) * np.cross(n, geom.u)
    v = np.cos(a) * geom.v + np.sin(a) * np.cross(n, geom.v)
    pp = geom.source + geom.sdd * n  # detector point on the principal ray: it stays put under rotation
    centre = pp + (geom.detector_center - pp) @ geom.u * u + (geom.detector_center - pp) @ geom.v * v
    sp = tuple(float(s) / p.magnification for s in geom.spacing)
    return replace(geom, source=geom.source + move, detector_center=centre + move, u=u, v=v, spacing=sp)


def _gauss(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(img, sigma, mode="nearest") if sigma > 0 else img


def detected_intensity(li: np.ndarray, p: RealismParams) -> tuple[np.ndarray, np.ndarray]:
    """Line integrals → (primary transmission T, detected relative intensity after scatter, noise, blur)."""
    T = np.exp(-p.k * np.clip(np.nan_to_num(li, nan=0.0), 0, None))
    I = T + p.spr * _gauss(T, p.scatter_sigma * min(T.shape))
    if p.dose > 0:
        rng = np.random.default_rng(p.noise_seed)
        I = rng.poisson(I * p.dose) / p.dose
    I = _gauss(I, p.blur_px)
    return T, I


def _window(x: np.ndarray, p: RealismParams) -> np.ndarray:
    lo, hi = np.percentile(x, p.window)
    y = np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)
    return y**p.gamma


def _marker(img: np.ndarray, p: RealismParams) -> None:
    H, W = img.shape
    glyph = GLYPHS[p.marker]
    c0, r0 = int(p.marker_at[0] * W), int(p.marker_at[1] * H)
    b = p.marker_px
    for i, row in enumerate(glyph):
        for j, ch in enumerate(row):
            if ch == "X":
                img[r0 + i * b: r0 + (i + 1) * b, c0 + j * b: c0 + (j + 1) * b] = 1.0


def apply_realism(line_integral: np.ndarray, p: RealismParams) -> np.ndarray:
    """Line integrals (H, W) → a radiograph-like image in [0, 1] (bone bright), before CLAHE."""
    li = np.asarray(line_integral, np.float64)
    if li.ndim != 2:
        raise ValueError(f"line integrals must be a 2D image, got shape {li.shape}")
    scale = 1.0 + p.spr  # what air (T = 1) reads after the haze: air maps to s = 0
    T, I = detected_intensity(li, p)
    s = -np.log(np.clip(I / scale, 1e-6, None))
    lin = 1.0 - I / scale
    s_n = s / max(float(np.percentile(s, 99.9)), 1e-6)
    lin_n = lin / max(float(np.percentile(lin, 99.9)), 1e-6)
    img = _window((1 - p.log_mix) * s_n + p.log_mix * lin_n, p)
    H, W = img.shape
    t, b, l, r = (int(round(f * n)) for f, n in zip(p.collimation, (H, H, W, W)))
    img[:t], img[H - b:], img[:, :l], img[:, W - r:] = 1.0, 1.0, 1.0, 1.0
    if p.marker:
        _marker(img, p)
    return img.astype(np.float32)


def realistic_drr(clean, params: RealismParams, *, clahe: bool = True, clahe_clip: float = 0.01):
    """A :class:`~x2recon.drr.render.DRRImage` (rendered in the perturbed geometry) with its display
    replaced by the radiograph-like one, followed by the usual display map (CLAHE); the parameters go
    into ``mapping["realism"]`` so the image can be reproduced."""
    from .display import to_display, to_uint16

    if clean.line_integral is None:
        raise ValueError("radiograph-like variation needs the DRR's line integrals")
    img = apply_realism(clean.line_integral, params)
    disp, mapping = to_display(img, percentile=100.0, clahe=clahe, clahe_clip=clahe_clip)
    mapping = {**clean.mapping, **mapping, "kind": "radiograph-like",
               "formula": "drr.realism.apply_realism(line_integral, realism)" + (" then CLAHE" if clahe else ""),
               "realism": params.to_dict()}
    return replace(clean, display=to_uint16(disp), mapping=mapping)
