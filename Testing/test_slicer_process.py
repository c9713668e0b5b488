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


# ------------------------------------------------------------------------------------ first-use installs
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


class FakeSlicer:
    """The parts of ``slicer`` that ``ensure_dependencies`` calls, recording each call; ``absent`` is what
    ``missing_modules`` reports missing (installs remove names from it)."""

    def __init__(self, monkeypatch, absent, answer=True, pytorchutils=False, pydeps=False):
        import types

        import x2recon.slicer.process as process

        self.absent, self.calls = set(absent), []
        self.constraints = None
        util = types.SimpleNamespace(confirmOkCancelDisplay=self._confirm(answer), errorDisplay=self._error,
                                     pip_install=self._pip)
        mod = types.ModuleType("slicer")
        mod.util = util
        monkeypatch.setitem(sys.modules, "slicer", mod)
        monkeypatch.setattr(process, "missing_modules", lambda modules: [m for m in modules if m in self.absent])
        if pydeps:
            pd = types.ModuleType("slicer.pydeps")
            pd.load_requirements = lambda path: ("requirements of", path.name)
            pd.pip_ensure = self._pip_ensure
            mod.pydeps = pd
            monkeypatch.setitem(sys.modules, "slicer.pydeps", pd)
        if pytorchutils:
            ptu = types.ModuleType("PyTorchUtils")
            fake = self

            class PyTorchUtilsLogic:
                def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
                    fake.calls.append(("installTorch", torchVersionRequirement))
                    fake.absent -= {"torch", "torchvision"}
                    return object()

            ptu.PyTorchUtilsLogic = PyTorchUtilsLogic
            monkeypatch.setitem(sys.modules, "PyTorchUtils", ptu)
        else:
            monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails

    def _confirm(self, answer):
        def confirm(text):
            self.calls.append(("ask", text))
            return answer
        return confirm

    def _error(self, text):
        self.calls.append(("error", text))

    def _pip(self, args):
        args = list(args)
        if "-c" in args:
            self.constraints = open(args[args.index("-c") + 1]).read().split()
        self.calls.append(("pip", args))
        self.absent.clear()

    def _pip_ensure(self, reqs, **kw):
        self.calls.append(("pip_ensure", reqs, kw))
        self.absent.clear()

    def kinds(self):
        return [c[0] for c in self.calls]


def test_torch_is_never_taken_from_pip(monkeypatch, tmp_path):
    """Without the PyTorch extension the user is told to install it, and nothing at all is installed."""
    from x2recon.slicer.process import ensure_dependencies

    s = FakeSlicer(monkeypatch, {"torch", "scipy"})
    assert ensure_dependencies(tmp_path / "requirements.txt", ("torch", "scipy"), requester="X2BoneRecon") is False
    assert s.kinds() == ["error"] and "PyTorch extension" in s.calls[0][1] and "X2BoneRecon" in s.calls[0][1]


def test_torch_from_pytorchutils_then_pip_with_slicers_packages_pinned(monkeypatch, tmp_path):
    """torch + torchvision from PyTorchUtils; the pip step (Slicer < 5.11) gets a constraints file that keeps
    torch, torchvision, SimpleITK, vtk and numpy at their installed versions (or, absent, uninstallable)."""
    from importlib.metadata import PackageNotFoundError, version

    from x2recon.slicer.process import SLICER_PROVIDED, ensure_dependencies

    req = tmp_path / "requirements.txt"
    s = FakeSlicer(monkeypatch, {"torch", "torchvision", "timm"}, pytorchutils=True)
    assert ensure_dependencies(req, ("torch", "torchvision", "timm"), testing=True) is True
    assert s.kinds() == ["installTorch", "pip"] and s.calls[0][1] == ">=2.1"
    args = s.calls[1][1]
    assert args[:2] == ["-r", str(req)] and args[2] == "-c"
    for name in SLICER_PROVIDED:
        try:
            assert f"{name}=={version(name)}" in s.constraints
        except PackageNotFoundError:
            assert f"{name}<0" in s.constraints
    assert "torch==" + version("torch") in s.constraints  # installed here: pinned, so pip cannot replace it


def test_pydeps_skips_slicers_packages_and_asks_first(monkeypatch, tmp_path):
    from x2recon.slicer.process import SLICER_PROVIDED, ensure_dependencies

    s = FakeSlicer(monkeypatch, {"scipy"}, pydeps=True)
    assert ensure_dependencies(tmp_path / "requirements.txt", ("torch", "scipy"), requester="SpiderCT") is True
    (kind, reqs, kw), = s.calls
    assert kind == "pip_ensure" and reqs == ("requirements of", "requirements.txt")
    assert kw["skip_packages"] == SLICER_PROVIDED and kw["prompt_install"] is True and kw["requester"] == "SpiderCT"


def test_a_declined_licence_question_installs_nothing(monkeypatch, tmp_path):
    """X2BoneRecon's Refine with template: ultralytics only after its own question (which names the
    licence); declined, nothing runs; accepted, pip is not asked a second time."""
    from x2recon.slicer.process import ensure_dependencies

    s = FakeSlicer(monkeypatch, {"ultralytics"}, answer=False, pydeps=True)
    assert ensure_dependencies(tmp_path / "r.txt", ("ultralytics",), question="AGPL-3.0: install?") is False
    assert s.kinds() == ["ask"]
    s = FakeSlicer(monkeypatch, {"ultralytics"}, answer=True, pydeps=True)
    assert ensure_dependencies(tmp_path / "r.txt", ("ultralytics",), question="AGPL-3.0: install?") is True
    assert s.kinds() == ["ask", "pip_ensure"] and s.calls[1][2]["prompt_install"] is False


def _requirement_names(path) -> set[str]:
    import re

    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return {re.split(r"[<>=!~ ;\[]", ln)[0].lower() for ln in lines if ln and not ln.startswith("#")}


def test_module_requirements_leave_slicers_packages_and_ultralytics_out():
    from x2recon.slicer.process import SLICER_PROVIDED

    provided = {n.lower() for n in SLICER_PROVIDED}
    for module in ("X2DatasetBuilder", "X2BoneRecon", "SpiderCT"):
        req = REPO / module / "Resources" / "requirements.txt"
        names = _requirement_names(req)
        assert names and not names & provided and "ultralytics" not in names, (module, names)
        assert "x2recon/slicer/process.py" in req.read_text() and (REPO / "x2recon/slicer/process.py").is_file()
    refine = REPO / "X2BoneRecon" / "Resources" / "requirements-x2br.txt"
    assert _requirement_names(refine) == {"ultralytics"}


def test_x2bonerecon_asks_for_ultralytics_only_when_refining():
    """In the panel, the refine dependencies are ensured only under the Refine checkbox, and its question
    names the licence (the widget runs only inside Slicer: checked on the source)."""
    import ast

    src = (REPO / "X2BoneRecon" / "X2BoneRecon.py").read_text()
    tree = ast.parse(src)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "ensure_refine_dependencies"]
    assert calls
    guarded = {id(c) for n in ast.walk(tree) if isinstance(n, ast.If) and "refineCheckBox" in ast.unparse(n.test)
               for c in ast.walk(n.test) if isinstance(c, ast.Call)}
    test_method = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name.endswith("Test")]
    in_tests = {id(c) for cls in test_method for c in ast.walk(cls) if isinstance(c, ast.Call)}
    assert all(id(c) in guarded or id(c) in in_tests for c in calls)
    assert "AGPL-3.0" in src[src.index("REFINE_QUESTION"):src.index("REFINE_QUESTION") + 400]
