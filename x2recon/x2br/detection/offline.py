"""The one door to ultralytics: configured to work offline *before* it is imported.

ultralytics decides at import time whether it is online (a DNS lookup), where its settings live
(``YOLO_CONFIG_DIR``) and whether analytics are sent; its dataset check downloads ``Arial.ttf``
when that font is not in its config folder.  So every import of ultralytics in X2Recon goes
through :func:`import_ultralytics`, which first

* sets ``YOLO_OFFLINE=1`` (``is_online()`` returns False without touching the network) and
  ``YOLO_AUTOINSTALL=False`` (no ``pip install`` of missing requirements);
* points ``YOLO_CONFIG_DIR`` at a folder X2Recon owns (``config_dir`` argument, else
  ``$X2RECON_YOLO_CONFIG_DIR``, else ``<user cache>/x2recon/ultralytics``: ``$XDG_CACHE_HOME`` or
  ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows);
* copies a TrueType font that is already on disk (matplotlib's DejaVu Sans, which ultralytics'
  own matplotlib dependency ships, else a system DejaVu/Liberation font) there as ``Arial.ttf``
  and ``Arial.Unicode.ttf`` — both into that folder and into the ``Ultralytics/`` sub-folder that
  ultralytics actually uses as its ``USER_CONFIG_DIR``.  Nothing is ever downloaded;

and after the import turns settings sync, analytics and every third-party logger (ClearML, Comet,
DVC, MLflow, Ray Tune, TensorBoard, W&B) off in that private settings file.  Ultralytics' notice that it
created (or migrated) its settings file, with its ``yolo settings`` advice, is dropped: the file is ours.  Training then runs
with ``amp=False`` (the AMP check downloads a model), ``plots=False`` and ``pretrained=False``,
from a model yaml (:data:`TRAIN_OVERRIDES`), and our trainer callbacks drop ultralytics' Platform
and analytics callbacks (:func:`strip_online_callbacks`).

If ultralytics was already imported by someone else, the environment can no longer change its
import-time decisions: the font is placed into its config folder anyway, sync and analytics are
switched off on the live objects, and a warning says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

#: Arguments every ultralytics training call gets (DESIGN.md, "Installing": ultralytics offline).
TRAIN_OVERRIDES = dict(amp=False, plots=False, pretrained=False)

#: The settings we switch off (the file lives in our private config folder).
_SETTINGS_OFF = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb",
                 "vscode_msg", "openvino_msg")

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")

_configured: Path | None = None


def default_config_dir() -> Path:
    """``$X2RECON_YOLO_CONFIG_DIR`` or ``<user cache dir>/x2recon/ultralytics``."""
    env = os.environ.get("X2RECON_YOLO_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "x2recon" / "ultralytics"


def find_font() -> Path:
    """A TrueType font already on this machine (never downloaded): matplotlib's DejaVu Sans first."""
    import importlib.util

    candidates: list[Path] = []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "/System/Library/Fonts",
                 "C:/Windows/Fonts"):
        r = Path(root)
        if r.is_dir():
            for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf"):
                candidates += sorted(r.rglob(name))[:1]
    for c in candidates:
        if c.is_file() and c.stat().st_size > 0:
            return c
    raise RuntimeError("no TrueType font found on this machine (looked for matplotlib's DejaVuSans.ttf and "
                       "system DejaVu/Liberation fonts); ultralytics would try to download Arial.ttf — install "
                       "matplotlib or a DejaVu font package")


def place_fonts(folder: Path) -> list[Path]:
    """Copy a local font into ``folder`` as ``Arial.ttf`` and ``Arial.Unicode.ttf`` (if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    font = None
    out = []
    for name in FONT_NAMES:
        dst = folder / name
        if not (dst.is_file() and dst.stat().st_size > 0):
            font = font or find_font()
            tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(font, tmp)
            os.replace(tmp, dst)
        out.append(dst)
    return out


def configure_environment(config_dir: str | Path | None = None) -> Path:
    """Set the environment ultralytics reads at import; place the fonts.  Returns the config folder.

    Call before ultralytics is imported (``import_ultralytics`` does).  Idempotent.
    """
    folder = Path(config_dir).expanduser() if config_dir else default_config_dir()
    folder = folder.resolve()
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    if sys.modules.get("ultralytics") is None:  # None: an import that failed or was blocked, not an imported one
        os.environ["YOLO_CONFIG_DIR"] = str(folder)
    # ultralytics uses YOLO_CONFIG_DIR/Ultralytics as its config folder; put the font in both
    place_fonts(folder)
    place_fonts(folder / "Ultralytics")
    return folder


def _settle(ul) -> None:
    """After import: settings sync, analytics and integrations off; the font where it looks."""
    from ultralytics import utils as U

    place_fonts(Path(U.USER_CONFIG_DIR))
    try:
        current = {k: U.SETTINGS.get(k) for k in _SETTINGS_OFF}
        if any(v is not False for v in current.values()):
            U.SETTINGS.update({k: False for k in _SETTINGS_OFF})
    except Exception as e:  # a read-only settings file: the live objects below still go off
        warnings.warn(f"could not update ultralytics settings ({e}); analytics are disabled in this process only")
    U.ONLINE = False
    try:
        from ultralytics.utils import events

        events.events.enabled = False
    except Exception:
        pass


class _SettingsNotice(logging.Filter):
    """Drops ultralytics' first-import notice about its settings file ("Creating new Ultralytics Settings …
    'yolo settings' …"): the file is x2recon's private one (``YOLO_CONFIG_DIR``), set by ``_settle``, so the
    ``yolo settings`` advice does not apply to x2recon's users."""

    NOTICES = ("Creating new Ultralytics Settings", "Ultralytics settings updated to the latest schema")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def import_ultralytics(config_dir: str | Path | None = None):
    """Import ultralytics configured for offline use (see the module doc); returns the module."""
    global _configured
    if config_dir is None and _configured is not None:
        config_dir = _configured  # later calls keep the folder the first one chose
    already = sys.modules.get("ultralytics") is not None
    folder = configure_environment(config_dir)
    if already and _configured is None:
        warnings.warn("ultralytics was imported before x2recon configured it: its online check and config folder "
                      "were decided at that import; x2recon switched analytics and sync off and placed the font, "
                      "but import x2recon.x2br.detection first to keep ultralytics fully offline")
    from ...deps import import_torchvision, require

    import_torchvision()  # ultralytics imports it: a build for another torch is named here, not inside ultralytics
    quiet = _SettingsNotice()
    logger = logging.getLogger("ultralytics")  # the logger ultralytics configures at import (getLogger is shared)
    logger.addFilter(quiet)
    try:
        ultralytics = require("ultralytics", "x2br", "the YOLO detector (X2BR)")
    finally:
        logger.removeFilter(quiet)
    if _configured is None or not already:
        _settle(ultralytics)
    _configured = folder
    return ultralytics


def strip_online_callbacks(trainer) -> None:
    """Remove ultralytics' Platform upload and analytics callbacks from a trainer (in place)."""
    for event, fns in trainer.callbacks.items():
        fns[:] = [f for f in fns if not getattr(f, "__module__", "").startswith(
            ("ultralytics.utils.callbacks.platform", "ultralytics.utils.events", "ultralytics.hub"))]
