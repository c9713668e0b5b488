"""The ``x2recon`` command line.

Subcommands (``x2recon <command> --help`` explains each):
  build-dataset   CT scans (+ labelmaps) → training dataset: meshes, occupancy, DRRs, boxes
  drr             render one DRR (16-bit PNG + geometry JSON) from a CT
  manifest        re-aggregate a dataset's manifest, splits and dataset.yaml (after sharded runs)
  train           train X2B / X2B2 / SPIDER / the X2BR detector on a dataset (one GPU, torchrun/DDP, or CPU; resumable)
  reconstruct     X-ray(s) → bone mesh (MISE) with a trained model
  spider          frontal + lateral X-rays → CT volume and labelmap (SPIDER)
  evaluate        a model on a dataset split: per-case CSV and the papers' tables
  compare         two mesh files: IoU, Chamfer-L1, F-score, NC, maxe/maye/maze (paper or world protocol)
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

#: commands that pick up where an interrupted run stopped (finished cases, the last checkpoint); only these
#: say "run the same command again to resume" when cancelled
RESUMABLE = ("build-dataset", "train")
#: command modules, each with ``add_parsers(sub)``; order = order in ``x2recon --help``
COMMAND_MODULES = ("dataset", "train", "x2b", "spider", "evaluate", "compare", "info", "demo", "register", "x2br")


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
    _one_help_style(sub)
    return p


def _one_help_style(sub) -> None:
    """Every (sub)command parser formats its help alike (``common.HelpFormatter``), and one without a
    description shows its one-line help as the description."""
    from .common import HelpFormatter

    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, parser in sub.choices.items():
        parser.formatter_class = HelpFormatter
        if not parser.description and helps.get(name):
            parser.description = helps[name][:1].upper() + helps[name][1:] + "."
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _one_help_style(action)


def main(argv: list[str] | None = None) -> int:
    """Run one command.  Expected failures — bad input (``X2ReconInputError``, ``CheckpointError``), a
    file that cannot be read or written (``OSError``), a ``ValueError`` that x2recon raised itself to
    reject a value — print ``x2recon <command>: error: ...`` and return 2; anything else (a bug) keeps
    its traceback."""
    _writable_stdout()
    parser = build_parser()
    try:
        try:
            a = parser.parse_args(argv)
        except SystemExit:  # --help, --version, usage errors: flush here so a closed pipe is caught below
            sys.stdout.flush()
            raise
        if not getattr(a, "func", None):
            parser.print_help()
            sys.stdout.flush()
            return 2
        if argv is not None:  # called from Python (a test, a script): its own warning handling stays
            return _run(a)
        import warnings

        with warnings.catch_warnings():  # the console command: restored on return
            warnings.showwarning = _one_line_warning(a)
            return _run(a)
    except BrokenPipeError:
        _silence_stdout()
        return 141  # as if killed by SIGPIPE, which is what a reader that stops early means


def _run(a) -> int:
    """The command, with the expected failures turned into one-line errors (see ``main``)."""
    try:
        code = a.func(a)
        sys.stdout.flush()  # a closed pipe (x2recon info ... | head -1) fails here, not at exit
        return code
    except BrokenPipeError:
        raise
    except (KeyboardInterrupt, CancelledError):
        again = "; run the same command again to resume" if a.command in RESUMABLE else ""
        print(f"x2recon {_command(a)}: cancelled{again}", file=sys.stderr)
        return 130
    except (X2ReconInputError, OSError) as e:  # BrokenPipeError (an OSError) is re-raised above
        return _error(a, e)
    except ValueError as e:
        if not _raised_by_x2recon(e):
            raise
        return _error(a, e)


def _error(a, e: BaseException) -> int:
    if isinstance(e, OSError) and not isinstance(e, X2ReconInputError):
        where = f"{e.filename}: " if e.filename else ""
        text = where + (e.strerror or str(e))
    else:
        text = str(e)
    from ..errors import without_numpy_reprs

    print(f"x2recon {_command(a)}: error: {without_numpy_reprs(text)}", file=sys.stderr)
    return 2


def _one_line_warning(a):
    """``warnings.showwarning`` for the console: ``x2recon <command>: warning: <message>`` on stderr, one line,
    instead of Python's ``file:line: UserWarning:`` with the source line of the library that warned."""

    def show(message, category, filename, lineno, file=None, line=None):
        from ..errors import without_numpy_reprs

        print(f"x2recon {_command(a)}: warning: {without_numpy_reprs(str(message))}", file=file or sys.stderr)

    return show


def _command(a) -> str:
    """The command as typed, with its sub-command ("train x2b", "template build"), as argparse names it."""
    return " ".join(str(p) for p in (a.command, getattr(a, "network", None), getattr(a, "template_command", None)) if p)


def _raised_by_x2recon(e: BaseException) -> bool:
    """True when the innermost frame of ``e``'s traceback is x2recon's own code — a deliberate
    ``raise ValueError(...)`` about a value — not numpy, torch or another library failing inside."""
    from pathlib import Path

    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    package = Path(__file__).resolve().parents[1]
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def _writable_stdout() -> None:
    """Under a locale whose encoding cannot write x2recon's text (``LC_ALL=C`` without Python's UTF-8 mode:
    ASCII), characters stdout cannot encode (—, ³, ×, a non-ASCII file name) come out as backslash escapes,
    as Python's stderr already does, instead of failing the command."""
    enc = getattr(sys.stdout, "encoding", None)
    try:
        "—×³τ".encode(enc or "utf-8")
    except (UnicodeEncodeError, LookupError):
        try:
            sys.stdout.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # a replaced stdout without reconfigure: leave it
            pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not report the broken pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests): nothing to flush
        pass
