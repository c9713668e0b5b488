"""The Slicer panels' background runner without Qt (``x2recon.slicer.process.BackgroundJob``), with real
processes: output polled line by line without blocking, progress lines parsed, the exit code seen, and
*Cancel* stopping the process and the process it started."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from x2recon.slicer.process import BackgroundJob, _alive, parse_progress_line

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX process checks")

#: A child that starts a grandchild (as a build's worker pool does), says both pids, then waits.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("X2RECON_PROGRESS 10 started", flush=True)
    print(f"pids {child.pid}", flush=True)
    time.sleep(120)
""")


def _poll_until(job: BackgroundJob, done, timeout: float = 60.0) -> list[str]:
    lines, t_end = [], time.monotonic() + timeout
    while time.monotonic() < t_end:
        new, code = job.poll()
        lines += new
        if done(lines, code):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"timed out; lines so far: {lines}")


def test_cancel_stops_the_process_and_its_children():
    job = BackgroundJob([sys.executable, "-c", PARENT], env=dict(os.environ))
    lines = _poll_until(job, lambda ls, code: any(s.startswith("pids ") for s in ls))
    grandchild = int(next(s for s in lines if s.startswith("pids ")).split()[1])
    assert parse_progress_line(lines[0]) == (0.1, "started")
    assert job.running() and _alive(job.pid) and _alive(grandchild)
    signalled = job.cancel(timeout=5.0)
    assert {job.pid, grandchild} <= set(signalled)
    t_end = time.monotonic() + 10
    while time.monotonic() < t_end and (_alive(job.pid) or _alive(grandchild)):
        time.sleep(0.05)
    assert not _alive(job.pid) and not _alive(grandchild)
    assert not job.running() and job.cancel() == []  # a second Cancel does nothing


def test_lines_progress_and_exit_code_arrive_as_printed():
    code = textwrap.dedent("""
        import sys, time
        sys.stdout.write("X2RECON_PROGRESS 25 a quarter\\r"); sys.stdout.flush()
        time.sleep(0.3)
        print("plain line"); print("X2RECON_PROGRESS 100"); sys.stdout.flush()
        print("to stderr", file=sys.stderr)
        sys.stdout.write("no newline at the end"); sys.exit(3)
    """)
    job = BackgroundJob([sys.executable, "-c", code], env=dict(os.environ))
    first = _poll_until(job, lambda ls, c: bool(ls))  # the \r-ended progress line comes before the process ends
    assert first[0] == "X2RECON_PROGRESS 25 a quarter" and job.returncode is None
    rest = _poll_until(job, lambda ls, c: c is not None)
    lines = first + rest
    assert [parse_progress_line(s) for s in lines if parse_progress_line(s)] == [(0.25, "a quarter"), (1.0, "")]
    assert "plain line" in lines and "to stderr" in lines and lines[-1] == "no newline at the end"
    assert job.returncode == 3 and not job.running()


def test_wait_returns_the_remaining_lines_and_the_code():
    job = BackgroundJob([sys.executable, "-c", "print('one'); print('two')"], env=dict(os.environ))
    lines, code = job.wait(timeout=60)
    assert lines == ["one", "two"] and code == 0


def test_the_default_environment_finds_x2recon():
    """Without ``env`` the job gets ``process_environment()``: x2recon importable, output unbuffered."""
    job = BackgroundJob([sys.executable, "-c", "import os, x2recon; print(os.environ['PYTHONUNBUFFERED'])"])
    lines, code = job.wait(timeout=60)
    assert code == 0 and lines == ["1"]
