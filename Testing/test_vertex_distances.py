"""vertex_distances against the analytic distance to a sphere."""

import numpy as np
import trimesh

from x2recon.metrics import vertex_distances


def test_vertex_distances_sphere():
    s = trimesh.creation.icosphere(5, radius=10.0)
    p = np.random.default_rng(0).normal(size=(5000, 3)) * 8
    r = np.linalg.norm(p, axis=1)
    # the icosphere's flat faces lie at most the sagitta (~0.003 for this tessellation) inside the sphere
    assert np.abs(vertex_distances(p, s) - np.abs(r - 10)).max() < 5e-3
    assert np.abs(vertex_distances(p, s, signed=True) - (r - 10)).max() < 5e-3
