"""One writer per dataset (and per training run folder, ``run_lock``): an advisory ``flock`` on
``<dataset>/.lock`` held while building.

A whole build (or ``x2recon manifest``) holds the lock exclusively.  A sharded build (``--shard
K/N``) holds it shared, plus ``.lock.shard-K-of-N`` exclusively: shards on many machines still
write into one folder together, while a second copy of the same shard, an unsharded build or a
manifest rewrite refuses (or waits with ``wait=True``).  The lock file names its holder (pid,
host, time), so the refusal says who to wait for.  The kernel drops the lock when the holder
dies, so a killed build never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from ..errors import X2ReconInputError


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process (unknown pid)"


def _open(path: Path, kind: str = "dataset") -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise X2ReconInputError(path.parent, f"cannot write the {kind} folder ({e.strerror})") from None


def _acquire(path: Path, exclusive: bool, wait: bool, what: str, kind: str = "dataset",
             hint: str = "wait for it to finish, or pass --wait to wait for it") -> int:
    fd = _open(path, kind)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            raise X2ReconInputError(path.parent, f"{kind} is in use by {_holder(path)}; {hint}") from None
        fcntl.flock(fd, mode)
    # informational: who holds it (with shared holders, the latest of them)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"x2recon {what}, pid {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def dataset_read_lock(root: str | Path, *, wait: bool = False, what: str = "evaluate", on_wait=None):
    """Hold ``root``'s lock shared for the ``with`` block, as a reader (``x2recon evaluate``): while a build,
    a shard or a manifest rewrite holds the dataset, refuse — its cases and splits are still changing, and
    scoring it would score part of it — or with ``wait`` wait for them (``on_wait(holder)`` is called first).
    Holding it keeps builds out until the block ends.  A read-only dataset is locked through a read-only
    descriptor (no holder line written); one that no build ever locked (no ``.lock``) has nothing to wait for."""
    root = Path(root)
    fds: list[int] = []
    try:
        for path in [root / ".lock", *sorted(root.glob(".lock.shard-*"))]:
            fd, writable = _open_reader(path, create=path.name == ".lock" and (root / "cases").is_dir())
            if fd is None:
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise X2ReconInputError(root, f"dataset is being written by {holder}: scoring it now would "
                                            "score a partial dataset; wait for it to finish, or pass --wait to "
                                            "wait for it") from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_SH)
            if writable and path.name == ".lock":
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"x2recon {what} (reading), pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _open_reader(path: Path, create: bool) -> tuple[int | None, bool]:
    """(descriptor, writable) of a lock file for a reader: read-write where allowed (``create``: made if
    missing), else read-only; (None, False) when it does not exist and cannot be made."""
    try:
        return os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666), True
    except OSError:
        pass
    try:
        return os.open(path, os.O_RDONLY), False
    except OSError:
        return None, False


@contextlib.contextmanager
def dataset_lock(out: str | Path, *, shard: tuple[int, int] | None = None, wait: bool = False, what: str = "build"):
    """Hold ``out``'s writer lock (see module docstring) for the ``with`` block."""
    out = Path(out)
    fds = []
    try:
        fds.append(_acquire(out / ".lock", shard is None, wait, what))
        if shard is not None:
            fds.append(_acquire(out / f".lock.shard-{shard[0]}-of-{shard[1]}", True, wait, what))
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # closing the descriptor releases its flock


@contextlib.contextmanager
def run_lock(out: str | Path, what: str = "train"):
    """Hold training run folder ``out``'s lock (``out/.lock``, made with the folder) for the ``with`` block:
    a second run into the same folder refuses at once, naming the holder (pid, host, since when), instead
    of both writing ``log.jsonl`` and the checkpoints.  Under torchrun only the rank-0 process takes it
    (the other ranks of one run share the folder)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise X2ReconInputError(out, f"cannot make the run folder ({e.strerror})") from None
    fd = _acquire(out / ".lock", True, False, what, kind="run folder",
                  hint="wait for that run to finish, or give another --out")
    try:
        yield
    finally:
        os.close(fd)
