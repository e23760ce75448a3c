"""Writing tensors as sharded safetensors with the Hugging Face index layout, and reading them back safely."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quantkit.errors import QuantkitError
from quantkit.layouts.base import DTYPE_BYTES, Headers

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, readable by everyone as a checkpoint is (the library creates it owner-only)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """The tensor names of each shard, in order: ``sizes`` (name -> data bytes, in writing order) filled into
    shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """The file names of ``count`` shards: one file, or the Hugging Face numbered names."""
    return [SINGLE_FILE] if count == 1 else [shard_name(i, count) for i in range(count)]


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """Write ``tensors`` into shards of at most ``max_shard_bytes`` (one file when they fit)."""
    groups = plan_shards({name: t.numel() * t.element_size() for name, t in tensors.items()}, max_shard_bytes)
    names = shard_names(len(groups))
    weight_map = {}
    for name, group in zip(names, groups):
        save_tensors({key: tensors[key].contiguous() for key in group}, folder / name)
        weight_map.update({key: name for key in group})
    if len(groups) > 1:
        _write_index(folder, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))


def _write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    (folder / INDEX_FILE).write_text(index_text(weight_map, total_bytes))


def index_text(weight_map: dict[str, str], total_bytes: int) -> str:
    """The Hugging Face shard index: which shard holds each tensor, and the tensors' total size."""
    return json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2)


def shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index or the single file's header; corrupt files fail clearly."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except (ValueError, OSError) as exc:
            raise QuantkitError(f"corrupt checkpoint index {index}: {exc}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise QuantkitError(f"corrupt checkpoint index {index}: its weight_map must map tensor names to "
                                f"shard file names, got {_shown(weight_map)}")
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise QuantkitError(f"corrupt checkpoint index {index}: its weight_map gives {name} the shard "
                                    f"{_shown(shard)}, not a file name")
        for shard in sorted(set(weight_map.values())):
            if "/" in shard or "\\" in shard or not (folder / shard).is_file():
                raise QuantkitError(f"checkpoint shard {shard!r} named in {index.name} is missing")
        return weight_map
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise QuantkitError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    return {name: SINGLE_FILE for name in header_specs(single)}


def _shown(value: object) -> str:
    """A JSON value in a few words for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def header_specs(path: Path) -> Headers:
    """Shapes and dtype names of every tensor in a safetensors file, read from its header only."""
    with shard_reader(path) as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _corrupt(path: Path, exc: Exception) -> QuantkitError:
    return QuantkitError(f"corrupt or truncated checkpoint file {path.name}: {str(exc).splitlines()[0]}")


_READ_ERRORS = (SafetensorError, OSError, RuntimeError)


@contextmanager
def shard_reader(path: Path) -> Iterator:
    """A safetensors file opened for reading (memory-mapped); corrupt or truncated files fail in one line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except _READ_ERRORS as exc:
        raise _corrupt(path, exc) from None


class TensorReader:
    """Reads a checkpoint's tensors one at a time by name (name -> shard file in ``files``), each shard opened
    once, memory-mapped, until the ``with`` block ends; corrupt data fails in one line."""

    def __init__(self, folder: Path, files: dict[str, str]) -> None:
        self.folder, self.files = folder, files
        self._stack = ExitStack()
        self._open: dict[str, object] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def __call__(self, name: str) -> torch.Tensor:
        shard = self.files[name]
        path = self.folder / shard
        try:
            if shard not in self._open:
                self._open[shard] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            return self._open[shard].get_tensor(name)  # type: ignore[attr-defined]
        except _READ_ERRORS as exc:
            raise _corrupt(path, exc) from None


def shard_name(index: int, count: int) -> str:
    """The Hugging Face name of shard ``index`` (0-based) of ``count``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_part(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one shard through a temporary sibling, so ``path`` is either whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_tensors({name: t.contiguous() for name, t in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def finish_parts(folder: Path, parts: list[str], dest: Path | None = None) -> None:
    """Give shards written one by one (``parts`` in ``folder``, in order) their Hugging Face names and write the
    index: renamed in place, or hard-linked (copied across file systems) into ``dest``, leaving the parts."""
    dest = dest or folder
    names = shard_names(len(parts))
    weight_map, total = {}, 0
    for part, name in zip(parts, names):
        for key, (shape, dtype) in header_specs(folder / part).items():
            weight_map[key] = name
            total += math.prod(shape) * DTYPE_BYTES[dtype]
        if dest == folder:
            os.replace(folder / part, folder / name)
        else:
            try:
                os.link(folder / part, dest / name)
            except OSError:
                shutil.copyfile(folder / part, dest / name)
    if len(parts) > 1:
        _write_index(dest, dict(sorted(weight_map.items())), total)
