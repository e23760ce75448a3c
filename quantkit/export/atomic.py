"""Atomic output directories: everything is written to a temporary sibling that is renamed when complete.

A staging sibling (``.OUT.tmp-*``) is locked (flock) while its run lives, so the next run writing ``OUT`` can
tell a dead run's leftovers from a live run's work and remove only the former. Publishing never overwrites
without ``overwrite``: rename(2) onto a non-empty directory fails, so an output another run published meanwhile
is refused rather than replaced, with no window between a check and the rename.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.diskspace import OutputError, check_space, write_errors
from quantkit.errors import QuantkitError
from quantkit.interrupts import interrupts_held
from quantkit.progress import stderr_console

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail early (before any long work) if ``path`` cannot be written as a new output directory; remove what
    dead runs writing ``path`` left beside it."""
    if path.exists() and not path.is_dir():
        raise QuantkitError(_not_a_directory(path))
    check_writable(path.absolute().parent)
    remove_stale_staging(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise QuantkitError(f"output directory {path} already exists and is not empty; pass --overwrite to replace it")


def check_output_file(path: Path, overwrite: bool) -> None:
    """Fail early if ``path`` cannot be written as a new output file; remove what dead runs writing it left."""
    if path.is_dir():
        raise QuantkitError(f"output path {path} is a directory; this layout writes one file")
    check_writable(path.absolute().parent)
    remove_stale_staging(path)
    if path.exists() and not overwrite:
        raise QuantkitError(f"output file {path} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_file(path: Path, overwrite: bool = False, needed: int = 0, what: str = "the output") -> Iterator[Path]:
    """Yield a staging path for the file ``path``; on success it replaces ``path``, on failure it vanishes (as
    :func:`atomic_directory`)."""
    check_output_file(path, overwrite)
    parent = path.absolute().parent
    with write_errors(parent, what, needed):
        check_space(parent, needed, what)
        with staging_beside(path) as staging:
            staged = staging / path.name
            yield staged
            with interrupts_held():
                if path.exists() and not overwrite:
                    raise OutputError(f"output file {path} was written by another run while this one worked; "
                                      "pass --overwrite to replace it")
                os.replace(staged, path)


def _not_a_directory(path: Path) -> str:
    return f"output path {path} exists and is not a directory"


def check_writable(folder: Path) -> None:
    """Refuse a folder (or, until it is made, its nearest existing ancestor) this process cannot create files
    in: read-only, not permitted, or a file."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".quantkit-probe-", dir=existing))
    except OSError as exc:
        raise OutputError(f"cannot write to {existing}: {exc.strerror or exc}") from None


@contextmanager
def atomic_directory(path: Path, overwrite: bool = False, needed: int = 0, what: str = "the output") -> Iterator[Path]:
    """Yield a staging directory next to ``path``; on success it replaces ``path``, on failure it vanishes.
    ``needed`` bytes of ``what`` must fit before the staging directory is made; a full disk or a denied write
    on the way is one :class:`OutputError`."""
    check_output_dir(path, overwrite)
    parent = path.absolute().parent
    with write_errors(parent, what, needed):
        check_space(parent, needed, what)
        with staging_beside(path) as staging:
            yield staging
            publish_directory(staging, path, overwrite)


@contextmanager
def staging_beside(path: Path) -> Iterator[Path]:
    """A new staging directory beside ``path`` (``.NAME.tmp-*``), locked while this process lives and deleted
    when the block ends (it is gone if the block renamed it into place); dead runs' leftovers go first. Its name
    is chosen before it is made, so that even a Ctrl-C the instant it appears cannot leave it behind."""
    remove_stale_staging(path)
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging, lock = None, None
    try:
        while lock is None:  # None: another run's clean-up took it in the instant before it was locked
            staging = parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
            staging.mkdir(mode=0o700)
            lock = lock_directory(staging)
        yield staging
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def publish_directory(staging: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished directory ``staging`` (on the file system of ``path``) to ``path``; what is there is
    replaced only with ``overwrite``, else refused. A Ctrl-C meanwhile waits until the output is in place."""
    with interrupts_held():
        _rename_into_place(staging, path, overwrite)


def _rename_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    staging.chmod(0o755)
    try:
        os.rename(staging, path)  # atomic; fails if another run put a non-empty directory there meanwhile
        return
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise OutputError(_not_a_directory(path)) from None
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not overwrite:
        raise OutputError(f"output directory {path} was written by another run while this one worked; "
                          "pass --overwrite to replace it")
    if _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # the previous output, now under the staging name
        return
    lock = lock_directory(path)  # the output moved aside stays locked, so no clean-up takes it for a dead run's
    retired = tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.absolute().parent)
    try:
        os.rename(path, retired)  # onto the empty directory; a kill before the next rename is undone by the next run
        os.rename(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        if lock is not None:
            os.close(lock)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # not on this file system or kernel
        return False
    raise OSError(code, os.strerror(code), str(b))


def lock_directory(folder: Path) -> int | None:
    """An exclusive flock on ``folder``, held until the returned descriptor is closed; None if another process
    holds it, or ``folder`` is gone or was replaced by the time it is locked."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # gone, not a directory, or not ours to open
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        same = os.path.samestat(os.fstat(fd), os.stat(folder))
    except (BlockingIOError, FileNotFoundError):
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def remove_stale_staging(path: Path) -> None:
    """Remove the staging directories that dead runs writing ``path`` left beside it (their lock is free; a live
    run's is never touched), putting back an output a run killed while replacing it had moved aside; one line
    on stderr says what went."""
    parent = path.absolute().parent
    removed = []
    entries = [(kind, entry) for kind in ("tmp", "old") for entry in parent.glob(f".{glob.escape(path.name)}.{kind}-*")]
    for kind, entry in sorted(entries):
        if (lock := lock_directory(entry)) is None:
            continue
        try:
            if kind == "old" and not path.exists() and any(entry.iterdir()):
                os.rename(entry, path)
                stderr_console.print(f"restored {path}, which a run killed while replacing it had moved to {entry.name}",
                                     markup=False, highlight=False)
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        finally:
            os.close(lock)
    if removed:
        stderr_console.print(f"removed what interrupted runs writing {path} left beside it: {', '.join(removed)}",
                             markup=False, highlight=False)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` at ``path`` through a temporary sibling, so a reader never sees half a file; a full disk or
    a denied write is one :class:`OutputError`."""
    data = text.encode("utf-8")
    with write_errors(path.parent, path.name, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        check_space(path.parent, len(data), path.name)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # named first: a Ctrl-C leaves nothing
        try:
            with open(tmp, "xb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON at ``path``, whole or not at all (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2) + "\n")
