"""Shared fixtures: the one way tests reach ../shared/data (nothing downloads at run time)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """``$X2RECON_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("X2RECON_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "shared" / "data", here.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return here.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.fail(f"shared test data not found at {d} (set X2RECON_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def chest_half(shared_data):
    """(ct_path, labels_path) of the half-resolution chest CT (fast tests)."""
    return shared_data / "chest_lidc0001_half" / "ct.nii.gz", shared_data / "chest_lidc0001_half" / "labels.nii.gz"


@pytest.fixture(scope="session")
def chest_full(shared_data):
    return shared_data / "chest_lidc0001" / "ct.nii.gz", shared_data / "chest_lidc0001" / "labels.nii.gz"
