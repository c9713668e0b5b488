#!/usr/bin/env python3
"""README figure: a bundled X2B model on a real radiograph (issue 13 §2).

Reconstructs the bones from ``--xray`` with ``x2recon reconstruct`` (the X-ray placed from its lung
fields, as a user's PNG would be), then draws, side by side: the radiograph with the lung fields the
placement found (cyan), the reconstruction box's outline (yellow) and the reconstructed mesh's vertices
projected through the same geometry (red), and the mesh rendering from ``--render``.  The projection
overlay shows how the reconstruction lies on this patient's anatomy, which a rendering alone cannot.

    python Resources/Screenshots/make_real_radiograph.py --xray $X2RECON_SHARED_DATA/xray_nih_cxr/00000001_000.png \\
        --model skeleton --out Resources/Screenshots/x2b_skeleton_real_radiograph.png
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

import numpy as np


def box_edges(geometry) -> list[np.ndarray]:
    """The 12 edges of the reconstruction box, each as two world points (LPS mm)."""
    lo, hi = geometry.box_bounds()
    corners = np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i, j, k in product((0, 1), repeat=3)])
    return [corners[[a, b]] for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--xray", required=True, type=Path)
    p.add_argument("--model", default="skeleton", help="checkpoint or bundled alias (default: %(default)s)")
    p.add_argument("--view", default="PA")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from x2recon.io.mesh import read_mesh
    from x2recon.io.xray import lung_fields, model_geometry, read_xray
    from x2recon.nn.checkpoint import read_config
    from x2recon.resources import model_arg

    model = model_arg(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        mesh_path, render = Path(tmp) / "bones.ply", Path(tmp) / "bones.png"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "x2recon.cli", "reconstruct", "--xray", str(a.xray), "--view", a.view,
                        "--model", model, "--resolution", str(a.resolution), "--out", str(mesh_path),
                        "--render", str(render), "--quiet"], check=True)
        seconds = time.perf_counter() - t
        mesh = read_mesh(mesh_path)
        rendering = plt.imread(render)
    xray = read_xray(a.xray, view=a.view, model_geometry=model_geometry(read_config(model)))
    g = xray.geometry
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 6), gridspec_kw={"width_ratios": [1, 1.4]})
    ax0.imshow(xray.image, cmap="gray")
    lf = lung_fields(xray.image)
    if lf is not None:
        left, right, top, bottom = lf
        ax0.add_patch(plt.Rectangle((left, top), right - left, bottom - top, fill=False, color="cyan", lw=1))
    uv = g.project(np.asarray(mesh.vertices)[:: max(1, len(mesh.vertices) // 20000)])
    ax0.scatter(uv[:, 0], uv[:, 1], s=0.2, c="red", alpha=0.25)
    for e in box_edges(g):
        q = g.project(e)
        ax0.plot(q[:, 0], q[:, 1], color="yellow", lw=0.6)
    ax0.set_xlim(0, g.width)
    ax0.set_ylim(g.height, 0)
    ax0.set_title(f"{a.xray.name}: lung fields (cyan), box (yellow), mesh projected (red)", fontsize=8)
    ax0.axis("off")
    ax1.imshow(rendering)
    ax1.set_title(f"x2recon reconstruct --model {a.model} --resolution {a.resolution}: "
                  f"{len(mesh.faces):,} triangles, {seconds:.0f} s", fontsize=8)
    ax1.axis("off")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"{a.out}: reconstruction {seconds:.1f} s (wall, including start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
