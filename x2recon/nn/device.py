"""The one ``--device`` resolver for torch code (networks, reconstruction, registration), and torch's CPU
thread count changed only for a scope.

``torch.set_num_threads`` sets the calling thread's OpenMP team size *and* a process-wide value that
every thread started later takes at its first parallel operation (the main thread too, when it has
not run one yet).  x2recon runs inside hosts whose Python process is shared (3D Slicer: every module),
so it never leaves that value changed: ``torch_threads`` restores it, ``single_threaded_pool`` gives
pool threads one torch thread each and restores it when the pool is done.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested, but torch sees no CUDA GPU (use --device cpu or auto)")
    return d


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads in the calling thread; afterwards the calling thread and
    the process-wide default are what they were."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def single_threaded_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose threads run torch ops on one thread each (no operation opens an OpenMP region,
    which on a loaded machine stalls at every barrier).  Each worker's setting also reaches torch's
    process-wide default, so on exit the calling thread's count is set again, which restores that
    default; threads started elsewhere while the pool runs can still take one thread."""
    previous = torch.get_num_threads()  # also fixes this thread's own count before any worker sets 1
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(previous)
