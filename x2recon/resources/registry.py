"""The models shipped in ``x2recon/resources/models``: one registry of aliases → files, and their cards.

Every command and Slicer panel that needs a model, detector or template library defaults to the bundled
one through this registry, so a clone runs end to end without training anything.  ``cards.json`` beside
the files holds one card per alias: what the asset is, what it was trained on, how it was made, and its
held-out figures (or why there are none).  None of these is a clinical model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import X2ReconInputError

#: The folder of the bundled assets (tests point it elsewhere with monkeypatch).
MODELS_DIR = Path(__file__).resolve().parent / "models"
CARDS_FILE = "cards.json"
#: Keys every card has (``preset`` may be given as ``recipe``); ``not_clinical`` must be ``true``.
CARD_KEYS = ("file", "what", "trained_on", "structures", "geometry", "preset", "command", "held_out",
             "not_clinical", "measured_on")


@dataclass(frozen=True)
class Asset:
    """One bundled asset: ``file`` under ``MODELS_DIR`` (a folder for a template library), its ``kind``
    (checkpoint, detector or templates), one line of what it is, and how a user replaces it."""

    alias: str
    file: str
    kind: str
    what: str
    replace: str

    @property
    def path(self) -> Path:
        return MODELS_DIR / self.file

    def present(self) -> bool:
        """The file is there (a template library: its ``library.json``)."""
        p = self.path
        return (p / "library.json").is_file() if self.kind == "templates" else p.is_file()

    def size_bytes(self) -> int:
        p = self.path
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size if p.is_file() else 0


ASSETS: dict[str, Asset] = {a.alias: a for a in (
    Asset("demo", "x2b_demo.safetensors", "checkpoint",
          "X2B demo: ribs, vertebrae and costal cartilages from one X-ray, trained on one patient's CT",
          "--model FILE (x2recon train x2b makes one)"),
    Asset("skeleton", "x2b_skeleton.safetensors", "checkpoint",
          "X2B: the whole skeleton (--structures skeleton) from one X-ray, trained on every shared patient",
          "--model FILE (x2recon train x2b on a --structures skeleton dataset makes one)"),
    Asset("spider", "spider_skeleton.safetensors", "checkpoint",
          "SPIDER: CT volume (HU) + skeleton labelmap from a frontal + lateral X-ray pair",
          "--model FILE (x2recon train spider makes one)"),
    Asset("detector", "detector.safetensors", "detector",
          "YOLOv9t detector of vertebrae and ribs on X-rays (X2BR's detection step)",
          "--detector FILE (x2recon train detector makes one)"),
    Asset("templates", "templates", "templates",
          "X2BR template library: one watertight mesh per vertebra and rib",
          "--templates FOLDER (x2recon template build makes one)"),
)}
#: Aliases ``--model`` accepts (network checkpoints).
MODEL_ALIASES = tuple(a for a, asset in ASSETS.items() if asset.kind == "checkpoint")
#: The bone model ``x2recon demo`` and the X2BoneRecon panel use when none is chosen: the one whose recipe
#: scored better on a patient it never saw (docs/training.md, "Cross-patient study"): on wholebody_tcga_thca the
#: skeleton recipe trained without it gave paper-protocol IoU 0.108 / Chamfer-L1 0.036 / F 0.37 against the
#: demo model's 0.091 / 0.044 / 0.30 (world: 12.0 vs 14.6 mm), both having seen only chest_lidc0001.
DEFAULT_BONE_MODEL = "skeleton"


def asset(alias: str) -> Asset:
    """The registry entry of ``alias``; an unknown alias names the known ones."""
    if alias not in ASSETS:
        raise X2ReconInputError(None, f"no bundled asset is called {alias!r}; bundled: {', '.join(ASSETS)}")
    return ASSETS[alias]


def bundled(alias: str) -> Path:
    """Path of the bundled asset ``alias``; a missing one fails naming the file and how to give your own."""
    a = asset(alias)
    if not a.present():
        raise X2ReconInputError(a.path, f"the bundled {alias!r} asset ({a.what}) is missing from this "
                                        f"installation; give your own with {a.replace}")
    return a.path


def bundled_or_none(alias: str) -> Path | None:
    """Path of the bundled asset ``alias`` when it is installed, else None (for defaults that may be absent)."""
    a = asset(alias)
    return a.path if a.present() else None


def model_arg(value: str) -> str:
    """A ``--model`` value: a checkpoint alias (``demo``, ``skeleton``, ``spider``) → the bundled file's
    path, unless a file of that name is in the working directory; anything else unchanged.  A missing
    bundled file fails as argparse reports a bad value (``argument --model: <path>: ...``)."""
    return _alias_arg(value, MODEL_ALIASES)


def asset_arg(value: str) -> str:
    """Like ``model_arg`` for every alias (``detector`` and ``templates`` too): what ``info`` takes."""
    return _alias_arg(value, tuple(ASSETS))


def detector_arg(value: str) -> str:
    """A ``--detector`` value: ``detector`` → the bundled detector's path (as ``model_arg``)."""
    return _alias_arg(value, ("detector",))


def _alias_arg(value: str, aliases: tuple[str, ...]) -> str:
    import argparse

    if value not in aliases and not Path(value).exists():
        near = close_alias(value, aliases)
        if near:  # a mistyped alias is not a missing file: name the alias it resembles
            raise argparse.ArgumentTypeError(f"{value}: no such file; did you mean the bundled {near!r}? "
                                             f"(aliases: {', '.join(aliases)})")
    if value not in aliases or Path(value).exists():
        return value
    try:
        return str(bundled(value))
    except X2ReconInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def close_alias(value: str, aliases: tuple[str, ...]) -> str | None:
    """The alias ``value`` looks like a typo of (difflib's closest match, case ignored), else None; only
    for a bare name (a path with a folder or a file suffix is meant as a file)."""
    import difflib

    if Path(value).name != value or Path(value).suffix:
        return None
    lower = {a.lower(): a for a in aliases}
    near = difflib.get_close_matches(value.lower(), list(lower), n=1, cutoff=0.6)
    return lower[near[0]] if near else None


def alias_of(path) -> str | None:
    """The alias whose bundled file ``path`` is (resolved paths compared), else None."""
    try:
        p = Path(path).resolve()
    except (OSError, TypeError):
        return None
    return next((a.alias for a in ASSETS.values() if a.path.resolve() == p), None)


def cards() -> dict:
    """All cards of ``cards.json``, checked: a JSON object of alias → card with every key of ``CARD_KEYS``,
    ``file`` the alias's file and ``not_clinical`` true.  Anything else fails naming the file."""
    f = MODELS_DIR / CARDS_FILE
    if not f.is_file():
        raise X2ReconInputError(f, "the bundled models' cards are missing from this installation")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise X2ReconInputError(f, f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise X2ReconInputError(f, "expected a JSON object of alias → card")
    for alias, c in doc.items():
        _check_card(f, alias, c)
    return doc


def _check_card(f: Path, alias: str, c) -> None:
    if alias not in ASSETS:
        raise X2ReconInputError(f, f"card {alias!r} names no bundled asset ({', '.join(ASSETS)})")
    if not isinstance(c, dict):
        raise X2ReconInputError(f, f"card {alias!r} is not a JSON object")
    missing = [k for k in CARD_KEYS if k not in c and not (k == "preset" and "recipe" in c)]
    if missing:
        raise X2ReconInputError(f, f"card {alias!r} lacks {', '.join(missing)}")
    if c["file"] != ASSETS[alias].file:
        raise X2ReconInputError(f, f"card {alias!r} is for {c['file']!r}, but the asset is {ASSETS[alias].file!r}")
    if c["not_clinical"] is not True:
        raise X2ReconInputError(f, f"card {alias!r}: not_clinical must be true (no bundled model is clinical)")


def card(alias: str) -> dict:
    """The card of the bundled asset ``alias`` (``cards``' checks; a missing card fails naming the alias)."""
    asset(alias)
    doc = cards()
    if alias not in doc:
        raise X2ReconInputError(MODELS_DIR / CARDS_FILE, f"has no card for {alias!r} (cards: {', '.join(doc) or 'none'})")
    return doc[alias]


def listing() -> list[dict]:
    """One row per bundled asset: alias, file (relative to the package), size in MB, what it is, present."""
    return [{"alias": a.alias, "file": f"x2recon/resources/models/{a.file}", "size_mb": round(a.size_bytes() / 1e6, 2),
             "what": a.what, "present": a.present()} for a in ASSETS.values()]
