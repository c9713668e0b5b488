"""Which bundled asset each Slicer panel's file fields start with, so a user can click *Reconstruct*
without training anything (``x2recon.resources.registry`` is the registry of the files).

``PANEL_ASSETS[module]`` maps a panel's path line edit (``<parameter>LineEdit`` in its ``.ui``, bound to
the parameter ``<parameter>``) to the alias of the asset it starts with.  A missing asset leaves the
field empty; a path the user (or a saved scene) chose is never replaced.
"""

from __future__ import annotations

from pathlib import Path

from ..resources import DEFAULT_BONE_MODEL, bundled_or_none

PANEL_ASSETS: dict[str, dict[str, str]] = {
    "X2BoneRecon": {"modelPath": DEFAULT_BONE_MODEL, "detectorPath": "detector", "templatesPath": "templates"},
    "SpiderCT": {"modelPath": "spider"},
}


def unset(path) -> bool:
    """A path field that holds nothing (the parameter node's unset Path shows as ".")."""
    return path is None or str(path).strip() in ("", ".")


def panel_defaults(module: str) -> dict[str, Path]:
    """``parameter -> bundled file`` for the fields of ``module``'s panel whose asset is installed."""
    found = {name: bundled_or_none(alias) for name, alias in PANEL_ASSETS.get(module, {}).items()}
    return {name: p for name, p in found.items() if p is not None}


def or_bundled(path, alias: str) -> str | None:
    """``path`` when one was chosen, else the bundled asset ``alias`` (None when it is not installed)."""
    if not unset(path):
        return str(path)
    p = bundled_or_none(alias)
    return None if p is None else str(p)
