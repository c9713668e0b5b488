#!/usr/bin/env python3
"""README figure: a reconstruction of a patient the model never saw, beside that patient's ground truth.

Runs ``x2recon reconstruct`` on a built case's clean AP DRR (its geometry file beside it) with a model trained
without that patient (a fold of ``training/lopo_curves.py``), and renders the mesh and the case's ground-truth
bones (``meshes/bones.ply``, cut to the reconstruction box as every score is) from the front and the side,
one row each, with the world-protocol scores ``evaluate`` gives (ground truth cut to the box) in the title.

    python Resources/Screenshots/make_heldout_pair.py --case study4/tests/chest_lungdx_a0001/cases/chest_lungdx_a0001 \\
        --model study4/runs/chest_lungdx_a0001.n3/best.safetensors --out Resources/Screenshots/x2b_heldout_pair.png
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", required=True, type=Path, help="a built case folder (images/AP.png + AP.json, meshes/)")
    p.add_argument("--model", required=True, help="checkpoint trained without the case's patient")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--threshold", help="occupancy threshold τ (default: the model's)")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from x2recon.dataset.box_coverage import clip_solid
    from x2recon.geometry import ProjectionGeometry
    from x2recon.io.mesh import read_mesh
    from x2recon.mesh.render import render_png
    from x2recon.metrics.protocol import score

    xray, geometry = a.case / "images" / "AP.png", a.case / "images" / "AP.json"
    lo, hi = ProjectionGeometry.from_json(geometry).box_bounds()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "x2recon.cli", "reconstruct", "--xray", str(xray), "--geometry",
                        str(geometry), "--model", a.model, "--resolution", str(a.resolution), "--out",
                        str(tmp / "pred.ply"), "--quiet", *(["--threshold", a.threshold] if a.threshold else [])],
                       check=True)
        seconds = time.perf_counter() - t
        gt = clip_solid(read_mesh(a.case / "meshes" / "bones.ply"), lo, hi)
        pred = read_mesh(tmp / "pred.ply")
        w = score(pred, read_mesh(a.case / "meshes" / "bones.ply"), ("world",), n_points=20_000, box=(lo, hi))["world"]
        render_png(pred, tmp / "pred.png", size=500)
        render_png(gt, tmp / "gt.png", size=500)
        images = [plt.imread(tmp / "pred.png"), plt.imread(tmp / "gt.png")]
    fig, axes = plt.subplots(2, 1, figsize=(9, 9.5))
    tau = f", τ {a.threshold}" if a.threshold else ""
    titles = [f"reconstruction from the AP DRR ({a.resolution}³{tau}, {seconds:.0f} s): Chamfer-L1 {w['chamfer_l1']:.1f} mm, "
              f"F@{w['fscore_tau']:.2f} mm {w['fscore']:.2f}, volume {w['volume_ratio']:.2f}× the true one",
              f"ground truth: {a.case.name}'s bones from its CT, cut to the box"]
    for ax, img, title in zip(axes, images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"{a.out}: {titles[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
