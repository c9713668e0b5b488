"""Benchmark: our exact Siddon DRR vs DiffDRR's Siddon and trilinear renderers and nanodrr, same device and volume.

Renders a ``size³`` phantom (axis-aligned boxes whose faces lie on voxel boundaries, so the exact
line integrals are known analytically) to a ``pixels²`` cone-beam DRR at an oblique angle, with
  * ours: ``x2recon.drr.siddon.line_integrals`` (Triton kernel on CUDA, the numba kernel on CPU — torch
    where numba is missing),
  * DiffDRR 0.6 ``renderers.Siddon`` (all plane crossings sorted per ray, nearest-voxel lookup)
    and ``renderers.Trilinear`` (uniform samples, trilinear interpolation),
  * nanodrr 0.1.7 ``drr.render`` (``--nanodrr-samples`` uniform samples per ray inside the volume,
    trilinear ``grid_sample``; its fused Triton kernel on CUDA, the torch reference on CPU),
fed the same rays (from ``ProjectionGeometry.rays()``, in voxel coordinates for DiffDRR and in world mm
with the camera frame = the world frame for nanodrr, computed once and not timed for the peers; ours is
timed whole, ray generation included).  The detector is placed outside the
volume (DiffDRR integrates every plane crossing, also those beyond the detector; we stop at it).
``--volume chest`` uses the shared chest CT resampled to ``size³`` instead (errors then vs ours).  Prints median wall and CPU seconds per DRR, the speed ratio to DiffDRR's
Siddon, and each renderer's error against the analytic line integrals.

Target (H100, 512³ → 512²): ours ≥ 20× faster than DiffDRR's Siddon (which takes ~53 ms there).
Usage:
  python Testing/benchmarks/bench_drr.py                      # 512³ → 512², CUDA when available
  python Testing/benchmarks/bench_drr.py --device cpu --size 128 --pixels 128
  python Testing/benchmarks/bench_drr.py --volume chest --size 256   # the chest CT on a 256³ grid
Not collected by pytest (file name bench_*.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest.shared_data_dir
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _record

import _record  # noqa: E402
from x2recon.drr.siddon import auto_backend, line_integrals  # noqa: E402
from x2recon.geometry import ProjectionGeometry  # noqa: E402

TARGET_RATIO = 20.0
FOV_MM = 384.0  # edge of the phantom cube
SDD, SOD, DETECTOR_MM = 1800.0, 1350.0, 520.0  # detector 450 mm behind the centre: outside the cube


def chest_cube(size: int):
    """The shared chest CT (μ) resampled onto a ``size³`` isotropic grid covering its largest extent."""
    import SimpleITK as sitk

    from conftest import shared_data_dir
    from x2recon.drr.attenuation import hu_to_mu
    from x2recon.io.volume import Volume, read_ct

    ct = read_ct(shared_data_dir() / "chest_lidc0001" / "ct.nii.gz")
    lo, hi = ct.corners_world().min(0), ct.corners_world().max(0)
    s = float((hi - lo).max() / size)
    ref = sitk.Image([size] * 3, sitk.sitkInt16)
    ref.SetSpacing([s] * 3)
    ref.SetOrigin((((lo + hi) / 2) - s * (size - 1) / 2).tolist())
    vol = Volume.from_sitk(sitk.Resample(ct.to_sitk(), ref, sitk.Transform(), sitk.sitkLinear, -1024.0,
                                         sitk.sitkInt16))
    return hu_to_mu(vol.array.astype(np.float32)), vol.affine, vol.corners_world().mean(0)


def phantom(size: int):
    """A body-like set of boxes on a ``size³`` grid of FOV_MM; returns (volume [k,j,i], affine, boxes)."""
    s = FOV_MM / size
    # (lo, hi) as fractions of the grid (snapped to voxel boundaries), μ in 1/mm
    spec = [
        ((0.10, 0.90), (0.20, 0.80), (0.02, 0.98), 0.019),  # soft tissue
        ((0.18, 0.42), (0.28, 0.62), (0.08, 0.92), -0.014),  # right lung (air-like)
        ((0.58, 0.82), (0.28, 0.62), (0.08, 0.92), -0.014),  # left lung
        ((0.45, 0.55), (0.62, 0.74), (0.00, 1.00), 0.03),  # spine
        ((0.47, 0.53), (0.22, 0.26), (0.35, 0.75), 0.025),  # sternum
        ((0.30, 0.40), (0.40, 0.50), (0.40, 0.60), 0.01),  # a nodule-ish block
    ]
    vol = np.zeros((size, size, size), np.float32)
    boxes = []
    for fx, fy, fz, mu in spec:
        lo = [int(round(f[0] * size)) for f in (fx, fy, fz)]
        hi = [max(int(round(f[1] * size)), l + 1) for f, l in zip((fx, fy, fz), lo)]
        vol[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] += mu
        boxes.append((np.array(lo), np.array(hi), mu))
    aff = np.eye(4)
    aff[:3, :3] = np.diag([s, s, s])
    aff[:3, 3] = -(size - 1) / 2 * s
    return vol, aff, boxes


def analytic(geom, aff, boxes) -> np.ndarray:
    """Exact Σ μ × chord of every ray through the boxes (slab method, float64)."""
    o, d, L = (x.reshape(-1, *x.shape[2:]) for x in geom.rays())
    s, origin = np.diag(aff)[:3], aff[:3, 3]
    total = np.zeros(len(o))
    for lo, hi, mu in boxes:
        a, b = origin + (lo - 0.5) * s, origin + (hi - 0.5) * s
        with np.errstate(divide="ignore", invalid="ignore"):
            t0, t1 = (a - o) / d, (b - o) / d
        inside = (o > a) & (o < b)
        tmin = np.where(d == 0, np.where(inside, -np.inf, np.inf), np.minimum(t0, t1)).max(-1)
        tmax = np.where(d == 0, np.where(inside, np.inf, -np.inf), np.maximum(t0, t1)).min(-1)
        total += mu * np.clip(np.minimum(tmax, L) - np.maximum(tmin, 0), 0, None)
    return total.reshape(geom.height, geom.width)


def nanodrr_renderer(vol: torch.Tensor, aff: np.ndarray, geom, n_samples: int):
    """A call that renders ``geom``'s rays through ``vol`` (μ, [k, j, i], on its device) with nanodrr's
    ``render``: a ``Subject`` of the volume with our index → LPS affine (values used as they are), rays given
    as source and detector-pixel points in world mm with the identity camera pose.  Raises ImportError
    when nanodrr is not installed."""
    from nanodrr.data import Subject
    from nanodrr.drr import render

    dev = vol.device
    f32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32, device=dev)  # noqa: E731
    img = vol.float()[None, None].contiguous()
    subject = Subject(img, torch.zeros_like(img), f32(aff), f32(np.linalg.inv(aff)),
                      Subject._make_voxel_to_grid(img.shape).to(dev), f32(aff[:3, 3]), max_label=0,
                      convert_to_mu=False).to(dev)
    o, d, L = geom.rays()
    src = f32(o.reshape(1, -1, 3))
    tgt = f32((o + d * L[..., None]).reshape(1, -1, 3))
    eye = torch.eye(4, device=dev)[None]
    one = torch.ones(1, device=dev)

    def run():
        with torch.no_grad():
            return render(subject, eye[:, :3, :3], eye, one, geom.height, geom.width, n_samples,
                          src=src, tgt=tgt)[0, 0]
    return run


def timed(fn, device: str, repeats: int):
    """Median wall and CPU seconds of ``fn()`` after one warm-up call (compilation, caches)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = fn()
    sync()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        sync()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, statistics.median(walls), statistics.median(cpus)


def batch_views(vol, aff, centre, pixels: int, n_views: int, dev: str, repeats: int) -> list[dict]:
    """``n_views`` DRRs of one volume (angles spread over 360°): ours one view after another vs DiffDRR's
    Siddon given all views as one batch.  Errors of DiffDRR against ours (no analytic reference here)."""
    geoms = [ProjectionGeometry.from_view(f"{360.0 * k / n_views:.3f}", centre + [1.7, -2.3, 3.1], sdd=SDD, sod=SOD,
                                          size=(pixels, pixels), detector_mm=DETECTOR_MM) for k in range(n_views)]
    ours, t_ours, _ = timed(lambda: torch.stack([line_integrals(vol, aff, g) for g in geoms]), dev, repeats)
    name = f"DRR batch: {n_views} views of one {vol.shape[0]}³ volume → {pixels}²"
    try:
        from diffdrr.renderers import Siddon
    except ImportError:
        return [_record.figure(name, t_ours, "s", device=dev, peer="DiffDRR Siddon (batched): not installed",
                               target="≥ 50× (issue 15, H100)")]
    ainv = np.linalg.inv(aff)
    to_index = lambda p: p.reshape(-1, 3) @ ainv[:3, :3].T + ainv[:3, 3]  # noqa: E731
    src, tgt, length = [], [], []
    for g in geoms:
        o, d, L = g.rays()
        src.append(to_index(o))
        tgt.append(to_index(o + d * L[..., None]))
        length.append(L.reshape(1, -1))
    src = torch.tensor(np.stack(src), dtype=torch.float32, device=dev)
    tgt = torch.tensor(np.stack(tgt), dtype=torch.float32, device=dev)
    length = torch.tensor(np.stack(length), dtype=torch.float32, device=dev)
    with torch.no_grad():
        theirs, t_peer, _ = timed(lambda: Siddon(voxel_shift=0.5)(vol.permute(2, 1, 0), src, tgt, length), dev, repeats)
    err = float((theirs.reshape(ours.shape) - ours).abs().max() / ours.max())
    print(f"{name}: ours {t_ours:.4f} s (one view after another), DiffDRR Siddon batched {t_peer:.4f} s "
          f"→ {t_peer / t_ours:.1f}×; max difference {err:.1e} of the max")
    return [_record.figure(name, t_ours, "s", device=dev, peer="DiffDRR Siddon (batched)", peer_value=t_peer,
                           target="≥ 50× (issue 15, H100)", peak_gib=_record.peak_gib(dev),
                           notes=f"DiffDRR vs ours max difference {err:.1e} of the max")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="phantom voxels per edge (default 512)")
    ap.add_argument("--pixels", type=int, default=None, help="detector pixels per edge (default: --size)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--view", default="30", help="view angle (degrees) or AP/PA/LAT")
    ap.add_argument("--volume", choices=("phantom", "chest"), default="phantom")
    ap.add_argument("--chunk", type=int, default=None, help="rays per DiffDRR call (default: all)")
    ap.add_argument("--trilinear-points", type=int, default=500, help="DiffDRR Trilinear samples per ray")
    ap.add_argument("--no-diffdrr", action="store_true")
    ap.add_argument("--nanodrr-samples", type=int, default=500, help="nanodrr samples per ray (its default)")
    ap.add_argument("--no-nanodrr", action="store_true")
    ap.add_argument("--max-diffdrr-gb", type=float, default=None,
                    help="skip DiffDRR when its estimated memory exceeds this (default: 60 %% of device/host memory)")
    ap.add_argument("--batch-views", type=int, default=0,
                    help="also time this many views of the volume, DiffDRR given them as one batch (issue 15: 64)")
    _record.add_json_arg(ap)
    a = ap.parse_args()
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    pixels = a.pixels or a.size

    if a.volume == "chest":
        vol_np, aff, centre = chest_cube(a.size)
        boxes, what = None, f"chest CT on a {a.size}³ grid ({aff[0, 0]:.3f} mm voxels)"
    else:
        vol_np, aff, boxes = phantom(a.size)
        centre, what = np.zeros(3), f"phantom {a.size}³ ({FOV_MM / a.size:.3f} mm voxels)"
    geom = ProjectionGeometry.from_view(a.view, centre + [1.7, -2.3, 3.1], sdd=SDD, sod=SOD,
                                        size=(pixels, pixels), detector_mm=DETECTOR_MM)
    print(f"{what} → {pixels}² DRR, view {a.view}, device {dev} "
          f"({torch.cuda.get_device_name() if dev.startswith('cuda') else f'{torch.get_num_threads()} CPU threads'})")
    vol = torch.from_numpy(np.ascontiguousarray(vol_np)).to(dev)
    ref = analytic(geom, aff, boxes) if boxes is not None else None

    rows = []
    ours, t_ours, c_ours = timed(lambda: line_integrals(vol, aff, geom), dev, a.repeats)
    ours = ours.float().cpu().numpy()
    rows.append((f"ours: exact Siddon ({auto_backend(vol)})", ours, t_ours, c_ours))
    nano_name = f"nanodrr ({a.nanodrr_samples} pts)"
    nano_error = None
    if not a.no_nanodrr:
        try:
            nano = nanodrr_renderer(vol, aff, geom, a.nanodrr_samples)
        except Exception as e:  # not installed, or its import fails: the table row says which
            nano_error = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            print(f"nanodrr not run: {nano_error}")
        else:
            out, t, c = timed(nano, dev, a.repeats)
            rows.append((nano_name, out.reshape(pixels, pixels).float().cpu().numpy(), t, c))
            del out

    if not a.no_diffdrr:
        try:
            from diffdrr.renderers import Siddon, Trilinear
        except ImportError:
            print("diffdrr is not installed: pip install 'x2recon[bench]'")
            Siddon = None
        if Siddon is not None:
            X, Y, Z = vol.shape[::-1]
            n_rays = pixels * pixels
            chunk = min(a.chunk or n_rays, n_rays)
            est_gb = chunk * (X + Y + Z + 3) * 4 * 12 / 1e9  # alphas, midpoints, xyz, samples, sort (measured ~11×)
            if dev.startswith("cuda"):
                avail = torch.cuda.get_device_properties(0).total_memory / 1e9
            else:
                import os

                avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
            limit = a.max_diffdrr_gb if a.max_diffdrr_gb is not None else 0.6 * avail
            if est_gb > limit:
                print(f"DiffDRR skipped: needs ~{est_gb:.0f} GB (limit {limit:.0f} GB); use --chunk or a smaller --size")
            else:
                o, d, L = geom.rays()
                ainv = np.linalg.inv(aff)
                to_index = lambda p: p.reshape(-1, 3) @ ainv[:3, :3].T + ainv[:3, 3]  # voxel centres at integers
                src = torch.tensor(to_index(o), dtype=torch.float32, device=dev)[None]
                tgt = torch.tensor(to_index(o + d * L[..., None]), dtype=torch.float32, device=dev)[None]
                length = torch.tensor(L.reshape(1, 1, -1), dtype=torch.float32, device=dev)
                dvol = vol.permute(2, 1, 0)  # DiffDRR indexes volumes [i, j, k]

                def run(renderer, **kw):
                    parts = [renderer(dvol, src[:, i:i + chunk], tgt[:, i:i + chunk], length[..., i:i + chunk], **kw)
                             for i in range(0, n_rays, chunk)]
                    return torch.cat(parts, dim=-1)

                with torch.no_grad():
                    out, t, c = timed(lambda: run(Siddon(voxel_shift=0.5)), dev, a.repeats)
                    rows.append(("DiffDRR Siddon", out.reshape(pixels, pixels).cpu().numpy(), t, c))
                    del out
                    tri = Trilinear(voxel_shift=0.5)
                    out, t, c = timed(lambda: run(tri, n_points=a.trilinear_points), dev, a.repeats)
                    rows.append((f"DiffDRR Trilinear ({a.trilinear_points} pts)",
                                 out.reshape(pixels, pixels).cpu().numpy(), t, c))
                    del out

    base = ref if ref is not None else ours
    print(f"{'renderer':34s} {'wall s':>9s} {'CPU s':>8s} {'× ours':>7s}  {'max err':>9s} {'mean err':>9s}  "
          f"(errors vs {'analytic' if ref is not None else 'ours'}, fraction of the max path)")
    for name, img, t, c in rows:
        e = np.abs(img.astype(np.float64) - base)
        print(f"{name:34s} {t:9.4f} {c:8.3f} {t / t_ours:7.1f}  {e.max() / base.max():9.2e} {e.mean() / base.max():9.2e}")
    sid_rows = [r for r in rows if r[0] == "DiffDRR Siddon"]
    if sid_rows:
        ratio = sid_rows[0][2] / t_ours
        e = np.abs(sid_rows[0][1] - ours).max() / ours.max()
        print(f"ours vs DiffDRR Siddon: {ratio:.1f}× faster (target ≥ {TARGET_RATIO:g}× on an H100); "
              f"images agree to {e:.1e} of the max")
    name = f"DRR {a.size}³ → {pixels}², exact Siddon ({a.volume})"
    err = lambda img: float(np.abs(img.astype(np.float64) - base).max() / base.max())  # noqa: E731
    records = []
    for peer in ("DiffDRR Siddon", f"DiffDRR Trilinear ({a.trilinear_points} pts)", nano_name):
        match = [r for r in rows if r[0] == peer]
        why = ("diffdrr missing or too big" if peer.startswith("DiffDRR") else
               nano_error or ("--no-nanodrr" if a.no_nanodrr else "failed"))
        records.append(_record.figure(
            name, t_ours, "s", device=dev, peer=peer if match else f"{peer}: not run ({why})",
            peer_value=match[0][2] if match else None, target="≥ 50× DiffDRR Siddon (issue 15, H100)",
            peak_gib=_record.peak_gib(dev),
            notes=f"max error vs {'analytic' if ref is not None else 'ours'}: ours {err(ours):.1e}"
                  + (f", peer {err(match[0][1]):.1e}" if match else "")
                  + f"; CPU s ours {c_ours:.3f}" + (f", peer {match[0][3]:.3f}" if match else "")
                  + (f" ({_record.load_note()})" if not dev.startswith("cuda") else "")))
    if a.batch_views and not a.no_diffdrr:
        records += batch_views(vol, aff, centre, pixels, a.batch_views, dev, a.repeats)
    _record.write(a.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
