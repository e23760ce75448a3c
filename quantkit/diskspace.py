"""Room for an output: free space checked before writing, and a full disk, an exhausted quota, a read-only file
system or a denied permission met while writing turned into one line that names the place."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_ACCESS = {errno.EROFS, errno.EACCES, errno.EPERM}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors reports an I/O failure


class OutputError(QuantkitError):
    """The output could not be written where asked (no space, no permission, another run's output in the way);
    nothing the run computed is wrong, so a resumable run keeps its state."""


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (or its nearest existing
    ancestor)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def size_text(nbytes: int) -> str:
    """``nbytes`` for people: 163.8 MiB."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def check_space(folder: Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, to put ``needed`` bytes of ``what`` in ``folder`` when they do not fit."""
    free = free_bytes(folder)
    if needed > free:
        raise _no_space(folder, what, needed, free)


def _write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one safetensors names in its message."""
    if isinstance(exc, OSError):
        return exc.errno
    match = _RUST_OS_ERROR.search(str(exc))
    return int(match.group(1)) if match else None


@contextmanager
def write_errors(folder: Path, what: str, needed: int) -> Iterator[None]:
    """Turn a full disk or quota (``needed`` bytes of ``what`` did not fit), a read-only file system or a denied
    permission met inside into an :class:`OutputError` naming ``folder``. Space is measured once the failed
    write has cleaned up after itself (inner handlers run first)."""
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        code = _write_errno(exc)
        if code in _NO_SPACE:
            free = free_bytes(folder)
            if free < needed:
                raise _no_space(folder, what, needed, free) from None
            raise OutputError(f"not enough space in {folder} for {what}: the disk filled up while it was written "
                              f"(at least {size_text(needed)} needed, {size_text(free)} free now)") from None
        if code in _NO_ACCESS and not _elsewhere(exc, folder):
            raise OutputError(f"cannot write to {folder}: {os.strerror(code)}") from None
        raise


def _elsewhere(exc: Exception, folder: Path) -> bool:
    """Whether ``exc`` names a file outside ``folder`` (a source the run reads, not its output)."""
    filename = getattr(exc, "filename", None)
    return filename is not None and not Path(os.fsdecode(filename)).absolute().is_relative_to(folder.absolute())


def _no_space(folder: Path, what: str, needed: int, free: int) -> OutputError:
    return OutputError(f"not enough space in {folder} for {what}: it needs {size_text(needed)}, {size_text(free)} free")
