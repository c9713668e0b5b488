"""The CPU Siddon traversal compiled with numba: one ray at a time in machine code.

Same traversal and the same float32 arithmetic, in the same order, as the torch path
(``siddon._trace_chunk``): ``t`` advances to the smallest of the three next crossings and the exit;
``acc += μ(voxel) × (t_new − t)``; every axis whose next crossing equals ``t`` steps (edges and
corners: several at once).  The set-up (entry voxel, first crossings, steps) is the torch path's own
``siddon.chunk_arrays``, so the sums agree with it to float32 rounding (the test asks 1e-6 of the
image's peak).  The torch path stays the reference and the fallback where numba is missing.

Threading.  Chunks of rays run on ``threads`` Python pool threads, each calling the compiled kernel,
which releases the GIL (``nogil``): the same chunking, progress and cancel polling as the torch path,
and no numba threading layer (its default ``workqueue`` layer aborts when two threads call a parallel
kernel at once, which a Slicer session or a dataset build's threads could do).  The kernel is compiled
on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def trace_rays(flat, nxt, delta, lstep, lin, te, out):  # pragma: no cover - compiled
    """Σ value × length per ray into ``out`` (float32): ``flat`` the padded volume (float32, flat),
    ``nxt``/``delta`` (3, n) float32 next crossing and spacing of crossings, ``lstep`` (3, n) int64
    linear-index step per axis, ``lin`` (n,) int64 start index, ``te`` (n,) float32 exit ``t``."""
    size = flat.shape[0]
    zero = np.float32(0.0)
    for r in range(te.shape[0]):
        n0, n1, n2 = nxt[0, r], nxt[1, r], nxt[2, r]
        d0, d1, d2 = delta[0, r], delta[1, r], delta[2, r]
        s0, s1, s2 = lstep[0, r], lstep[1, r], lstep[2, r]
        idx = lin[r]
        end = te[r]
        t = zero
        acc = zero
        while True:
            tn = min(n0, n1)
            tn = min(tn, n2)
            tn = min(tn, end)  # the last segment ends at the exit (or the detector)
            if idx < 0 or idx >= size:  # past the zero padding: nothing more to add
                break
            acc += flat[idx] * (tn - t)
            t = tn
            if n0 == t:
                idx += s0
                n0 += d0
            if n1 == t:
                idx += s1
                n1 += d1
            if n2 == t:
                idx += s2
                n2 += d2
            if not t < end:
                break
        out[r] = acc
