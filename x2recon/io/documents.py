"""x2recon's own JSON documents (detections, template libraries …): read with the format checked."""

from __future__ import annotations

from pathlib import Path

from ..errors import X2ReconInputError
from ..userfiles import read_json, read_text  # noqa: F401  (read_text: also imported from here)


def read_document(path: str | Path, fmt: str, what: str) -> dict:
    """The JSON object in ``path`` whose ``format`` is ``fmt``; an ``X2ReconInputError`` naming the file
    when it is not UTF-8 JSON or not that kind of document (``what``, e.g. "detections file")."""
    path = Path(path)
    doc = read_json(path, what)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise X2ReconInputError(path, f"not an x2recon {what} (expected format {fmt!r})")
    return doc


def recorded_path(path: str | Path | None) -> str | None:
    """How a record that leaves this machine (checkpoint metadata, a template library, a model card) names
    a file or folder: its name only, never the machine's absolute path."""
    if path is None or str(path) == "":
        return None if path is None else ""
    return Path(path).resolve().name


_PATH_SPLIT = r"([\s=,;\"']+)"


def _is_absolute(word: str) -> bool:
    from pathlib import PurePosixPath, PureWindowsPath

    return word.startswith("~/") or (len(word) > 1 and PurePosixPath(word).is_absolute()) or \
        PureWindowsPath(word).is_absolute()


def absolute_paths(doc) -> list[str]:
    """Every absolute path (POSIX ``/…``, ``~/…``, Windows ``C:\\…``) in a JSON-able ``doc``: in string values
    and as words of strings such as recorded command lines."""
    import re

    if isinstance(doc, dict):
        return [p for v in doc.values() for p in absolute_paths(v)]
    if isinstance(doc, (list, tuple)):
        return [p for v in doc for p in absolute_paths(v)]
    if isinstance(doc, str):
        return [w for w in re.split(_PATH_SPLIT, doc) if _is_absolute(w)]
    return []


def without_machine_paths(doc, base: str | Path | None = None):
    """``doc`` (JSON-able) with every absolute path (as :func:`absolute_paths` finds them) made relative to
    ``base`` when it lies inside it, else cut to its name: what a record that leaves this machine keeps."""
    import re

    if isinstance(doc, dict):
        return {k: without_machine_paths(v, base) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [without_machine_paths(v, base) for v in doc]
    if not isinstance(doc, str):
        return doc
    root = Path(base).resolve() if base is not None else None

    def portable(word: str) -> str:
        if not _is_absolute(word):
            return word
        from pathlib import PureWindowsPath

        if not word.startswith(("/", "~")):
            return PureWindowsPath(word).name
        p = Path(word).expanduser()
        if root is not None and p.is_relative_to(root) and p != root:
            return p.relative_to(root).as_posix()
        return p.name
    return "".join(portable(w) for w in re.split(_PATH_SPLIT, doc))
