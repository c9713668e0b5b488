"""x2recon leaves its host's process-wide state as it found it (in 3D Slicer every module shares one
Python process): torch's CPU thread count after DRR rendering, reconstruction pools, dataset workers and
training runs.

``torch.set_num_threads`` in any thread also sets the count every thread started later takes (and the
main thread's, if it has not run a parallel op yet): a pool that set its workers to one thread used to
leave later threads, and a test suite's later training runs, on one thread (the suite then depended on
its order).  Each test sets an unusual count (3) first, so a leaked 1 cannot pass by coincidence.
"""
from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from x2recon.nn.device import single_threaded_pool, torch_threads

ROOT = Path(__file__).resolve().parent.parent / "x2recon"
UNUSUAL = 3


def in_new_thread(fn):
    """``fn()`` run in a thread started now (it takes torch's process-wide default thread count)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.fixture
def unusual_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(UNUSUAL)
    try:
        yield UNUSUAL
    finally:
        torch.set_num_threads(before)


def assert_threads_unchanged(n: int) -> None:
    assert torch.get_num_threads() == n
    assert in_new_thread(torch.get_num_threads) == n


def test_a_drr_render_leaves_torch_threads_as_they_were(unusual_threads):
    from x2recon.drr.siddon import line_integrals
    from x2recon.geometry import ProjectionGeometry

    vol = torch.zeros(16, 16, 16)
    vol[4:12, 4:12, 4:12] = 0.02
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -15.0
    g = ProjectionGeometry.from_view("AP", sdd=400, sod=300, size=(32, 32), detector_mm=120)
    img = line_integrals(vol, aff, g, backend="torch", chunk=128, threads=2)  # 8 chunks on 2 pool threads
    assert float(img.max()) > 0.2  # the rays crossed the cube (16 mm × 0.02 /mm)
    assert_threads_unchanged(unusual_threads)


@pytest.mark.slow
def test_a_render_before_the_main_threads_first_parallel_op_leaves_it_torchs_default():
    """The suite's order dependence, in a fresh interpreter: a DRR render that comes before the main thread's
    first parallel operation used to leave the main thread on one thread (it takes the process-wide value
    at that first operation), so a model trained afterwards reduced in another order."""
    import subprocess
    import sys

    code = ("import numpy as np, torch\n"
            "from x2recon.drr.siddon import line_integrals\n"
            "from x2recon.geometry import ProjectionGeometry\n"
            "g = ProjectionGeometry.from_view('AP', sdd=400, sod=300, size=(32, 32), detector_mm=120)\n"
            "line_integrals(torch.ones(16, 16, 16), np.diag([2.0, 2.0, 2.0, 1.0]), g, backend='torch', chunk=128,"
            " threads=2)\n"
            "print(torch.get_num_threads())\n")
    def run(source: str) -> str:
        r = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()[-1]

    default = run("import torch\nprint(torch.get_num_threads())\n")  # torch's own choice on this machine
    assert run(code) == default  # (on a 1-core machine both are 1 and this checks nothing)


def test_single_threaded_pool_gives_workers_one_thread_and_restores(unusual_threads):
    with single_threaded_pool(2) as pool:
        inside = list(pool.map(lambda _: torch.get_num_threads(), range(4)))
    assert inside == [1, 1, 1, 1]
    assert_threads_unchanged(unusual_threads)


def test_torch_threads_is_scoped_also_when_the_block_fails(unusual_threads):
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert_threads_unchanged(unusual_threads)


def test_a_dataset_worker_runs_with_its_threads_and_gives_them_back(unusual_threads, monkeypatch, tmp_path):
    """``_run_one`` (process pools and Dask workers, which may be threads of a shared process)."""
    import x2recon.dataset.builder as builder
    from x2recon.dataset.case import CaseInput

    seen = []
    monkeypatch.setattr(builder, "build_case", lambda *a, **k: seen.append(torch.get_num_threads()) or "result")
    monkeypatch.setattr(builder, "_write_status", lambda *a, **k: None)
    assert builder._run_one(CaseInput("c", "ct.nii.gz", None), str(tmp_path), {}, 1) == "result"
    assert seen == [1]
    assert_threads_unchanged(unusual_threads)


def test_a_failed_training_run_gives_back_its_threads(unusual_threads, tmp_path):
    """``--threads`` holds for the run only, also when the run stops with an error."""
    from x2recon.errors import X2ReconInputError
    from x2recon.train.common import TrainSettings
    from x2recon.x2b.network import X2BConfig
    from x2recon.x2b.train import train_x2b

    s = TrainSettings(out=str(tmp_path / "run"), threads=1, workers=0, progress=False, device="cpu")
    with pytest.raises(X2ReconInputError, match="not an x2recon dataset"):  # raised after the set-up
        train_x2b(tmp_path / "no_such_dataset", s, X2BConfig(backbone="convnext_atto", image_size=32))
    assert_threads_unchanged(unusual_threads)


def test_only_the_scoped_helpers_call_set_num_threads():
    """Every thread-count change in the package goes through ``nn.device`` (scoped) or the training
    session (restored by its teardown)."""
    allowed = {"nn/device.py", "train/common.py"}
    calls = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("set_num_threads", "set_num_interop_threads"):
                calls.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
    assert sorted(c for c in calls if c.split(":")[0] not in allowed) == []
