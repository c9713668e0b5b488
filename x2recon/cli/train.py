"""``x2recon train <network>``: the group; each method's module adds its network's subcommand."""

from __future__ import annotations


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a network on a dataset (X2B, X2B2, SPIDER, the X2BR detector)",
                       description="Train a network (one GPU, many with torchrun, or CPU). Resumes from --out's "
                                   "last checkpoint when it exists.")
    tsub = t.add_subparsers(dest="network", metavar="<network>", required=True)
    from .spider import add_spider_train_parser
    from .x2b import add_x2b_train_parsers
    from .x2br import add_detector_train_parser

    add_x2b_train_parsers(tsub)
    add_spider_train_parser(tsub)
    add_detector_train_parser(tsub)
