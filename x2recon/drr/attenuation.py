"""Hounsfield units → linear attenuation coefficient μ (1/mm) for DRR rendering.

The Hounsfield scale is defined by the linear attenuation of water and air at the scanner's
effective energy: ``HU = 1000 (μ − μ_water) / (μ_water − μ_air)``.  Inverting it gives μ for any
energy at which the references are taken.  A DRR imitates a radiograph, so we take the references
at a chest-radiography effective energy (~70 keV): μ_water ≈ 0.0193 /mm (NIST XCOM, 0.193 cm²/g ×
1 g/cm³), μ_air ≈ 2.2e-5 /mm.  This linear model ignores that bone's attenuation grows faster than
water's towards lower energies (it is exact only at the CT's own effective energy); for a
display DRR that only sets the bone/soft-tissue contrast slightly, and it keeps the map monotone.

Values below air (padding at −2048 or −3024 HU, reconstruction artefacts) would give negative μ:
they are clipped at 0, so the outside of the scan field contributes nothing.
"""

from __future__ import annotations

#: Effective linear attenuation of water at a chest-radiography effective energy (~70 keV), 1/mm.
MU_WATER = 0.0193
#: Of air at the same energy (negligible but kept so that −1000 HU maps to air, not below it).
MU_AIR = 0.0000223


def check_references(mu_water: float, mu_air: float) -> None:
    """Reject references that would not give a monotone, non-negative map."""
    if not (mu_water > 0 and 0 <= mu_air < mu_water):
        raise ValueError(f"need 0 <= mu_air < mu_water, got mu_water={mu_water}, mu_air={mu_air}")


def hu_to_mu(hu, mu_water: float = MU_WATER, mu_air: float = MU_AIR):
    """μ = μ_w + HU/1000 · (μ_w − μ_a), clipped at 0 (numpy arrays, torch tensors or floats).

    Floating inputs keep their dtype; integer inputs (int16 CT) become float32 (numpy) or the
    default float dtype (torch).
    """
    check_references(mu_water, mu_air)
    scale = (mu_water - mu_air) / 1000.0
    if hasattr(hu, "is_floating_point"):  # torch tensor
        x = hu if hu.is_floating_point() else hu.float()
        return (x * scale + mu_water).clamp_(min=0.0)
    if hasattr(hu, "dtype"):  # numpy array / scalar
        import numpy as np

        x = hu if np.issubdtype(hu.dtype, np.floating) else np.asarray(hu, dtype=np.float32)
        return np.maximum(x * x.dtype.type(scale) + x.dtype.type(mu_water), 0)
    return max(float(hu) * scale + mu_water, 0.0)


def mu_to_hu(mu, mu_water: float = MU_WATER, mu_air: float = MU_AIR):
    """The inverse of :func:`hu_to_mu` above the clipping point (for checks and SPIDER targets)."""
    check_references(mu_water, mu_air)
    return (mu - mu_water) * (1000.0 / (mu_water - mu_air))
