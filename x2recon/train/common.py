"""What every training loop shares: devices and DDP set-up (torchrun), mixed precision, logging
(TensorBoard + a JSON-lines file), resumable training state, and stopping cleanly on Ctrl-C/SIGTERM.

Training state lives in the run folder: ``last.safetensors`` (a loadable checkpoint),
``last.state.pt`` (optimiser state, step, epoch, the weights' checksum; read back with
``torch.load(weights_only=True)``, never unpickling code), ``last.prev.*`` (the pair before, kept
until the next save is complete), ``best.safetensors`` (best validation score) and ``log.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..io.atomic import atomic_path, atomic_write_text
from ..io.documents import recorded_path


@dataclass
class TrainSettings:
    out: str
    epochs: int = 100
    max_steps: int = 0  # 0: no limit besides epochs
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    compile: bool = False
    channels_last: bool = True
    val_every: int = 1  # epochs
    save_every: int = 500  # steps
    resume: str = "auto"  # auto | never | PATH to a checkpoint to start from (weights only)
    progress: bool = True
    threads: int = 0  # CPU threads per process (0: torch's default)

    def to_dict(self) -> dict:
        return asdict(self)

    def recorded(self) -> dict:
        """The settings as a checkpoint records them: the run folder and a ``--resume`` file by name only
        (a checkpoint travels; this machine's folders do not)."""
        d = self.to_dict()
        d["out"] = recorded_path(d["out"])
        if d["resume"] not in ("auto", "never"):
            d["resume"] = recorded_path(d["resume"])
        return d


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    threads_before: int = 0  # torch's CPU threads before --threads changed them (restored by teardown)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(settings: TrainSettings) -> Dist:
    """Device and (under torchrun) the process group: NCCL on CUDA, Gloo on CPU.  ``settings.threads``
    sets torch's CPU threads until ``teardown`` (which restores the caller's)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = settings.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch sees no CUDA GPU")
        device = torch.device("cuda", local if world > 1 else (torch.device(want).index or 0))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(settings.seed + rank)
    return Dist(rank, world, local, device, before)


@contextlib.contextmanager
def session(settings: TrainSettings) -> Iterator[Dist]:
    """``setup`` … ``teardown``, also when the run fails (the process group closed, torch's threads back)."""
    dist = setup(settings)
    try:
        yield dist
    finally:
        teardown(dist)


def teardown(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if dist.threads_before and torch.get_num_threads() != dist.threads_before:
        torch.set_num_threads(dist.threads_before)


def autocast(settings: TrainSettings, device: torch.device):
    """The autocast context for ``settings.amp`` (bf16 on CUDA by default, none on CPU)."""
    mode = settings.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    if dtype is None:
        raise ValueError(f"amp must be auto, bf16, fp16 or off; got {mode!r}")
    return torch.autocast(device.type, dtype=dtype)


def wrap_for_training(model: torch.nn.Module, settings: TrainSettings, dist: Dist):
    """The module a training step calls: ``model`` under DDP when torchrun started several processes,
    and ``torch.compile``d with ``--compile``."""
    wrapped = model
    if dist.enabled:
        dev = dist.device
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return torch.compile(wrapped) if settings.compile else wrapped


def train_loader(dataset, settings: TrainSettings, dist: Dist):
    """``(sampler, loader)``: each process's share of a shuffled epoch (``DistributedSampler``), items keyed
    by ``(index, epoch)`` (``EpochSampler``) so persistent workers draw new samples every epoch; the
    global ``settings.batch_size`` is split over the processes."""
    from ..dataset.torch_data import EpochSampler

    sampler = EpochSampler(torch.utils.data.distributed.DistributedSampler(
        dataset, dist.world, dist.rank, shuffle=True, seed=settings.seed, drop_last=False))
    per_rank = max(1, settings.batch_size // dist.world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=settings.workers,
        drop_last=len(dataset) >= per_rank * dist.world, pin_memory=dist.device.type == "cuda",
        persistent_workers=settings.workers > 0)
    return sampler, loader


def finish_run(out: Path, summary: dict, dist: Dist, *, best_is_last: bool) -> dict:
    """End a run: ``summary.json`` (main process), ``best.safetensors`` = the last checkpoint when there
    was no validation to choose one, and the process group closed.  Returns ``summary``."""
    if dist.main:
        atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=1))
        if best_is_last:
            import shutil

            with atomic_path(Path(out) / "best.safetensors") as tmp:
                shutil.copyfile(Path(out) / WEIGHTS, tmp)
    teardown(dist)
    return summary


class Logger:
    """Scalars to TensorBoard (when installed) and to ``log.jsonl``; only on the main process."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.file = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # one plain line, not a Python warning with its source line
            print("note: tensorboard is not installed (pip install 'x2recon[train]'): logging to log.jsonl only",
                  file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if self.tb is not None:
                self.tb.add_scalar(k, float(v), step)
        try:
            self.file.write(json.dumps({"step": step, "time": time.time(), **{k: float(v) for k, v in values.items()}})
                            + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: a write names no file
            raise OSError(e.errno, e.strerror, self.file.name) from e

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


WEIGHTS, STATE = "last.safetensors", "last.state.pt"
PREVIOUS = ("last.prev.safetensors", "last.prev.state.pt")  # the pair before the save in progress


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_state(out: Path, optimizer: torch.optim.Optimizer, step: int, epoch: int, best: float, extra: dict | None = None) -> None:
    """The optimiser and counters for the ``last.safetensors`` just written (atomic).

    The state records the weights' SHA-256, so a resume can tell whether the two files belong
    together; the finished pair is then kept as ``last.prev.*`` (hard links, no copy), so a kill
    between the next save's two writes still leaves one consistent pair for ``load_state``."""
    out = Path(out)
    state = {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "best": best, **(extra or {}),
             "weights_sha256": file_sha256(out / WEIGHTS)}
    with atomic_path(out / STATE) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(state, f)  # through a Python file, so a failed write (a full disk) is an OSError
        except RuntimeError as e:  # torch's zip writer then fails closing the archive: the OSError is its context
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None  # atomic_path names the file
    for name, keep in zip((WEIGHTS, STATE), PREVIOUS):
        with atomic_path(out / keep) as tmp:
            os.unlink(tmp)
            try:
                os.link(out / name, tmp)
            except OSError:  # a file system without hard links: the same pair, copied
                import shutil

                shutil.copyfile(out / name, tmp)


def _read_state(path: Path) -> dict:
    from ..nn.checkpoint import CheckpointError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or a pickle that needs code (refused by weights_only)
        raise CheckpointError(path, f"cannot read the training state ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or not {"optimizer", "step", "epoch", "best"} <= set(state):
        raise CheckpointError(path, "not an x2recon training state (needs optimizer, step, epoch, best)")
    return state


def load_state(out: Path) -> dict | None:
    """The training state to resume ``out`` from, with ``state["weights"]`` = the weights file that
    belongs to it (``last.safetensors``, or ``last.prev.safetensors`` with a warning when a run was
    killed between writing the weights and the state).  None: the folder holds no training state.
    A folder with weights but no matching state is a ``CheckpointError`` saying how to start over."""
    from ..nn.checkpoint import CheckpointError

    out = Path(out)
    pairs = [(out / WEIGHTS, out / STATE), (out / PREVIOUS[0], out / PREVIOUS[1])]
    if not any(p.exists() for pair in pairs for p in pair):
        return None
    problems = []
    for weights, path in pairs:
        if not (weights.is_file() and path.is_file()):
            problems.append(f"{weights.name} + {path.name}: {'incomplete pair' if weights.exists() or path.exists() else 'absent'}")
            continue
        state = _read_state(path)
        if "weights_sha256" not in state:
            warnings.warn(f"{path}: written by an older x2recon without the weights' checksum; cannot check that "
                          f"it belongs to {weights.name}", stacklevel=2)
        elif state["weights_sha256"] != file_sha256(weights):
            problems.append(f"{weights.name} is not the file {path.name} (step {state['step']}) was saved with")
            continue
        if weights.name != WEIGHTS:
            warnings.warn(f"{out}: {'; '.join(problems)} (a run stopped while saving); resuming from the previous "
                          f"consistent pair {weights.name} + {path.name}, step {state['step']}", stacklevel=2)
        state["weights"] = weights
        return state
    raise CheckpointError(out, "no weights + training state pair that belong together to resume from ("
                          + "; ".join(problems) + "); start over with --resume never or another --out")


def start_run(out: Path, resume: str, main: bool) -> dict | None:
    """Open run folder ``out``: the main process removes what killed atomic writes left and, with
    ``resume == "never"``, the previous run's training state (its weights are overwritten at the first
    save).  Returns ``load_state(out)`` to resume from, or None for a fresh run."""
    from ..io.atomic import remove_partial_writes

    out = Path(out)
    if main:
        remove_partial_writes(out)
        if resume == "never":
            for name in (STATE, *PREVIOUS):
                (out / name).unlink(missing_ok=True)
    return None if resume == "never" else load_state(out)


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a stopped run saves its state
    (resume by running the same command).  A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        return False


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
