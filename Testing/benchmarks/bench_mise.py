"""Benchmark: MISE vs dense-grid extraction at 256³ — evaluations and seconds, same occupancy function.

The function is an analytic torus plus sphere (cheap), so the times show MISE's own overhead; with a
network, time scales with the evaluation counts printed here.
    python Testing/benchmarks/bench_mise.py [--resolution0 32 --steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time

from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _record
import _record  # noqa: E402
from x2recon.mesh.extract import flying_edges
from x2recon.mesh.mise import mise


def occupancy(p):
    d = np.hypot(np.hypot(p[:, 0], p[:, 1]) - 0.28, p[:, 2])
    return ((d < 0.08) | (np.linalg.norm(p - [0, 0, 0.25], axis=1) < 0.12)).astype(np.float64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution0", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    _record.add_json_arg(ap)
    a = ap.parse_args()
    res = a.resolution0 * 2**a.steps
    t = time.perf_counter()
    m = mise(occupancy, resolution0=a.resolution0, upsampling_steps=a.steps, threshold=0.5)
    t_mise = time.perf_counter() - t
    t = time.perf_counter()
    ax = np.linspace(-0.5, 0.5, res + 1)
    pts = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    vals = occupancy(pts).reshape((res + 1,) * 3)
    v, f = flying_edges(vals.transpose(2, 1, 0), 0.5)
    t_dense = time.perf_counter() - t
    print(f"final grid {res}³: MISE {m.evaluations:,} evaluations in {t_mise:.2f} s; dense {(res + 1) ** 3:,} in {t_dense:.2f} s")
    print(f"evaluations ratio dense/MISE = {(res + 1) ** 3 / m.evaluations:.1f}×; same vertex count: {len(v) == len(m.mesh.vertices)}")
    _record.write(a.json, [_record.figure(
        f"MISE {res}³ (analytic occupancy)", t_mise, "s", device="cpu", peer="dense grid + flying edges",
        peer_value=t_dense, notes=f"{m.evaluations:,} vs {(res + 1) ** 3:,} evaluations")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
