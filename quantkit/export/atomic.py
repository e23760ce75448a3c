"""Atomic output directories: everything is written to a temporary sibling that is renamed when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail early (before any long work) if ``path`` cannot be written as a new output directory."""
    if path.exists() and not path.is_dir():
        raise QuantkitError(f"output path {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise QuantkitError(f"output directory {path} already exists and is not empty; pass --overwrite to replace it")
    parent = path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise QuantkitError(f"cannot write to {parent}: {exc.strerror or exc}") from None


@contextmanager
def atomic_directory(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory next to ``path``; on success it replaces ``path``, on failure it vanishes."""
    check_output_dir(path, overwrite)
    parent = path.absolute().parent
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        yield staging
        publish_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_directory(staging: Path, path: Path) -> None:
    """Rename the finished directory ``staging`` to ``path``, replacing what is there (a sibling of ``path``)."""
    staging.chmod(0o755)
    if path.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.absolute().parent))
        os.replace(path, retired / "old")
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, path)


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON at ``path`` through a temporary sibling, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
