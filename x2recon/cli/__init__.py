"""The ``x2recon`` command line.

Subcommands (``x2recon <command> --help`` explains each):
  build-dataset   CT scans (+ labelmaps) → training dataset: meshes, occupancy, DRRs, boxes
  drr             render one DRR (16-bit PNG + geometry JSON) from a CT
  manifest        re-aggregate a dataset's manifest, splits and dataset.yaml (after sharded runs)
  train           train X2B / X2B2 / SPIDER / the X2BR detector on a dataset (one GPU, torchrun/DDP, or CPU; resumable)
  reconstruct     X-ray(s) → bone mesh (MISE) with a trained model
  spider          frontal + lateral X-rays → CT volume and labelmap (SPIDER)
  evaluate        a model on a dataset split: per-case CSV and the papers' tables
  info            a checkpoint's config
  demo            the whole pipeline on the bundled sample data with the bundled demo model
  register        move a source mesh onto a target: CPD, BCPD, GBCPD/GBCPD++ (template refinement)
  template        build X2BR's template library from a dataset's meshes (+ SKEL meshes you have)
  detect          vertebrae/rib boxes on an X-ray with a YOLOv9 detector ('train detector' trains one)
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import CancelledError, X2ReconInputError

#: command modules, each with ``add_parsers(sub)``; order = order in ``x2recon --help``
COMMAND_MODULES = ("dataset", "train", "x2b", "spider", "evaluate", "info", "demo", "register", "x2br")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(
        prog="x2recon",
        description="3D anatomy from plain X-rays: datasets from CT, training, bone reconstruction, evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'x2recon <command> --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"x2recon {__version__}")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    try:
        return a.func(a)
    except (X2ReconInputError, ValueError) as e:
        print(f"x2recon {a.command}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, CancelledError):
        print(f"x2recon {a.command}: cancelled; run the same command again to resume", file=sys.stderr)
        return 130

