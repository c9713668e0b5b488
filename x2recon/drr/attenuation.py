"""Hounsfield units → linear attenuation coefficient μ (1/mm)."""

from __future__ import annotations

#: Effective linear attenuation of water at a chest-radiography effective energy (~70 keV), 1/mm.
MU_WATER = 0.0193
#: Of air at the same energy (negligible but kept so that −1000 HU maps to air, not to zero).
MU_AIR = 0.0000223


def hu_to_mu(hu, mu_water: float = MU_WATER, mu_air: float = MU_AIR):
    """μ = μ_w + HU/1000 · (μ_w − μ_a), clipped at 0 (works on numpy arrays and torch tensors).

    The definition of HU gives exactly this inverse: HU = 1000 (μ − μ_w)/(μ_w − μ_a).
    """
    mu = mu_water + hu * ((mu_water - mu_air) / 1000.0)
    return mu.clip(min=0) if hasattr(mu, "clip") else max(mu, 0.0)
