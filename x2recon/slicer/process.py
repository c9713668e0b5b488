"""What the Slicer modules share to run ``x2recon`` in a background process and to set it up.

* ``BackgroundJob`` (with ``LineBuffer`` and ``kill_process_tree``): a panel starts an ``x2recon``
  command, polls its output line by line without blocking, and *Cancel* stops the process and every
  process it started (pool workers); ``x2recon.slicer.widget`` is the Qt half around it;
* ``python_slicer``, ``x2recon_root`` and ``process_environment``: the interpreter, ``PYTHONPATH``
  entry and environment of that process; ``parse_progress_line`` reads the ``X2RECON_PROGRESS
  <percent> <message>`` lines the CLI prints with ``--progress-lines``;
* ``missing_modules`` and ``ensure_dependencies``: install x2recon's requirements inside Slicer on
  first use, after asking — torch and torchvision only through the PyTorch extension's PyTorchUtils,
  and never a pip step that could install, upgrade or replace what Slicer provides (``SLICER_PROVIDED``).

Only the standard library is imported here (``slicer`` and ``PyTorchUtils`` inside the functions
that need the application), so a module can import it before x2recon's requirements are installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

#: Provided by Slicer itself (torch and torchvision by the PyTorch extension's PyTorchUtils): never
#: installed, upgraded or replaced by the modules' pip steps.
SLICER_PROVIDED = ["torch", "torchvision", "SimpleITK", "vtk", "numpy"]
#: Import names that come from PyTorchUtils (a torch + torchvision pair matched to the GPU driver), never from pip.
TORCH_MODULES = ("torch", "torchvision")


# ---------------------------------------------------------------------------------- processes
def kill_process_tree(pid: int, timeout: float = 5.0, use_psutil: bool = True) -> list[int]:
    """Stop a process and every process it started (pool workers); returns the pids signalled.

    SIGTERM first, SIGKILL for what is still alive after ``timeout`` s (Windows: ``taskkill /T /F``).
    Uses psutil when it is installed, else ``ps`` on POSIX.
    """
    if use_psutil:
        try:
            import psutil
        except ImportError:
            use_psutil = False
    if use_psutil:
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return []
        procs = root.children(recursive=True) + [root]
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout)
        return [p.pid for p in procs]
    if os.name == "nt":
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True)
        return [pid]
    pids = [pid] + _descendants_posix(pid)
    for p in pids:
        _signal(p, signal.SIGTERM)
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            _signal(p, signal.SIGKILL)
    return pids


def _descendants_posix(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


#: Lines ``x2recon … --progress-lines`` prints: percent and what it is doing.
PROGRESS_RE = re.compile(r"^X2RECON_PROGRESS (\d+)(?: (.*))?$")


def parse_progress_line(line: str):
    """``(fraction, message)`` from a progress line of the ``x2recon`` CLI, else ``None``."""
    m = PROGRESS_RE.match(line.strip())
    if not m:
        return None
    return min(1.0, int(m.group(1)) / 100.0), (m.group(2) or "").strip()


class LineBuffer:
    """Splits a process's output chunks into complete lines (``\\n`` or tqdm's ``\\r``)."""

    def __init__(self):
        self._rest = ""

    def feed(self, text: str) -> list[str]:
        parts = re.split(r"\r\n|\r|\n", self._rest + text)
        self._rest = parts.pop()
        return parts

    def flush(self) -> list[str]:
        rest, self._rest = self._rest, ""
        return [rest] if rest else []


class BackgroundJob:
    """A command running in the background with its output merged and piped: ``poll()`` never blocks
    (a thread reads the pipe), returns the complete lines so far and, once the process ended and its
    output is drained, its exit code; ``cancel()`` stops it and every process it started.

    What the Slicer panels run their ``x2recon`` commands with (a Qt timer calls ``poll``); no Qt here."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None):
        import queue
        import threading

        self.cmd = [str(c) for c in cmd]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=process_environment() if env is None else env, cwd=cwd)
        self._chunks: queue.Queue = queue.Queue()
        self._lines = LineBuffer()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.returncode: int | None = None
        self.cancelled = False
        self._drained = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            data = self.proc.stdout.read1(65536) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(4096)
            if not data:
                break
            self._chunks.put(decoder.decode(data))
        self._chunks.put(decoder.decode(b"", final=True))
        self._chunks.put(None)  # end of output

    def poll(self) -> tuple[list[str], int | None]:
        """(complete output lines since the last call, exit code or None while running or being drained)."""
        import queue

        text, ended = [], False
        while True:
            try:
                chunk = self._chunks.get_nowait()
            except queue.Empty:
                break
            if chunk is None:
                ended = True
                break
            text.append(chunk)
        lines = self._lines.feed("".join(text))
        if ended:
            lines += self._lines.flush()
            self._drained = True
        if self._drained and self.returncode is None:
            self.returncode = self.proc.poll()  # None while a process that closed its output still runs
        return lines, self.returncode

    def running(self) -> bool:
        return self.returncode is None and not self.cancelled

    def wait(self, timeout: float | None = None) -> tuple[list[str], int]:
        """Block until the process ended (tests, scripts): all remaining lines and the exit code."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        lines, code = self.poll()
        return lines, self.proc.returncode if code is None else code

    def cancel(self, timeout: float = 3.0) -> list[int]:
        """Stop the process and its descendants (``kill_process_tree``); the pids signalled."""
        if self.returncode is not None or self.cancelled:
            return []
        self.cancelled = True
        pids = kill_process_tree(self.proc.pid, timeout=timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        self._reader.join(timeout)
        return pids


def x2recon_root() -> str | None:
    """The folder that holds the ``x2recon`` package (the extension's scripted-modules folder inside
    Slicer): the background process needs it on ``PYTHONPATH``."""
    spec = importlib.util.find_spec("x2recon")
    if spec is None or not spec.origin:
        return None
    return str(Path(spec.origin).parent.parent)


def process_environment(base=None) -> dict[str, str]:
    """The environment of a background ``x2recon`` process: ``base`` (default: this process's) with
    the folder holding ``x2recon`` first on ``PYTHONPATH`` and unbuffered output (progress lines
    arrive as they are printed)."""
    env = dict(os.environ if base is None else base)
    root = x2recon_root()
    if root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python_slicer() -> str:
    """Slicer's own Python for background processes (``PythonSlicer``, on PATH inside Slicer)."""
    import slicer

    exe = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    found = shutil.which("PythonSlicer")
    if found:
        return found
    cand = Path(slicer.app.applicationDirPath()) / exe
    if cand.exists():
        return str(cand)
    raise RuntimeError("PythonSlicer was not found next to the Slicer executable")


# ------------------------------------------------------------------------------- dependencies
def missing_modules(modules) -> list[str]:
    """Import names among ``modules`` that this Python lacks (checked without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def ensure_dependencies(requirements: str | Path, modules, testing: bool = False, requester: str = "X2Recon",
                        question: str | None = None) -> bool:
    """Install what x2recon needs inside Slicer after asking (in ``testing`` mode: without asking).

    ``modules``: import names to check; ``requirements``: the module's ``Resources/requirements.txt``;
    ``question``: a consent question asked before anything is installed (e.g. naming a licence), instead
    of the generic one.  torch and torchvision come from the PyTorch extension's PyTorchUtils (installed
    together, matched to the GPU driver); without that extension nothing is installed and the user is
    told to install it.  The rest goes through ``slicer.pydeps.pip_ensure`` (Slicer ≥ 5.11) with
    ``SLICER_PROVIDED`` skipped, else ``slicer.util.pip_install`` with a constraints file that pins them
    (``slicer_constraints``).  Returns False when the user declines or PyTorch is missing.
    """
    import slicer

    missing = missing_modules(modules)
    if not missing:
        return True
    if question is not None and not testing and not slicer.util.confirmOkCancelDisplay(question):
        return False
    if any(m in TORCH_MODULES for m in missing) and not _install_torch(testing, requester):
        return False
    rest = [m for m in missing_modules(modules) if m not in TORCH_MODULES]
    if not rest:
        return True
    ask = question is None and not testing
    try:
        import slicer.pydeps as pydeps
    except ImportError:
        pydeps = None
    if pydeps is not None:
        try:
            pydeps.pip_ensure(pydeps.load_requirements(Path(requirements)), skip_packages=SLICER_PROVIDED,
                              prompt_install=ask, skip_in_testing=False, requester=requester)
        except RuntimeError:  # the user declined
            return False
        return True
    if ask and not slicer.util.confirmOkCancelDisplay(
        f"{requester} needs Python packages that are not installed: {', '.join(rest)}.\n"
        "Install them now? (This can take several minutes.)"
    ):
        return False
    import tempfile

    with tempfile.TemporaryDirectory(prefix="x2recon_pip_") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(slicer_constraints()) + "\n", encoding="utf-8")
        slicer.util.pip_install(["-r", str(requirements), "-c", str(constraints)])
    return True


def _install_torch(testing: bool, requester: str) -> bool:
    """torch + torchvision through PyTorchUtils (after its own question); without the PyTorch extension,
    say how to get it and install nothing."""
    import slicer

    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(
            f"{requester} needs PyTorch (torch and torchvision), which is not installed. Install the PyTorch "
            "extension (Extensions Manager), restart Slicer and try again: it installs a torch build that "
            "matches your GPU driver.")
        return False
    return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=not testing,
                                                         torchVersionRequirement=">=2.1") is not None


def slicer_constraints() -> list[str]:
    """pip constraints that keep Slicer's own packages as they are: each ``SLICER_PROVIDED`` distribution
    pinned to its installed version, and one that is not installed made unsatisfiable (``<0``), so that a
    pip step fails rather than install it (torch and torchvision come from PyTorchUtils)."""
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for name in SLICER_PROVIDED:
        try:
            lines.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name}<0")
    return lines
