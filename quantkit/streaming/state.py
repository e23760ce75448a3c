"""The work directory of a streamed run, kept so that a killed run resumes where it stopped.

``OUT.partial/`` beside the output holds ``checkpoint/`` (one finished shard per block, then the rest),
``inputs-NNNNN.safetensors`` (the hidden states entering block NNNNN, one tensor per calibration batch) and
``state.json`` (the run's arguments, the calibration digest, each finished layer's metadata and
``next_block``). Every file is written under a temporary name and renamed, and ``state.json`` is renamed last,
so a kill at any instant leaves a state that names only complete files.

In a data-parallel run, rank 0 holds the lock and writes the shards and ``state.json``; every rank spills its
own batches (``inputs-NNNNN.rank-R.safetensors``), and ``state.json`` moves on only once every rank's spill is
complete, so a rank killed at any instant leaves a state every rank can resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from quantkit.distributed import SINGLE, Ranks
from quantkit.errors import QuantkitError
from quantkit.export.atomic import lock_directory, write_json
from quantkit.export.safetensors_io import write_part
from quantkit.progress import stderr_console

STATE_FILE = "state.json"
STATE_VERSION = 1
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def work_dir(output: Path) -> Path:
    """Where a streamed run writing ``output`` keeps its state."""
    output = output.absolute()
    return output.parent / f"{output.name}.partial"


def tensor_digest(tensor: torch.Tensor) -> str:
    """A SHA-256 of a CPU tensor's bytes (which calibration windows a run used)."""
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file written by this module, mapped copy-on-write rather than read: their
    pages come from the file and can be evicted, so activations spilled there cost no anonymous memory."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        array = np.memmap(path, dtype=_NUMPY_DTYPES[entry["dtype"]], mode="c", offset=8 + length + begin,
                          shape=shape) if end > begin else np.zeros(shape, _NUMPY_DTYPES[entry["dtype"]])
        out[name] = torch.from_numpy(array)
    return out


class RunState:
    """A streamed run's work directory (see the module docstring)."""

    def __init__(self, folder: Path, arguments: dict, record: dict, lock: int, ranks: Ranks = SINGLE) -> None:
        self.folder, self.arguments, self._lock, self.ranks = folder, arguments, lock, ranks
        self.next_block: int = record.get("next_block", 0)
        self.calibration: str | None = record.get("calibration")
        self.layers: dict[str, dict] = record.get("layers", {})
        self.expert_tokens: dict[str, int] = record.get("expert_tokens", {})  # calibration tokens routed to each

    @classmethod
    def open(cls, output: Path, arguments: dict, ranks: Ranks = SINGLE) -> RunState:
        """The state for writing ``output`` with ``arguments``: resumed if a run with the same arguments left
        one, new otherwise; a state left by different arguments is refused, naming what differs. Rank 0 opens
        it; the other ranks of a data-parallel run then read what it holds."""
        folder = work_dir(output)
        if not ranks.writer:
            ranks.barrier()
            return cls(folder, arguments, _read_state(folder, arguments) or {}, -1, ranks)
        try:
            state = cls._open_first(folder, arguments, ranks)
        finally:
            ranks.barrier()
        return state

    @classmethod
    def _open_first(cls, folder: Path, arguments: dict, ranks: Ranks) -> RunState:
        folder.mkdir(parents=True, exist_ok=True)
        lock = _lock(folder)
        try:
            record = _read_state(folder, arguments)
        except BaseException:
            os.close(lock)
            raise
        if record is not None:
            return cls(folder, arguments, record, lock, ranks)
        try:
            for leftover in folder.iterdir():  # no state: killed before its first commit, or while discarding
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            (folder / "checkpoint").mkdir()
            state = cls(folder, arguments, {}, lock, ranks)
            state._commit()
            return state
        except BaseException:  # a new state that could not be written (a full disk): nothing to resume
            shutil.rmtree(folder, ignore_errors=True)
            os.close(lock)
            raise

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    def check_calibration(self, digest: str) -> None:
        """Record the calibration windows' digest (before any block is done), or refuse windows that differ from
        those of the finished blocks."""
        if self.next_block == 0:
            self.calibration = digest
            if self.ranks.writer:
                self._commit()
        elif self.calibration != digest:
            raise QuantkitError(f"the calibration windows differ from those {self.folder} was started with (did the "
                                "calibration file change?); delete it to start over")

    def inputs(self) -> list[torch.Tensor]:
        """The hidden states entering block :attr:`next_block`, one per calibration batch, mapped from disk."""
        path = self.folder / self._inputs_name(self.next_block)
        if not path.is_file():
            raise QuantkitError(f"{path} is missing (was the state edited?); the state is discarded, run again")
        tensors = mapped_tensors(path)
        return [tensors[f"batch.{i}"] for i in range(len(tensors))]

    def commit_block(self, index: int, tensors: dict[str, torch.Tensor], layers: dict[str, dict],
                     outputs: list[torch.Tensor] | None, expert_tokens: dict[str, int]) -> None:
        """Keep block ``index``'s shard, its layers' metadata, the tokens routed to its experts and the hidden
        states entering the next block (each rank its own; the shard and the state are rank 0's to write)."""
        if self.ranks.writer:
            write_part(tensors, self.checkpoint / block_part(index))
        if outputs is not None:
            write_part({f"batch.{i}": out.cpu() for i, out in enumerate(outputs)},
                       self.folder / self._inputs_name(index + 1))
        self.ranks.barrier()  # every rank's spill is complete before the state names it
        self.next_block = index + 1
        self.layers.update(layers)
        self.expert_tokens.update(expert_tokens)
        if self.ranks.writer:
            self._commit()
        self.ranks.barrier()  # no rank drops the inputs a resumed run would still need
        (self.folder / self._inputs_name(index)).unlink(missing_ok=True)

    def _inputs_name(self, index: int) -> str:
        rank = f".rank-{self.ranks.rank}" if self.ranks.world > 1 else ""
        return f"inputs-{index:05d}{rank}.safetensors"

    def _commit(self) -> None:
        write_json(self.folder / STATE_FILE, {
            "version": STATE_VERSION, "arguments": self.arguments, "calibration": self.calibration,
            "next_block": self.next_block, "layers": self.layers, "expert_tokens": self.expert_tokens,
        })

    def discard(self) -> None:
        """Delete the work directory (``state.json`` first, so that a kill half way leaves no stale state); rank
        0's to do."""
        if not self.ranks.writer:
            return
        (self.folder / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def release(self) -> None:
        """Give up the lock on the work directory (the process ending does it too)."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _read_state(folder: Path, arguments: dict) -> dict | None:
    """The state a run with ``arguments`` left in ``folder`` (None if there is none); a state left by other
    arguments is refused, naming what differs."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return None
    try:
        record = json.loads(state_file.read_text())
        stored, version = record["arguments"], record["version"]
    except (ValueError, KeyError, TypeError):
        raise QuantkitError(f"{state_file} is corrupt; delete {folder} to start over") from None
    if version != STATE_VERSION or stored != arguments:
        differing = sorted(k for k in {*stored, *arguments} if stored.get(k) != arguments.get(k))
        raise QuantkitError(f"{folder} holds a run started with different arguments ({', '.join(differing)}); "
                            "rerun with the same ones to resume, or delete it to start over")
    return record


def _lock(folder: Path) -> int:
    """An exclusive lock on the work directory, held while this process runs (two runs must not share it)."""
    fd = lock_directory(folder)
    if fd is None:
        raise QuantkitError(f"another quantkit run is writing {folder}; wait for it or stop it first")
    return fd


def remove_dead_state(output: Path) -> None:
    """Delete the work directory that a dead streamed run left for ``output`` (never a live run's: it holds the
    lock), now that ``output`` was written another way; one line on stderr says so."""
    folder = work_dir(output)
    fd = lock_directory(folder)
    if fd is None:
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    stderr_console.print(f"removed {folder}, the state of an interrupted --offload disk run, now that {output} "
                         "is written", markup=False, highlight=False)


def block_part(index: int) -> str:
    """The work-directory name of block ``index``'s shard."""
    return f"part-{index:05d}.safetensors"

