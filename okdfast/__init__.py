"""okdfast: online knowledge distillation via multi-branch diversity enhancement (Li et al., ACCV 2020), fast.

    import okdfast
    loss = okdfast.functional.online_kd_loss(logits, target)      # (B, K, C) branch logits
    criterion = okdfast.losses.OnlineKDLoss(temperature=3.0)

Training: ``python -m okdfast.train --help``; evaluation: ``python -m okdfast.evaluate RUN/best.pt``.

Shadowing. A folder named ``okdfast`` on ``sys.path`` before the installed package takes its place: with an
``__init__.py`` (another copy of the package, e.g. a second clone's) it is imported instead, which this file
detects and warns about, naming both folders (:func:`installed_location`); without one (a clone's root folder,
beside a script that runs there) Python makes it an empty namespace package, this file never runs, and
``okdfast.functional`` is an AttributeError: the README's install section says what to do.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from okdfast import functional, losses  # noqa: F401  (the public loss API; registers the torch.library ops)

__version__ = "0.1.0"
__all__ = ["functional", "losses", "__version__"]

HERE = Path(__file__).resolve().parent


class ShadowingWarning(UserWarning):
    """okdfast was imported from another folder than the one pip installed."""


def installed_location() -> Path | None:
    """The folder of the okdfast package pip installed (an editable install: its project's ``okdfast/``); None
    when okdfast is not installed (run from a source tree on ``sys.path``)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("okdfast")
    except metadata.PackageNotFoundError:
        return None
    direct_url = dist.read_text("direct_url.json")
    if direct_url:  # pip install -e / pip install PATH: the project folder
        info = json.loads(direct_url)
        if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
            from urllib.parse import unquote, urlparse

            return Path(unquote(urlparse(info["url"]).path)).resolve() / "okdfast"
    located = Path(str(dist.locate_file("okdfast/__init__.py")))
    return located.resolve().parent if located.exists() else None


def shadowing_message(here: Path = HERE, installed: Path | None = None) -> str | None:
    """The warning when this package (``here``) is not the installed one, else None."""
    installed = installed_location() if installed is None else installed
    if installed is None or installed == here or not (installed / "__init__.py").is_file():
        return None  # not installed, this very copy, or an install whose folder is gone (a copied virtualenv)
    return (
        f"okdfast was imported from {here}, a folder named okdfast that comes before the installed package on "
        f"sys.path, not from the installed {installed}: run from another folder, or install this copy "
        f"(pip install -e {here.parent})"
    )


def _warn_if_shadowed() -> None:
    try:
        message = shadowing_message()
    except Exception:  # an unreadable install record never stops the import
        return
    if message:
        warnings.warn(message, ShadowingWarning, stacklevel=3)


_warn_if_shadowed()
