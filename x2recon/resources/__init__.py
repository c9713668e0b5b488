"""Data shipped inside the package: the demo model (``models/x2b_demo.safetensors``), the sample CT
(``sample/``, see its README for licence and attribution) and TotalSegmentator's label table."""

from __future__ import annotations

from pathlib import Path

#: What ``--model`` accepts for the bundled demo model.
DEMO_ALIAS = "demo"
DEMO_MODEL = "x2b_demo.safetensors"


def bundled_model() -> Path:
    """Path of the bundled X2B demo model (a demo trained on one patient's CT, not a clinical model)."""
    from ..errors import X2ReconInputError

    p = Path(__file__).resolve().parent / "models" / DEMO_MODEL
    if not p.is_file():
        raise X2ReconInputError(p, "the bundled demo model is missing from this installation")
    return p


def model_arg(value: str) -> str:
    """A ``--model`` value: ``demo`` → the bundled demo model's path (unless a file of that name is
    in the working directory), anything else unchanged."""
    return str(bundled_model()) if value == DEMO_ALIAS and not Path(value).exists() else value
