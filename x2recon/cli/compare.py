"""``x2recon compare PRED GT``: score two mesh files with the papers' mesh metrics, no dataset needed."""

from __future__ import annotations

import argparse
import json
import sys

from .common import non_negative_int, positive_float, positive_int


def cmd_compare(a) -> int:
    from ..errors import X2ReconInputError
    from ..io.mesh import read_mesh
    from ..metrics.protocol import DEFAULT_BOX_MM, PAPER_TAU, WORLD_TAU_OF_BOX, score

    if a.points < 1000:
        raise X2ReconInputError("--points", f"need at least 1000 samples, got {a.points}")
    if a.tau is not None and not a.tau > 0:
        raise X2ReconInputError("--tau", f"must be positive, got {a.tau}")
    pred, gt = read_mesh(a.pred), read_mesh(a.gt)
    tau = a.tau if a.tau is not None else (PAPER_TAU if a.protocol == "paper" else WORLD_TAU_OF_BOX * DEFAULT_BOX_MM)
    kw = {"tau": tau} if a.protocol == "paper" else {"tau_mm": tau}
    # the meshes are checked (empty, collapsed, open ground truth, no volume: errors naming the file) and
    # inward-wound shells turned outward, which the notes say
    res = score(pred, gt, (a.protocol,), n_points=a.points, seed=a.seed, names=(str(a.pred), str(a.gt)), **kw)
    out = {"protocol": a.protocol, "units": "ground truth's longest bounding-box edge = 1" if a.protocol == "paper"
           else "mm", **res[a.protocol], "maxe": res["maxe"], "maye": res["maye"], "maze": res["maze"],
           "axis_error_units": "mm", "n_points": a.points, "seed": a.seed, "pred": str(a.pred), "gt": str(a.gt),
           "notes": res["notes"]}
    for note in res["notes"]:
        print(f"x2recon compare: note: {note}", file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "compare", help="score a mesh against a ground-truth mesh (IoU, Chamfer-L1, F-score, NC, maxe/maye/maze)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Prints one JSON object. paper: the X2BR paper's protocol (Occupancy Networks'): the ground "
                    "truth centred and scaled so its longest bounding-box edge is 1, the prediction moved with it; "
                    "IoU on uniform points in the 1.1x padded unit box, voxel IoU on its 32^3 grid (voxels the "
                    "surface crosses count as occupied), Chamfer-L1 / F-score / NC on surface samples in those "
                    "units. world: the same in mm, IoU over both meshes' joint bounding box. maxe/maye/maze "
                    "(after ICP) are in mm in both. Meshes: STL, PLY, OBJ, OFF or VTK in the same frame, of "
                    "either winding (inward-wound shells are scored turned outward; 'notes' says so). An empty, "
                    "collapsed or volume-less mesh, or an open ground truth, is an error.")
    p.add_argument("pred", help="the reconstruction's mesh file")
    p.add_argument("gt", help="the ground-truth mesh file (closed)")
    p.add_argument("--protocol", choices=["paper", "world"], default="paper",
                   help="paper: the ground truth normalised to a unit longest edge; world: millimetres")
    p.add_argument("--points", type=positive_int, default=100_000, help="surface samples per mesh and IoU points")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the samples")
    p.add_argument("--tau", type=positive_float, help="F-score threshold (default: 0.02 in paper units; 7.68 mm in world, "
                                             "0.02 of the default 384 mm box as 'evaluate' uses)")
    p.set_defaults(func=cmd_compare)
