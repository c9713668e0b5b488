"""What the ``x2recon`` command modules share: list-option parsers and the progress reporter."""

from __future__ import annotations


def floats(s: str) -> list[float]:
    """``"1,2.5"`` → ``[1.0, 2.5]`` (empty string → ``[]``)."""
    return [float(x) for x in s.split(",") if x.strip()] if s else []


def ints(s: str) -> list[int]:
    """``"16,32"`` → ``[16, 32]``."""
    return [int(x) for x in s.split(",") if x.strip()]


def views(s: str) -> list[str]:
    """``"ap, lat"`` → ``["AP", "LAT"]``."""
    return [v.strip().upper() for v in s.split(",") if v.strip()]


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
