"""What every registration returns: the moved source points, the transform, and how the fit went."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RegistrationResult:
    """Outcome of ``cpd``/``bcpd``/``gbcpd``; all arrays are numpy, in the inputs' units (mm).

    The transform fields that apply to the method are set, the others are ``None``:

    - rigid CPD: ``Y_hat = s·Y·Rᵀ + t``; affine CPD: ``Y_hat = Y·Bᵀ + t``;
      deformable CPD: ``Y_hat = Y + V``;
    - BCPD/GBCPD (Hirose's model ``T(y) = sR(y + v) + t``): ``Y_hat = s·(Y + V)·Rᵀ + t``, with
      ``V`` the displacement in source coordinates (with Hirose's affine model, ``B`` replaces ``sR``).
    """

    method: str
    Y_hat: np.ndarray  # (M, D) transformed source points
    sigma2: float  # final σ² (residual variance), input units²
    iterations: int
    converged: bool
    seconds: float
    R: np.ndarray | None = None  # (D, D) rotation
    t: np.ndarray | None = None  # (D,) translation
    s: float | None = None  # scale
    B: np.ndarray | None = None  # (D, D) affine matrix
    V: np.ndarray | None = None  # (M, D) displacement (see above for its frame)
    P1: np.ndarray | None = None  # (M,) expected number of target points matched to each source point
    match: np.ndarray | None = None  # (N,) most probable source index per target point (-1: outlier)
    match_prob: np.ndarray | None = None  # (N,) its posterior probability
    faces: np.ndarray | None = None  # source faces when the source was a mesh (kept for the output mesh)
    device: str = "cpu"
    dtype: str = "float64"
    params: dict = field(default_factory=dict)  # the parameters used (JSON-able)
    history: list = field(default_factory=list)  # σ² per iteration (input units²)
    info: dict = field(default_factory=dict)  # method-specific notes (rank kept, downsampled sizes, ...)

    def mesh(self):
        """The registered source as a ``trimesh.Trimesh`` (the source's faces); needs a mesh source."""
        import trimesh

        if self.faces is None or len(self.faces) == 0:
            raise ValueError("the source was a point set: there are no faces to build a mesh from")
        return trimesh.Trimesh(self.Y_hat, self.faces, process=False)

    def summary(self) -> dict:
        """JSON-able summary (no per-point arrays)."""
        out = {"method": self.method, "iterations": int(self.iterations), "converged": bool(self.converged),
               "sigma2": float(self.sigma2), "seconds": round(float(self.seconds), 4), "device": self.device,
               "dtype": self.dtype, "points": int(len(self.Y_hat))}
        if self.s is not None:
            out["s"] = float(self.s)
        for k in ("R", "t", "B"):
            v = getattr(self, k)
            if v is not None:
                out[k] = np.asarray(v).round(8).tolist()
        out.update({k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))})
        out["params"] = self.params
        return out
