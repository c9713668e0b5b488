"""DRR rendering (exact Siddon; Triton on CUDA, torch on CPU), display mapping, box labels."""

from .render import DRRImage, read_drr, render_drr, write_drr
from .siddon import line_integrals

__all__ = ["DRRImage", "render_drr", "write_drr", "read_drr", "line_integrals"]
