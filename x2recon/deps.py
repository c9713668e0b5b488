"""Packages that may be missing or broken on a user's machine, checked where x2recon first needs them.

Two failures otherwise end in a traceback from inside a library, often after minutes of work:
an optional extra that is not installed (ultralytics for X2BR's detector), and a torchvision built
for another torch (what a CPU user gets with torch from one index and torchvision from PyPI), which
timm and ultralytics import.  Here each becomes one :class:`DependencyError` line saying what to install.
"""

from __future__ import annotations

import importlib

from .errors import X2ReconInputError


class DependencyError(X2ReconInputError):
    """A package x2recon needs is missing or unusable; the message says how to install it."""

    def __init__(self, problem: str):
        super().__init__(None, problem)

    def __reduce__(self):
        return type(self), (self.problem,)


def extra_hint(extra: str) -> str:
    """How to install one of x2recon's extras, installed from PyPI or from a source checkout."""
    return f'pip install "x2recon[{extra}]" (in a source checkout: pip install -e ".[{extra}]")'


def require(module: str, extra: str, purpose: str):
    """Import ``module`` (an optional extra's package) or raise :class:`DependencyError` naming the
    extra: "``purpose`` needs ``module``: pip install ..."."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DependencyError(f"{purpose} needs {module}, which is not installed ({e}): "
                              f"{extra_hint(extra)}") from None


def _installed_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(version unknown)"


def reinstall_torch_hint() -> str:
    """The pip command that installs torch and a matching torchvision from one index."""
    import torch

    base, _, local = torch.__version__.partition("+")
    index = local or ("cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", ""))
    return (f"pip install --force-reinstall torch=={base} torchvision --index-url "
            f"https://download.pytorch.org/whl/{index}")


def import_torchvision():
    """``torchvision``, or :class:`DependencyError` when it is installed but does not load with this torch
    (a build for another torch: "operator torchvision::nms does not exist", undefined symbols, ...).
    None when it is not installed at all (timm works without it)."""
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as e:
        if e.name == "torchvision":
            return None
        raise _torchvision_broken(e) from None
    except Exception as e:  # noqa: BLE001 - whatever a mismatched build raises at import
        raise _torchvision_broken(e) from None


def _torchvision_broken(e: BaseException) -> DependencyError:
    import torch

    return DependencyError(
        f"torchvision {_installed_version('torchvision')} does not load with torch {torch.__version__} "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the two must come from one release "
        f"and one index — reinstall them together: {reinstall_torch_hint()}")


def import_timm():
    """``timm`` (X2B's image encoders), with a broken torchvision (which timm imports) or a broken timm
    reported as a :class:`DependencyError` instead of a traceback from inside timm."""
    import_torchvision()
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise DependencyError(f"timm does not import ({e}): pip install --force-reinstall 'timm>=1.0'") from None
    except Exception as e:  # noqa: BLE001 - a library failing inside its own import
        raise DependencyError(f"timm {_installed_version('timm')} fails to import ({type(e).__name__}: {e}); "
                              "reinstall it: pip install --force-reinstall 'timm>=1.0'") from None
