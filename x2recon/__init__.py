"""X2Recon: 3D anatomy from plain X-rays (headless core of the 3D Slicer extension)."""

__version__ = "0.1.0"
