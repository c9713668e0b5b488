"""Atomic file writes: a file either exists complete or not at all (resumable pipelines)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    The temporary name keeps the final suffix so that writers that pick a format by
    extension (SimpleITK, trimesh) still work.  An ``OSError`` while writing (a full disk: a
    ``write`` names no file) or renaming names ``path``, the file the user asked for, not the
    temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{''.join(path.suffixes)}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):  # mkstemp makes 0600 files; give the final file the usual mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None or (e.filename is not None and str(e.filename) != tmp):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # the same subclass (errno decides it)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


#: names ``atomic_path`` gives its temporary files: ``.<stem>.<mkstemp's 8 characters>.part<suffixes>``
_PARTIAL = re.compile(r"^\..*\.[a-z0-9_]{8}\.part(\.[^/]*)?$")


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed ``atomic_path`` writes left in ``folder`` (not its
    subfolders); call it when a run starts in a folder no other process writes to.  Returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.iterdir():
        if _PARTIAL.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
