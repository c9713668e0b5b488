"""Data shipped inside the package: the bundled models (``models/``: X2B demo and skeleton models, a
SPIDER model, X2BR's detector and template library, their cards; the registry is ``registry``), the sample
CT (``sample/``, see its README for licence and attribution) and TotalSegmentator's label table."""

from __future__ import annotations

from pathlib import Path

from .registry import (ASSETS, DEFAULT_BONE_MODEL, MODEL_ALIASES, asset_arg, bundled, bundled_or_none, card,  # noqa: F401
                      cards, listing, model_arg)

#: What ``--model`` accepts for the bundled demo model.
DEMO_ALIAS = "demo"
DEMO_MODEL = ASSETS[DEMO_ALIAS].file


def bundled_model() -> Path:
    """Path of the bundled bone model ``x2recon demo`` and the X2BoneRecon panel use by default
    (``DEFAULT_BONE_MODEL``); not a clinical model."""
    return bundled(DEFAULT_BONE_MODEL)
