"""X-ray(s) → bone mesh with a trained X2B / X2B2 model (X2BR paper §3.3, Fig. 3).

The image(s) are encoded once; MISE evaluates the occupancy decoder coarse to fine (32³ up to the
requested resolution, only where cells straddle τ); marching cubes (flying edges) gives the
surface in box coordinates; optionally the vertices are moved onto the τ level set with the
network's gradient (Occupancy Networks' refinement) and the mesh is simplified by quadric edge
collapse (the paper's pyfqmr for the raw surface; collapses that keep the surface closed and manifold,
``mesh.extract.simplify_closed``, for the watertight default).  Vertex normals are the mesh's own (area-weighted
face normals); only with ``network_normals`` are they the network's (the logit's negative gradient,
normalised).  The result is mapped to world millimetres (LPS) with the X-ray's geometry, a scale and a
shift, so the same normals hold there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import trimesh

from ..errors import CancelledError, X2ReconInputError
from ..geometry import ProjectionGeometry
from ..mesh.extract import MIN_COMPONENT_MM3, MeshError, drop_small_components, ensure_watertight, simplify_closed
from ..mesh.mise import mise
from ..nn.device import resolve_device, single_threaded_pool  # noqa: F401  (resolve_device: also imported from here by the CLI, demo and Slicer)
from ..io.xray import XRay


#: Points per decoder call on CPU (``OccupancyField.prob``): (2048, 128) float32 activations fit in L2.
CPU_CHUNK = 2048


@dataclass
class Reconstruction:
    mesh: trimesh.Trimesh  # world LPS mm, vertex normals set
    mesh_box: trimesh.Trimesh  # normalised reconstruction-box coordinates
    geometry: ProjectionGeometry  # of the (first) X-ray; the box is geometry.box_bounds()
    seconds: float
    evaluations: int
    dense_evaluations: int
    precision: str = "fp32"  # the decoder's matrix products during MISE (``decoder.resolve_precision``)
    #: per-vertex confidence in [0, 1] (``confidence.vertex_confidence``), also the meshes' vertex attribute
    #: ``"confidence"``
    confidence: np.ndarray | None = None

    @property
    def mean_confidence(self) -> float:
        return float(np.mean(self.confidence)) if self.confidence is not None and len(self.confidence) else 0.0


def upsampling_steps(resolution: int, resolution0: int = 32) -> int:
    """MISE steps from ``resolution0`` to ``resolution`` (both powers-of-two multiples)."""
    k = math.log2(resolution / resolution0) if resolution >= resolution0 else -1
    if k < 0 or k != int(k):
        raise ValueError(f"resolution must be {resolution0}·2^k (32, 64, 128, 256, 512), got {resolution}")
    return int(k)


def check_views(model, xrays: list[XRay]) -> None:
    cfg = model.cfg
    if cfg.kind == "x2b2":
        if len(xrays) != 2:
            raise X2ReconInputError(xrays[0].source if xrays else "input",
                                    f"this X2B2 model needs two X-rays ({cfg.views[0]} and a lateral {cfg.views[1]}); "
                                    f"got {len(xrays)} (give --lateral)")
        a, b = xrays[0].geometry, xrays[1].geometry
        if not (np.allclose(a.isocenter, b.isocenter, atol=1e-3) and abs(a.box_size - b.box_size) < 1e-6):
            raise X2ReconInputError(xrays[1].source, "the two X-rays' geometries do not share one reconstruction box "
                                                     f"(isocentres {a.isocenter} vs {b.isocenter})")
        cos = abs(float(a.plane_normal @ b.plane_normal))
        if cos > 0.5:
            raise X2ReconInputError(xrays[1].source, f"the views are {math.degrees(math.acos(min(cos, 1))):.0f}° apart; "
                                                     "X2B2 needs a frontal and a lateral (orthogonal) view")
    elif len(xrays) != 1:
        raise X2ReconInputError(xrays[1].source if len(xrays) > 1 else "input",
                                f"this X2B model takes one X-ray, got {len(xrays)}")


class OccupancyField:
    """The model's occupancy for one encoded set of X-rays: ``prob(points)`` and ``logit_grad``."""

    def __init__(self, model, xrays: list[XRay], device: torch.device, batch: int = 65_536, precision: str = "fp32"):
        """``precision``: of the decoder's products in ``prob`` ("auto" resolved by ``decoder.resolve_precision``);
        gradients (``logit_and_grad``) are always fp32."""
        from .decoder import resolve_precision

        self.model, self.device, self.batch = model, device, batch
        self.precision = resolve_precision(precision, device)
        # CPU: small chunks on single-threaded pool workers (see ``prob``); an accelerator takes ``batch``
        self.cpu_chunk = min(batch, CPU_CHUNK) if device.type == "cpu" else 0
        S = model.cfg.image_size
        imgs, grids = zip(*(x.network_input(S) for x in xrays))
        images = torch.from_numpy(np.stack(imgs))[None].to(device)
        grid = torch.from_numpy(np.stack(grids))[None].to(device)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        with torch.no_grad(), self._amp():
            self.code = model.encode(images, grid)
        self.code.latent = self.code.latent.float()
        self.code.maps = [m.float() for m in self.code.maps]
        from .decoder import FoldedDecoder

        self.folded = FoldedDecoder(model.decoder, self.code.latent, self.precision)
        self.evaluations = 0

    def _amp(self):
        import contextlib

        return self.amp if self.amp is not None else contextlib.nullcontext()

    @torch.no_grad()
    def _prob_chunk(self, pts: np.ndarray) -> np.ndarray:
        p = torch.from_numpy(np.ascontiguousarray(pts, np.float32))[None].to(self.device)
        local = self.model.sample_local(p, self.code)
        return torch.sigmoid(self.folded(p[0], None if local is None else local[0])).cpu().numpy()

    def prob(self, pts: np.ndarray) -> np.ndarray:
        """Occupancy probabilities (N,) float32 at ``pts`` (N, 3) in box coordinates.

        On CPU, chunks of ``CPU_CHUNK`` points run on ``torch.get_num_threads()`` pool threads that each
        run torch single-threaded: the decoder's (chunk, hidden) activations stay in cache and no
        operation opens an OpenMP region (less than half the CPU time of 65 536-point batches on 2
        cores; every row is computed alike, so the values are bit-identical)."""
        n = len(pts)
        self.evaluations += n
        if n == 0:
            return np.zeros(0, np.float32)
        step = self.cpu_chunk or self.batch
        slices = [slice(i, i + step) for i in range(0, n, step)]
        workers = min(torch.get_num_threads(), len(slices)) if self.cpu_chunk else 1
        if workers <= 1:
            return np.concatenate([self._prob_chunk(pts[sl]) for sl in slices])
        with single_threaded_pool(workers) as pool:
            return np.concatenate(list(pool.map(lambda sl: self._prob_chunk(pts[sl]), slices)))

    def logit_and_grad(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vals, grads = [], []
        for i in range(0, len(pts), self.batch):
            p = torch.from_numpy(np.ascontiguousarray(pts[i:i + self.batch], np.float32))[None].to(self.device)
            p.requires_grad_(True)
            with torch.enable_grad():
                local = self.model.sample_local(p, self.code)
                logit = self.folded(p[0], None if local is None else local[0])
                (g,) = torch.autograd.grad(logit.sum(), p)
            vals.append(logit.detach().cpu().numpy())
            grads.append(g[0].cpu().numpy())
        return np.concatenate(vals), np.concatenate(grads)


def refine_vertices(field: OccupancyField, verts: np.ndarray, threshold: float, steps: int, max_step: float) -> np.ndarray:
    """Newton steps along the logit's gradient that move each vertex onto the τ level set, each step
    limited to ``max_step`` (half a cell), so marching cubes' linear-interpolation error goes away."""
    level = math.log(threshold / (1 - threshold))
    v = verts.astype(np.float32).copy()
    for _ in range(steps):
        f, g = field.logit_and_grad(v)
        gn2 = (g * g).sum(1)
        ok = gn2 > 1e-12
        d = np.zeros_like(v)
        d[ok] = -((f[ok] - level) / gn2[ok])[:, None] * g[ok]
        n = np.linalg.norm(d, axis=1, keepdims=True)
        d *= np.minimum(1.0, max_step / np.maximum(n, 1e-12))
        v += d
    return np.clip(v, -0.5, 0.5)


def _simplified(mesh: trimesh.Trimesh, faces: int, watertight: bool) -> trimesh.Trimesh:
    """``mesh`` simplified to about ``faces`` triangles by quadric edge collapse.  Watertight: collapses
    that keep every piece closed and manifold (``simplify_closed``; pyfqmr pinched thin bones into edges
    of four faces in every reconstruction tried); at most as few triangles as the pieces' topology allows.
    Raw surface (``--no-watertight``): pyfqmr, as the paper, its open border kept."""
    if watertight:
        try:
            return simplify_closed(mesh, faces, "the reconstruction")
        except MeshError as e:
            raise MeshError(None, f"{e.problem}; reconstruct with --no-watertight to keep the raw surface") from None
    import pyfqmr

    s = pyfqmr.Simplify()
    s.setMesh(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int32))
    s.simplify_mesh(target_count=faces, aggressiveness=7, preserve_border=True, verbose=False)
    v, f, _ = s.getMesh()
    return trimesh.Trimesh(v, f, process=True)


def _checked_watertight(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """``mesh`` closed and manifold (small repairs by ``ensure_watertight``), or an error saying so."""
    try:
        return ensure_watertight(mesh, "the reconstruction")
    except MeshError as e:
        raise MeshError(None, f"{e.problem}; reconstruct with --no-watertight to keep the raw surface") from None


def reconstruct(model, xrays: list[XRay], *, resolution: int = 256, threshold: float | None = None,
                device: str | torch.device = "auto", faces: int = 0, refine_steps: int = 0,
                network_normals: bool = False, batch: int = 65_536, watertight: bool = True,
                precision: str = "auto", progress: Callable[[float, str], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> Reconstruction:
    """Bone mesh from ``xrays`` (one for X2B; frontal then lateral for X2B2).  ``faces``: simplify
    to about this many triangles (0: keep marching cubes' mesh; watertight: never below the fewest that keep
    every piece closed, see ``_simplified``); ``refine_steps``:
    gradient steps onto the level set; ``network_normals``: vertex normals from the network's
    gradient instead of the mesh's (costs about one extra evaluation with gradients per vertex).
    ``watertight`` (default): a closed, manifold surface, capped where bone leaves the box, without
    pieces enclosing less than ``MIN_COMPONENT_MM3`` (checked; a failure is an error); ``False``: the
    raw marching-cubes surface with every speck.  ``precision`` ("auto", "fp32", "bf16", "int8"): of the
    decoder's matrix products while MISE evaluates occupancy; "auto" is bf16 on a CPU that multiplies bf16
    natively and fp32 elsewhere (``decoder.cpu_precision``; int8 only when asked for: it misses the
    accuracy check); the result says which ran."""
    t0 = time.time()
    if not xrays:
        raise X2ReconInputError("input", "no X-ray given")
    check_views(model, xrays)
    tau = float(model.cfg.threshold if threshold is None else threshold)
    if not 0 < tau < 1:
        raise ValueError(f"threshold must be in (0, 1), got {tau}")
    steps = upsampling_steps(resolution)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    report = progress or (lambda f, m: None)
    report(0.02, "encoding the X-ray" + ("s" if len(xrays) > 1 else ""))
    field = OccupancyField(model, xrays, dev, batch, precision)
    dense = (resolution + 1) ** 3

    def fn(pts: np.ndarray) -> np.ndarray:
        if cancel is not None and cancel():
            raise CancelledError("reconstruction cancelled")
        p = field.prob(pts)
        report(0.05 + 0.8 * min(1.0, field.evaluations / max(1, 0.06 * dense)), "evaluating occupancy (MISE)")
        return p

    res = mise(fn, resolution0=32, upsampling_steps=steps, threshold=tau, batch=batch, closed=watertight)
    mesh = res.mesh
    if watertight:
        mesh = drop_small_components(mesh, MIN_COMPONENT_MM3 / float(xrays[0].geometry.box_size) ** 3)
    if len(mesh.faces) == 0:
        raise X2ReconInputError(xrays[0].source, f"the network predicts no bone above τ = {tau} in the box: "
                                                 "is this an X-ray of the kind and view the model was trained on?")
    if refine_steps:
        report(0.87, "refining vertices on the level set")
        v = refine_vertices(field, np.asarray(mesh.vertices), tau, refine_steps, 0.5 / resolution)
        mesh = trimesh.Trimesh(v, mesh.faces, process=False)
    if faces and len(mesh.faces) > faces:
        report(0.9, f"simplifying to {faces} triangles")
        mesh = _simplified(mesh, int(faces), watertight)
    if watertight:
        mesh = _checked_watertight(mesh)
    if network_normals:
        report(0.95, "normals from the network's gradient")
        _, g = field.logit_and_grad(np.asarray(mesh.vertices, np.float32))
        gn = np.linalg.norm(g, axis=1, keepdims=True)
        n = -g / np.maximum(gn, 1e-12)  # occupancy grows inwards
        bad = (gn[:, 0] < 1e-12) | ~np.isfinite(n).all(1)
        if bad.any():
            n[bad] = mesh.vertex_normals[bad]
    else:
        n = np.asarray(mesh.vertex_normals)
    report(0.97, "per-vertex confidence")
    from .confidence import CONFIDENCE_ARRAY, vertex_confidence

    conf = vertex_confidence(field.prob, np.asarray(mesh.vertices), np.asarray(mesh.vertex_normals))
    box = trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_normals=n, process=False)
    geom = xrays[0].geometry
    world = trimesh.Trimesh(geom.from_box(np.asarray(mesh.vertices, np.float64)), mesh.faces, vertex_normals=n,
                            process=False)
    for m in (box, world):
        m.vertex_attributes[CONFIDENCE_ARRAY] = conf
    report(1.0, "done")
    return Reconstruction(world, box, geom, time.time() - t0, res.evaluations, res.dense_evaluations, field.precision,
                          conf)
