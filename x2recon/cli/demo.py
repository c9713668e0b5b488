"""``x2recon demo``: the whole pipeline on the bundled sample data with the bundled model."""

from __future__ import annotations

import argparse

from .common import device, mise_resolution, output_dir

from ..resources import model_arg


def cmd_demo(a) -> int:
    from ..demo import model_note, run_demo

    s = run_demo(a.out, model=a.model, data=a.data, resolution=a.resolution, device=a.device,
                 watertight=not a.no_watertight)
    m = s["metrics"]
    print()
    print(f"X2B demo — {s['case']}, {s['view']} X-ray, {s['resolution']}³, {s['device']}")
    print("  IoU {iou:.3f} | Chamfer-L1 {chamfer_l1:.4f} | F-score@0.02 {fscore:.3f} | NC {normal_consistency:.3f} | "
          "maxe/maye/maze {maxe:.2f}/{maye:.2f}/{maze:.2f} mm | mean surface distance {mean_surface_distance_mm:.2f} mm"
          .format(**m))
    print(f"  X-ray:     {s['xray']}\n  mesh:      {s['mesh']}\n  rendering: {s['rendering']}")
    print(f"  reconstruction {s['reconstruction_seconds']:.1f} s, demo total {s['total_seconds']:.1f} s")
    print(f"  {model_note(s['model'])}")
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("demo", help="build a case from the sample data, reconstruct its bones, score and render them",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", default="x2recon-demo", type=output_dir, help="output folder")
    d.add_argument("--model", type=model_arg, help="X2B checkpoint or bundled alias (default: the bundled 'skeleton' model; 'demo': the ribs + "
                        "vertebrae demo model)")
    d.add_argument("--data", help="folder holding chest_lidc0001_half/ (default: the copy bundled in the package)")
    d.add_argument("--resolution", type=mise_resolution, default=256, help="final MISE grid, cells per side (32·2^k)")
    d.add_argument("--device", default="auto", type=device, help="auto, cpu, cuda or cuda:N")
    d.add_argument("--no-watertight", action="store_true",
                   help="keep marching cubes' raw surface instead of a closed, manifold mesh without specks")
    d.set_defaults(func=cmd_demo)
