"""GBCPD speed and accuracy on ~20k × 20k bone points: ours on CPU and CUDA vs Hirose's ``bcpd`` C program.

  python Testing/benchmarks/bench_registration.py [--points 20000] [--downsample 0,5000]
         [--bcpd-src DIR | --bcpd-bin PATH] [--device auto|cpu|cuda] [--threads N]

Data: the chest_half ribs + vertebrae (x2recon's mesh extraction from ../shared/data), simplified to
``--points`` vertices (pyfqmr); the target is the same surface under a smooth random warp (six
Gaussian bumps, σ 80 mm, ~8 mm amplitude), its vertices shuffled with 0.2 mm noise — so every
source vertex has a known ground-truth position. Every peer gets the same problem and parameters
(Hirose's names, his flags in brackets): GBCPD with the geodesic kernel of the source mesh
[-G geodesic,τ,triangles], Nyström rank [-K], and for each ``--downsample`` n > 0 also GBCPD++
[-D B,n,0.08]. P is computed exactly by both (no -J/-p unless ``--bcpd-accel``, which adds a row
with Hirose's own accelerations -J300 -p).

Peers: ours on CPU (float64), ours on CUDA (float32, if a GPU is there), and ``bcpd`` built from a
checkout of github.com/ohirose/bcpd (``--bcpd-src``; compiled in a temporary folder with the system
C compiler and whatever LAPACK/OpenBLAS is found — a system library, or an OpenBLAS bundled in a
Python wheel) or a given binary (``--bcpd-bin``). If it cannot be built, the reason is printed and
the peer skipped. Threads: ours uses ``--threads`` (default: torch's), bcpd gets the same
OMP_NUM_THREADS. Printed per run: seconds (wall, whole call: kernel + registration + interpolation),
iterations, mean distance to the target (nearest target point, mm), mean/max error to the ground
truth (mm), and ours/theirs time ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest.shared_data_dir


# ------------------------------------------------------------------------------------------- data
def make_problem(points: int, seed: int = 0):
    import pyfqmr
    import trimesh
    from conftest import shared_data_dir

    from x2recon.dataset.config import BuildConfig
    from x2recon.dataset.segmentation import segment
    from x2recon.io.volume import read_ct
    from x2recon.mesh.extract import labelmap_to_meshes, merge_meshes

    d = shared_data_dir() / "chest_lidc0001_half"
    seg, names, _ = segment(read_ct(d / "ct.nii.gz"), d / "labels.nii.gz", BuildConfig(structures=["ribs", "vertebrae"]))
    meshes, _ = labelmap_to_meshes(seg, names)
    full = merge_meshes(meshes)
    if points < len(full.vertices):
        s = pyfqmr.Simplify()
        s.setMesh(np.asarray(full.vertices), np.asarray(full.faces))
        s.simplify_mesh(target_count=2 * points, aggressiveness=7, preserve_border=True, verbose=False)
        v, f, _ = s.getMesh()
        full = trimesh.Trimesh(v, f, process=False)
    v = np.asarray(full.vertices, np.float64)
    rng = np.random.default_rng(seed)
    centres, amps = rng.uniform(v.min(0), v.max(0), (6, 3)), rng.normal(0, 8.0, (6, 3))
    gt = v + np.exp(-((v[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * 80.0**2)) @ amps
    target = gt[rng.permutation(len(gt))] + rng.normal(0, 0.2, gt.shape)
    return full, target, gt


def metrics(y_hat, target, gt) -> dict:
    from scipy.spatial import cKDTree

    e = np.linalg.norm(y_hat - gt, axis=1)
    return {"to_target": float(cKDTree(target).query(y_hat)[0].mean()), "gt_mean": float(e.mean()),
            "gt_max": float(e.max())}


# -------------------------------------------------------------------------------------- bcpd peer
def _lapack_candidates() -> list[list[str]]:
    """Link options to try, best first: system OpenBLAS / LAPACK, then an OpenBLAS shipped in a wheel
    whose LAPACK symbols are unprefixed (numpy's and scipy's are prefixed, so they are skipped)."""
    out = [["-lopenblas"], ["-llapack", "-lblas"]]
    site = sysconfig.get_paths()["purelib"]
    for lib in sorted(glob.glob(os.path.join(site, "*", "*openblas*.so*")) +
                      glob.glob(os.path.join(site, "*.libs", "*openblas*.so*"))):
        try:
            h = ctypes.CDLL(lib)
            h.dposv_, h.dsyev_, h.dgemm_  # noqa: B018 — attribute lookup raises if absent
        except (OSError, AttributeError):
            continue
        out.append([lib, f"-Wl,-rpath,{os.path.dirname(lib)}"])
    return out


def build_bcpd(src: Path, workdir: Path) -> tuple[Path | None, str]:
    """Compile Hirose's bcpd in ``workdir``; returns (binary, how) or (None, why not)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        return None, "no C compiler found"
    sources = sorted(glob.glob(str(src / "register" / "*.c")) + glob.glob(str(src / "base" / "*.c")))
    if not sources:
        return None, f"{src}: no register/*.c and base/*.c (not a checkout of ohirose/bcpd?)"
    binary, errors = workdir / "bcpd", []
    for link in _lapack_candidates():
        cmd = [cc, "-O3", "-fopenmp", "-DUSE_OPENMP", *sources, *link, "-lm", "-o", str(binary)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return binary, f"{Path(cc).name} -O3 -fopenmp, LAPACK: {' '.join(link[:1])}"
        errors.append(f"{' '.join(link[:1])}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return None, "could not link against a LAPACK/OpenBLAS (" + "; ".join(errors) + ")"


def run_bcpd(binary: Path, workdir: Path, mesh, target, a, downsample: int, accel: bool, threads: int):
    np.savetxt(workdir / "X.txt", target, fmt="%.6f", delimiter="\t")
    np.savetxt(workdir / "Y.txt", np.asarray(mesh.vertices), fmt="%.6f", delimiter="\t")
    np.savetxt(workdir / "tri.txt", np.asarray(mesh.faces), fmt="%d", delimiter="\t")
    args = [str(binary), "-x", "X.txt", "-y", "Y.txt", f"-w{a.w}", f"-l{a.lam}", f"-b{a.beta}", f"-g{a.gamma}",
            f"-K{a.nystrom}", f"-Ggeodesic,{a.tau},tri.txt", f"-c{a.tol}", f"-n{a.max_iter}", f"-N{a.min_iter}",
            f"-u{a.normalize}", "-r1", "-W", "-q", "-oout_"]
    if downsample:
        args.append(f"-DB,{downsample},0.08")
    if accel:
        args += ["-J300", "-p"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t = time.perf_counter()
    r = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"bcpd failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")
    info = dict(line.split("\t") for line in (workdir / "out_info.txt").read_text().strip().splitlines())
    y = np.loadtxt(workdir / "out_y.txt")
    return y, seconds, int(info["loops"]), " ".join(args[1:])


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=20000, help="source (and target) points")
    ap.add_argument("--downsample", default="0,5000", help="comma list: 0 = GBCPD, n = GBCPD++ with n points")
    ap.add_argument("--bcpd-src", type=Path, help="checkout of github.com/ohirose/bcpd (built in a temp folder)")
    ap.add_argument("--bcpd-bin", type=Path, help="an already built bcpd binary")
    ap.add_argument("--bcpd-accel", action="store_true", help="also run bcpd with its own -J300 -p accelerations")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CPU, and CUDA when there is one")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for ours and bcpd (0: torch's default)")
    ap.add_argument("--save-problem", type=Path, help="write the problem (source mesh, target, ground truth) to this .npz")
    ap.add_argument("--problem", type=Path, help="read the problem from a --save-problem .npz (machines without "
                                                 "the shared data or the mesh libraries, e.g. a GPU node)")
    g = ap.add_argument_group("GBCPD parameters (Hirose's names; same for every peer)")
    g.add_argument("--w", type=float, default=0.0)
    g.add_argument("--lambda", dest="lam", type=float, default=100.0)
    g.add_argument("--beta", type=float, default=0.5)
    g.add_argument("--gamma", type=float, default=0.3)
    g.add_argument("--tau", type=float, default=1.0)
    g.add_argument("--nystrom", type=int, default=300)
    g.add_argument("--tol", type=float, default=1e-4)
    g.add_argument("--max-iter", type=int, default=500)
    g.add_argument("--min-iter", type=int, default=30)
    g.add_argument("--normalize", default="e")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _record

    _record.add_json_arg(ap)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()

    from x2recon.registration import gbcpd

    t = time.perf_counter()
    if a.problem:
        from types import SimpleNamespace

        z = np.load(a.problem)
        mesh, target, gt = SimpleNamespace(vertices=z["vertices"], faces=z["faces"]), z["target"], z["gt"]
    else:
        mesh, target, gt = make_problem(a.points)
    if a.save_problem:
        np.savez_compressed(a.save_problem, vertices=np.asarray(mesh.vertices), faces=np.asarray(mesh.faces),
                            target=target, gt=gt)
    print(f"problem: {len(mesh.vertices):,} source vertices ({len(mesh.faces):,} triangles), {len(target):,} target "
          f"points; built in {time.perf_counter() - t:.1f} s; {threads} CPU thread(s); "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"before registration: {metrics(np.asarray(mesh.vertices), target, gt)}")
    devices = ["cpu"] if a.device == "cpu" else (["cuda"] if a.device == "cuda" else
                                                   ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    params = dict(w=a.w, lam=a.lam, beta=a.beta, gamma=a.gamma, tau=a.tau, nystrom=a.nystrom, tol=a.tol,
                  max_iter=a.max_iter, min_iter=a.min_iter, normalize=a.normalize, seed=1)
    with tempfile.TemporaryDirectory(prefix="bench_bcpd_") as tmp:
        tmp = Path(tmp)
        binary, how = (a.bcpd_bin, "given binary") if a.bcpd_bin else (None, "no --bcpd-src/--bcpd-bin given")
        if a.bcpd_src and not a.bcpd_bin:
            binary, how = build_bcpd(a.bcpd_src, tmp)
        print(f"bcpd: {binary if binary else 'skipped'} ({how})")
        rows = []
        for ds in [int(x) for x in a.downsample.split(",") if x.strip()]:
            name = "GBCPD++" + f"({ds})" if ds else "GBCPD"
            times = {}
            for dev in devices:
                if dev == "cuda":  # warm-up: CUDA context, kernels
                    gbcpd(mesh, target[:2000], device="cuda", max_iter=2, min_iter=1, nystrom=50)
                    torch.cuda.synchronize()
                t = time.perf_counter()
                res = gbcpd(mesh, target, device=dev, downsample=ds, **params)
                if dev == "cuda":
                    torch.cuda.synchronize()
                sec = time.perf_counter() - t
                times[f"ours-{dev}"] = sec
                rows.append((name, f"ours {dev} {res.dtype}", sec, res.iterations, metrics(res.Y_hat, target, gt)))
            for accel in ([False, True] if a.bcpd_accel else [False]):
                if binary:
                    try:
                        y, sec, loops, flags = run_bcpd(binary, tmp, mesh, target, a, ds, accel, threads)
                    except RuntimeError as e:
                        print(f"bcpd ({name}): {e}")
                        continue
                    key = "bcpd-accel" if accel else "bcpd"
                    times[key] = sec
                    rows.append((name, f"bcpd {'-J300 -p' if accel else 'exact P'}", sec, loops, metrics(y, target, gt)))
                    print(f"  bcpd flags: {flags}")
            for mine in [k for k in times if k.startswith("ours")]:
                for theirs in [k for k in times if k.startswith("bcpd")]:
                    rows.append((name, f"ratio {mine}/{theirs}", times[mine] / times[theirs], None, None))
        print(f"\n{'config':<14} {'peer':<30} {'seconds':>9} {'iters':>6} {'to target':>10} {'GT mean':>8} "
              f"{'GT max':>8}  (mm)")
        for name, peer, sec, it, m in rows:
            if m is None:
                print(f"{name:<14} {peer:<30} {sec:>9.3f}")
            else:
                print(f"{name:<14} {peer:<30} {sec:>9.2f} {it:>6} {m['to_target']:>10.3f} {m['gt_mean']:>8.3f} "
                      f"{m['gt_max']:>8.2f}")
    records = []
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name and r[1].startswith("ours") and r[4] is not None]
        peer = [r for r in rows if r[0] == name and r[1] == "bcpd exact P"]
        for r in mine:
            dev = "cuda" if " cuda " in r[1] else "cpu"
            records.append(_record.figure(
                f"{name} {len(mesh.vertices)} × {len(target)}", r[2], "s", device=dev,
                peer="Hirose's bcpd (exact P)" if peer else "Hirose's bcpd: not run (--bcpd-src/--bcpd-bin)",
                peer_value=peer[0][2] if peer else None, target="error ≤ bcpd's, ≥ 50× faster (issue 15)",
                notes=f"GT mean error ours {r[4]['gt_mean']:.3f} mm"
                      + (f", bcpd {peer[0][4]['gt_mean']:.3f} mm" if peer else "")))
    _record.write(a.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
