"""What the ``x2recon`` command modules share: list-option parsers and the progress reporter."""

from __future__ import annotations

import argparse


def floats(s: str) -> list[float]:
    """``"1,2.5"`` → ``[1.0, 2.5]`` (empty string → ``[]``)."""
    return [float(x) for x in s.split(",") if x.strip()] if s else []


def ints(s: str) -> list[int]:
    """``"16,32"`` → ``[16, 32]``."""
    return [int(x) for x in s.split(",") if x.strip()]


def views(s: str) -> list[str]:
    """``"ap, lat"`` → ``["AP", "LAT"]``."""
    return [v.strip().upper() for v in s.split(",") if v.strip()]


PRESETS = ("ours", "paper")


def add_preset_option(parser, what: str) -> None:
    """``--preset ours|paper``: ``paper`` sets every value ``what`` names; explicit flags still win."""
    parser.add_argument("--preset", default="ours", choices=PRESETS,
                        help=f"ours: our defaults; paper: every value {what} (docs/training.md: 'Defaults that "
                             "differ from the papers'). Options given explicitly override the preset")


def preset_help(table: dict, dest: str, text: str = "") -> str:
    """Help text ending in the option's value under each preset."""
    ours, paper = table[dest]["ours"], table[dest]["paper"]
    tail = f"ours: {ours}" + (f"; --preset paper: {paper}" if paper != ours else "; the paper's too")
    return f"{text} ({tail})" if text else f"({tail})"


def apply_preset(a, table: dict) -> None:
    """Fill each option of ``table`` the user did not give (defined with ``default=argparse.SUPPRESS``)
    with its value under ``a.preset``."""
    for dest, values in table.items():
        if getattr(a, dest, None) is None:
            setattr(a, dest, values[a.preset])


def default_workers() -> int:
    """Data-loading processes per training process: the CPU cores this process may use, shared among
    torchrun's local processes (``LOCAL_WORLD_SIZE``), less one for the training loop, at most 4
    (2 cores, one process → 1)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1))


class ProgressLines:
    """tqdm bar, or machine-readable ``X2RECON_PROGRESS <percent> <message>`` lines (Slicer panel)."""

    def __init__(self, lines: bool, quiet: bool, desc: str = "reconstruct"):
        self.lines, self.bar, self.last = lines, None, -1
        if not lines and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=desc, unit="%", dynamic_ncols=True)

    def __call__(self, fraction: float, message: str) -> None:
        pct = int(round(100 * fraction))
        if self.lines:
            if pct != self.last:
                print(f"X2RECON_PROGRESS {pct} {message}", flush=True)
        elif self.bar is not None:
            self.bar.update(max(0, pct - self.bar.n))
            self.bar.set_postfix_str(message)
        self.last = pct

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------ option types (argparse ``type=``)
# Each raises ``argparse.ArgumentTypeError``, so argparse names the option: "argument --steps: ...".


def _number(kind, s: str):
    import argparse

    try:
        v = kind(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {s!r}") \
            from None
    if kind is float and v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _check(ok: bool, s: str, what: str):
    import argparse

    if not ok:
        raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")


def positive_int(s: str) -> int:
    """A whole number ≥ 1."""
    v = _number(int, s)
    _check(v >= 1, s, "a whole number ≥ 1")
    return v


def non_negative_int(s: str) -> int:
    """A whole number ≥ 0 (0 usually means "off" or "automatic")."""
    v = _number(int, s)
    _check(v >= 0, s, "a whole number ≥ 0")
    return v


def positive_float(s: str) -> float:
    """A finite number > 0."""
    v = _number(float, s)
    _check(v > 0, s, "a number > 0")
    return v


def non_negative_float(s: str) -> float:
    """A finite number ≥ 0."""
    v = _number(float, s)
    _check(v >= 0, s, "a number ≥ 0")
    return v


def float_in(lo: float, hi: float, unit: str = ""):
    """An option type: a finite number in [``lo``, ``hi``] (``unit`` shown in the message, e.g. "HU")."""
    def parse(s: str) -> float:
        v = _number(float, s)
        _check(lo <= v <= hi, s, f"a number in {lo:g}…{hi:g}{' ' + unit if unit else ''}")
        return v

    parse.__name__ = "number"  # argparse names the type in "invalid number value" messages
    return parse


def box_size(s: str) -> float:
    """``--box-size``: a reconstruction cube edge in mm within ``geometry.BOX_SIZE_RANGE_MM``."""
    from ..geometry import BOX_SIZE_RANGE_MM

    return float_in(*BOX_SIZE_RANGE_MM, "mm")(s)


def distance_mm(s: str) -> float:
    """``--sdd``/``--sod``: a source distance in mm within ``geometry.DISTANCE_RANGE_MM``."""
    from ..geometry import DISTANCE_RANGE_MM

    return float_in(*DISTANCE_RANGE_MM, "mm")(s)


def detector_mm(s: str) -> float:
    """``--detector-mm``: a detector width in mm within ``geometry.DETECTOR_RANGE_MM``."""
    from ..geometry import DETECTOR_RANGE_MM

    return float_in(*DETECTOR_RANGE_MM, "mm")(s)


def view_name(s: str) -> str:
    """A view of an X-ray: AP, PA, LAT or a finite angle in degrees (``1e309`` is refused here, not deep inside)."""
    import argparse

    from ..geometry import ProjectionGeometry

    try:
        ProjectionGeometry.from_view(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def probability(s: str) -> float:
    """A number in [0, 1] (thresholds, fractions, confidences)."""
    v = _number(float, s)
    _check(0 <= v <= 1, s, "a number in [0, 1]")
    return v


def probability_below_one(s: str) -> float:
    """A number in [0, 1) (an outlier probability)."""
    v = _number(float, s)
    _check(0 <= v < 1, s, "a number in [0, 1)")
    return v


def mise_resolution(s: str) -> int:
    """A MISE grid: 32·2^k (32, 64, 128, 256, 512, ...)."""
    v = _number(int, s)
    if not (v >= 32 and (v // 32) & (v // 32 - 1) == 0 and v % 32 == 0):
        raise argparse.ArgumentTypeError(f"the MISE resolution must be 32·2^k (32, 64, 128, 256, 512), got {s!r}")
    return v


def device(s: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CUDA only where torch sees a GPU (checked when asked for)."""
    import argparse
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {s!r}")
    if s.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{s}: torch sees no CUDA GPU here (use cpu or auto)")
        if ":" in s and int(s.split(":")[1]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s}: torch sees {torch.cuda.device_count()} GPU(s)")
    return s


def _probe_writable(folder, path) -> None:
    """Create (and drop) an unnamed file in ``folder``: the one test of "can we write here" that also
    holds for root, read-only mounts and full ACLs."""
    import argparse
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{path}: cannot write in {folder} ({e.strerror or e})") from None


def _existing_ancestor(p, shown):
    """The nearest folder of ``p`` (itself included) that exists; a file or broken link on the way is an error."""
    import argparse

    q = p
    while not q.exists():
        if q.is_symlink():
            raise argparse.ArgumentTypeError(f"{shown}: {q} is a broken link")
        q = q.parent
    if not q.is_dir():
        raise argparse.ArgumentTypeError(f"{shown}: {q} is a file, not a folder")
    return q


def output_file(s: str):
    """A file to write: not a folder, inside a folder that exists (or can be made) and is writable."""
    import argparse
    from pathlib import Path

    p = Path(s).expanduser()
    if not s.strip():
        raise argparse.ArgumentTypeError("needs a file name")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{p}: is a folder; give a file name")
    _probe_writable(_existing_ancestor(p.parent, p), p)
    return s


def output_dir(s: str):
    """A folder to write into: not a file, and it or the folder it will be made in is writable."""
    import argparse
    from pathlib import Path

    p = Path(s).expanduser()
    if not s.strip():
        raise argparse.ArgumentTypeError("needs a folder name")
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{p}: is a file, not a folder")
    _probe_writable(_existing_ancestor(p, p), p)
    return s


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every ``x2recon`` parser's help: "(default: X)" added once — not when the help already says its
    default or there is none to show (None, False, "") — and descriptions wrapped per line, so line
    breaks written into a description stay."""

    def _get_help_string(self, action):
        text, d = action.help or "", action.default
        if "default" in text.lower() or d is None or d is False or d is argparse.SUPPRESS or d == "":
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        import textwrap

        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         if line.strip() else "" for line in text.splitlines())


def resume(s: str) -> str:
    """``--resume``: ``auto``, ``never``, or an x2recon checkpoint to start from (checked now, not after
    the dataset has loaded)."""
    if s in ("auto", "never"):
        return s
    from ..nn.checkpoint import CheckpointError, read_config

    try:
        read_config(s)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(f"auto, never, or a checkpoint: {e}") from None
    return s


def add_training_run_options(p, val_every: int) -> None:
    """The ``running`` options every ``train <network>`` shares (device, precision, loaders, splits,
    validation and checkpoint cadence, resume); ``val_every``: the network's default epochs between
    validations."""
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", type=device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument("--workers", type=non_negative_int, default=default_workers(),
                   help="data-loading processes per training process "
                        "(default: CPU cores − 1, at most 4: %(default)s here)")
    g.add_argument("--threads", type=non_negative_int, default=0, help="CPU threads per process (0: torch's default)")
    g.add_argument("--train-split", default="train", help="split to train on (splits/<name>.txt)")
    g.add_argument("--val-split", default="val", help="'' to skip validation")
    g.add_argument("--val-every", type=positive_int, default=val_every, help="epochs between validations")
    g.add_argument("--save-every", type=non_negative_int, default=500, help="steps between checkpoints (0: at epoch ends only)")
    g.add_argument("--resume", default="auto", type=resume, help="auto (continue --out), never, or a checkpoint to start from")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def refuse_colliding_paths(outputs: dict, inputs: dict | None = None) -> None:
    """Before any work, refuse outputs that would overwrite each other or one of the command's inputs
    (``--out same.stl --render same.stl``).  ``outputs`` / ``inputs`` map what names a file (an option, or
    a file written beside one) to its path (None: not given).  Paths are compared resolved (``~``, ``..``,
    links) and, where they exist, as the same file on disk (hard links, case-insensitive file systems)."""
    import os
    from pathlib import Path

    from ..errors import X2ReconInputError

    def same(p, q) -> bool:
        if p.expanduser().resolve() == q.expanduser().resolve():
            return True
        try:
            return os.path.samefile(p, q)
        except OSError:  # one of them does not exist yet
            return False

    seen: list[tuple[str, Path]] = []
    for name, p in outputs.items():
        if p is None:
            continue
        p = Path(p)
        for other, q in seen:
            if same(p, q):
                raise X2ReconInputError(p, f"{other} and {name} name the same file: one would overwrite the "
                                           "other; give them different names")
        seen.append((name, p))
    for name, p in (inputs or {}).items():
        if p is None:
            continue
        for other, q in seen:
            if same(Path(p), q):
                raise X2ReconInputError(p, f"{other} would overwrite the input {name}; give it another name")


def output_file_of(kind: str, suffixes: tuple[str, ...]):
    """An option type: an ``output_file`` whose name ends in one of ``suffixes`` (any case), so a format
    x2recon cannot write is refused before any work, naming the ones it can."""
    def parse(s: str):
        if not s.lower().endswith(tuple(x.lower() for x in suffixes)):
            raise argparse.ArgumentTypeError(f"{s}: x2recon cannot write a {kind} in this format; use one of "
                                             f"{', '.join(suffixes)}")
        return output_file(s)

    parse.__name__ = f"{kind} file"  # argparse names the type in "invalid ... value" messages
    return parse
