"""Where data sets are looked for, where a download goes, how a missing one is reported, and the network guard of
the downloads.

Search order (the first place that holds the data set wins):

1. ``data_dir`` when given (only there);
2. else ``$OKDFAST_DATA`` (one folder, or several joined by ``os.pathsep``);
3. else ``./data`` (relative to the working directory) then ``~/.cache/okdfast/data``.

A download goes into :func:`download_root`: ``data_dir`` when given, else the first folder of ``$OKDFAST_DATA``,
else the cache folder ``~/.cache/okdfast/data``. The training CLI downloads a missing CIFAR-10/100 by itself
(:func:`download_by_default`) when it was told nowhere else to look (no ``--data-dir``, no ``$OKDFAST_DATA``);
``--no-download`` or ``OKDFAST_NO_DOWNLOAD=1`` keep it offline, ``--download`` asks for any data set anywhere.
Every network step has a timeout of ``NETWORK_TIMEOUT_S`` seconds (name resolution included, which ignores socket
timeouts and therefore runs in a daemon thread), so an offline machine fails in seconds with
:class:`DatasetNotFoundError`, never hangs.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from okdfast.errors import UserError

ENV_VAR = "OKDFAST_DATA"
NO_DOWNLOAD_ENV_VAR = "OKDFAST_NO_DOWNLOAD"  # 1: the CLI never downloads unless --download is given
CACHE_DIR = "~/.cache/okdfast/data"
DEFAULT_DIRS = ("./data", CACHE_DIR)
# What the CLI fetches by itself when it is missing: the data sets torchvision downloads with a progress bar and
# checks against their md5 (CINIC-10, ~690 MB from another host, only with --download).
DOWNLOADED_BY_DEFAULT = ("cifar10", "cifar100")
NETWORK_TIMEOUT_S = 10.0


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A data set is in none of the searched places and could not be downloaded.

    The message names every path tried, the expected layout, the ``--download`` flag and ``--dataset synthetic``.
    """


def search_roots(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for data sets, in order (see the module docstring); they need not exist."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(ENV_VAR, "")
    if env.strip():
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    return [Path(p).expanduser() for p in DEFAULT_DIRS]


def download_root(roots: Sequence[Path]) -> Path:
    """The folder a download into ``roots`` (:func:`search_roots`' list) goes to: the cache folder for the default
    list, else its first folder (``data_dir``, or the first of ``$OKDFAST_DATA``)."""
    if list(roots) == [Path(p).expanduser() for p in DEFAULT_DIRS]:
        return Path(CACHE_DIR).expanduser()
    return roots[0] if roots else Path(CACHE_DIR).expanduser()


def download_by_default(dataset: str, data_dir: str | os.PathLike[str] | None) -> bool:
    """Whether the training CLI, given neither ``--download`` nor ``--no-download``, fetches a missing ``dataset``:
    CIFAR-10/100, when nothing names where the data lies (no ``data_dir``, no ``$OKDFAST_DATA``: a named folder
    that lacks it is more likely a wrong path than a wish to download) and ``$OKDFAST_NO_DOWNLOAD`` is not set."""
    if os.environ.get(NO_DOWNLOAD_ENV_VAR, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    name = dataset.lower().replace("-", "").replace("_", "")
    return name in DOWNLOADED_BY_DEFAULT and data_dir is None and not os.environ.get(ENV_VAR, "").strip()


def dedupe(paths: Sequence[Path]) -> list[Path]:
    """``paths`` without repeats (compared as absolute paths), order kept."""
    seen: set[Path] = set()
    out = []
    for p in paths:
        key = p.absolute()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def not_found(
    name: str, tried: Sequence[Path], layouts: Sequence[str], roots: Sequence[Path], reason: str | None = None
) -> DatasetNotFoundError:
    """The one error raised for a missing data set: what was tried, what is expected, and the two ways out."""
    lines = [f"data set {name!r} not found."]
    if reason:
        lines.append(f"Download failed: {reason}")
    lines.append("Paths tried:")
    lines += [f"  {p.absolute()}" for p in tried]
    lines.append("Expected layout (any one of), inside a data folder <dir>:")
    lines += [f"  {layout}" for layout in layouts]
    first = download_root(roots).absolute()
    if reason:
        fetch = (
            f"retry with network access (--download fetches it into {first}; {NO_DOWNLOAD_ENV_VAR}=1 or "
            "--no-download fail at once instead), or fetch the files yourself"
        )
    else:
        fetch = f"pass --download (load_dataset(..., download=True)) to fetch it into {first}"
    lines.append(
        f"Fix: {fetch}; or point --data-dir / ${ENV_VAR} at a folder holding it; or train on --dataset synthetic "
        "(generated in memory, needs no files)."
    )
    return DatasetNotFoundError("\n".join(lines))


def check_host_reachable(url: str, timeout: float = NETWORK_TIMEOUT_S) -> None:
    """Resolve ``url``'s host and open a TCP connection to it within ``timeout`` seconds, else raise ``OSError``.

    ``getaddrinfo`` ignores socket timeouts (a broken resolver can block for minutes), so it runs in a daemon
    thread that is abandoned when the deadline passes.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: dict[str, object] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=probe, name=f"okdfast-probe-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in result:
        return
    error = result.get("error")
    if isinstance(error, OSError):
        raise OSError(f"cannot reach {host}:{port}: {error}") from error
    raise OSError(f"cannot reach {host}:{port}: no answer within {timeout:g} s (offline?)")


@contextmanager
def network_timeout(seconds: float = NETWORK_TIMEOUT_S) -> Iterator[None]:
    """Give sockets opened without an explicit timeout (torchvision's downloader) one, then restore the old one."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)
