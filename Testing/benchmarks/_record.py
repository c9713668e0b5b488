"""Machine-readable figures from the benchmarks, for ``run_all.py``.

Each ``bench_*.py`` takes ``--json PATH`` and writes there a list of records made by ``figure``:
what was measured, our value, the named peer's value measured in the same process, and the ratio
(> 1 means ours is better, whichever direction "better" is for that figure).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def add_json_arg(ap) -> None:
    """The ``--json`` option every benchmark shares."""
    ap.add_argument("--json", type=Path, help="also write this run's figures as JSON records here (run_all.py)")


def device_name(device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` or ``"CPU (2 cores, <processor>)"`` — the machine a figure was taken on."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {cpu})"


def figure(name: str, ours: float, unit: str, *, device, peer: str | None = None, peer_value: float | None = None,
           better: str = "lower", target: str = "", peak_gib: float | None = None, notes: str = "") -> dict:
    """One figure.  ``better``: "lower" (seconds) or "higher" (throughput); ``ratio`` > 1 = ours better."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    ratio = None
    if peer_value is not None and ours > 0 and peer_value > 0:
        ratio = peer_value / ours if better == "lower" else ours / peer_value
    return {"figure": name, "ours": float(ours), "unit": unit, "peer": peer,
            "peer_value": None if peer_value is None else float(peer_value), "ratio": ratio, "better": better,
            "target": target, "device": device_name(device), "peak_gib": peak_gib, "notes": notes}


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU seconds of this process so far (all threads): the figure to compare on a shared
    machine, where wall time depends on what else runs.  ``children``: plus its finished and waited-for
    child processes (e.g. data-loading workers after a training run)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    if children:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += c.ru_utime + c.ru_stime
    return total


def load_note() -> str:
    """``"load average 1.2 on 2 cores"``: how busy the machine was when a figure was taken."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return f"{os.cpu_count()} cores"


def peak_gib(device) -> float | None:
    """Peak CUDA memory allocated in this process (GiB), ``None`` on CPU."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(dev) / 2**30


def write(path: Path | None, records: list[dict]) -> None:
    """Write ``records`` to ``path`` (atomically; nothing when ``path`` is None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, path)
