"""The two ways okdfast writes a file, so that a kill -9 or a full disk never leaves a half-written one in use.

- :func:`atomic_write_bytes` (``config.yaml``, ``metrics.csv``, ``summary.json``, checkpoints) and
  :func:`atomic_output` (writers that take a file name: the CINIC-10 and FFCV caches): the bytes go to a
  temporary file in the same folder (``.NAME.<random>.tmp``), are flushed and fsynced, and the temporary file is
  renamed over ``NAME`` (``os.replace`` is atomic), then the folder is fsynced. A reader sees the old file or the
  new one, never a mixture. A failed write removes its temporary file; a killed one leaves it behind, and
  :func:`remove_orphaned_temps` removes it on the next start.
- :func:`append_text` (``metrics.jsonl``, ``train.log``, ``sessions.jsonl``): one write of whole lines at the end
  of the file, flushed and fsynced. A kill during the write can only cut the last line short; readers of those
  files (:func:`okdfast.utils.metrics_log.read_rows`) drop an unterminated last line.

Every byte of a run folder goes through :func:`_write_all`, so a test can cut any write short at any point.
Failures raise :class:`RunFolderWriteError` naming the file, the reason (``No space left on device``) and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from okdfast.errors import UserError

_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give: mkstemp's 0600 would hide a run's files from its group


class RunFolderWriteError(UserError, OSError):
    """Writing a run folder's file failed (disk full, read-only, permissions); the old file is untouched."""


def _fix_for(error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "it is a symbolic link, and okdfast writes a run folder's files only inside it: remove the link"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free space on that disk (or raise the quota / file-size limit), or pass --out on another disk"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable, or pass --out a folder you can write"
    return "check the disk and the folder, or pass --out elsewhere"


def write_error(path: Path, error: OSError, keeps: str) -> RunFolderWriteError:
    """The one message of a failed write: the file, the OS's reason first (not buried under a traceback), the fix."""
    reason = error.strerror or str(error)
    code = f" (errno {error.errno})" if error.errno else ""
    failure = RunFolderWriteError(f"could not write {path}: {reason}{code}; {_fix_for(error)}. {keeps}")
    failure.errno = error.errno
    return failure


def _write_all(handle: IO[bytes], data: bytes, path: Path) -> None:
    """Write ``data`` to ``handle`` (opened for ``path``, or for its temporary file) and flush it; the caller
    fsyncs (:func:`atomic_output` the temporary file, :func:`append_text` the log)."""
    handle.write(data)
    handle.flush()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """The one way okdfast replaces a file: yields a same-folder temporary path (``.NAME.<random>.tmp``) for a
    writer to fill (bytes, ``np.savez``, FFCV's DatasetWriter); on a clean exit it is fsynced and renamed over
    ``path``, then the folder is fsynced; on any failure it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp_name = None
    try:  # mkstemp too: a read-only folder or one out of inodes fails there
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, _FILE_MODE)
        finally:
            os.close(fd)
        yield Path(tmp_name)
        _fsync_file(Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException as error:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
        if isinstance(error, OSError) and not isinstance(error, UserError):
            raise write_error(path, error, f"The previous {path.name}, if any, is untouched.") from error
        raise
    _fsync_folder(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (:func:`atomic_output`)."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        _write_all(handle, data, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make ``path`` the same file as ``source`` atomically: a hard link renamed over ``path`` (a copy where the
    filesystem has no hard links). Used for best.pt, which is always the last.pt of its epoch."""
    source, path = Path(source), Path(path)
    tmp_name = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        try:
            os.link(source, tmp_name)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            with open(source, "rb") as src, open(tmp_name, "xb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        if tmp_name.exists():
            tmp_name.unlink()
        if isinstance(error, OSError) and not isinstance(error, UserError):
            raise write_error(path, error, f"The previous {path.name}, if any, is untouched.") from error
        raise
    _fsync_folder(path.parent)
    return path


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append whole lines (``text`` ends with a newline) in one write, flushed and fsynced. A last line a kill cut
    short (no newline) is dropped first, so that it never merges with the next line into one damaged line."""
    path = Path(path)
    try:  # never through a symbolic link: a run folder's log must not append to a file elsewhere
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "a+b") as handle:
            _drop_cut_line(handle)
            _write_all(handle, text.encode("utf-8"), path)
            os.fsync(handle.fileno())
    except OSError as error:
        if isinstance(error, UserError):
            raise
        raise write_error(path, error, f"The lines written to {path.name} before are kept.") from error


def _drop_cut_line(handle: IO[bytes]) -> None:
    """Truncate a file opened with "a+b" to its last newline when it does not end with one."""
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return
    handle.seek(end - 1)
    if handle.read(1) == b"\n":
        return
    start = max(0, end - (1 << 20))  # lines are short: the last MiB holds the last newline
    handle.seek(start)
    cut = handle.read(end - start).rfind(b"\n")
    handle.truncate(start + cut + 1 if cut >= 0 else 0)


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is the temporary file of an atomic write (``.NAME.<random>.tmp``)."""
    return _TEMP.match(name) is not None


def orphaned_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """The temporary files a killed :func:`atomic_write_bytes` / :func:`atomic_link` left in ``folder`` (only those
    of the file ``names``, when given)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else set(names)
    found = []
    for entry in sorted(folder.iterdir()):
        match = _TEMP.match(entry.name)
        if match and entry.is_file() and (wanted is None or match.group("name") in wanted):
            found.append(entry)
    return found


def remove_orphaned_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove (and return) the temporary files of killed writes in ``folder``; the files they were for are intact."""
    removed = orphaned_temps(folder, names)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
