"""Data parallelism over torch.distributed: calibration windows split over ranks, statistics summed, layer
solves shared out and their results sent to every rank, one rank writing.

A run started by ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` above 1 in its environment) joins a process
group: NCCL when its blocks run on CUDA devices (rank ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``), gloo on the CPU.
Every rank holds the whole model and runs the same blocks in the same order on its own share of the windows;
each group of linears meets the others at the same point, so the collectives below are called in the same
order everywhere. Quantized tensors travel as their stored bytes with a JSON header (nothing is pickled). A
rank that dies leaves the others blocked in a collective until torchrun stops them, or until ``timeout``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, tensor_class

TIMEOUT = timedelta(minutes=30)  # a collective that waits longer (a rank died or hangs) fails the run


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run; one process is rank 0 of 1 and every collective is a no-op."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives move their tensors

    @property
    def writer(self) -> bool:
        """Whether this rank writes the checkpoint and reports (rank 0)."""
        return self.rank == 0

    def windows(self, calib: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the calibration windows ``[windows, tokens]`` (shares differ by one at
        most)."""
        count = calib.shape[0]
        if count < self.world:
            raise QuantkitError(f"{count} calibration windows cannot be split over {self.world} ranks; use "
                                f"--nsamples {self.world} or more")
        return calib[self.rank * count // self.world:(self.rank + 1) * count // self.world]

    def sum_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` with its sum over the ranks, in place."""
        if self.world > 1:
            moved = tensor.to(self.device)
            dist.all_reduce(moved)
            if moved is not tensor:
                tensor.copy_(moved)

    def total(self, count: int) -> int:
        """The sum of ``count`` over the ranks."""
        if self.world == 1:
            return count
        value = torch.tensor([count], dtype=torch.int64)
        self.sum_(value)
        return int(value)

    def owners(self, costs: list[int]) -> list[int]:
        """The rank that does each piece of work of the given costs: the costliest first, each to the rank with
        the least work so far (the same answer on every rank)."""
        load, owner = [0] * self.world, [0] * len(costs)
        for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            owner[index] = min(range(self.world), key=lambda r: (load[r], r))
            load[owner[index]] += costs[index]
        return owner

    def share(self, qt: QuantizedTensor | None, owner: int) -> QuantizedTensor:
        """The quantized tensor ``owner`` made (``qt`` there, None elsewhere), on every rank as rebuilt from its
        stored tensors, so that all ranks dequantize the same values."""
        if self.world == 1:
            return qt  # type: ignore[return-value]
        if self.rank == owner:
            tensors = {name: t.contiguous() for name, t in qt.to_tensors().items()}
            header = {"meta": qt.meta(), "shape": list(qt.shape),
                      "tensors": [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]}
            payload = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors.values()])
        header = self._broadcast_json(header if self.rank == owner else None, owner)
        specs = [(name, getattr(torch, dtype), torch.Size(shape)) for name, dtype, shape in header["tensors"]]
        sizes = [shape.numel() * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in specs]
        buffer = payload.to(self.device) if self.rank == owner else torch.empty(sum(sizes), dtype=torch.uint8,
                                                                               device=self.device)
        dist.broadcast(buffer, owner)
        received = {name: part.clone().view(dtype).reshape(shape)  # a copy of its own: aligned for its dtype
                    for (name, dtype, shape), part in zip(specs, buffer.cpu().split(sizes))}
        meta = header["meta"]
        return tensor_class(meta["kind"]).from_tensors(received, meta, tuple(header["shape"]))

    def _broadcast_json(self, value: dict | None, source: int) -> dict:
        data = torch.tensor(list(json.dumps(value).encode()) if value is not None else [], dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        dist.broadcast(length, source)
        buffer = data.to(self.device) if self.rank == source else torch.empty(int(length), dtype=torch.uint8,
                                                                              device=self.device)
        dist.broadcast(buffer, source)
        return json.loads(buffer.cpu().numpy().tobytes())

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            dist.barrier()


SINGLE = Ranks()


def launched_ranks() -> int:
    """How many ranks the launcher (torchrun) started this run with; 1 outside one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise QuantkitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of ranks") from None


def join(devices: tuple[torch.device, ...]) -> Ranks:
    """Join the process group torchrun set up (once per process); :data:`SINGLE` outside torchrun. Ranks on
    CUDA use NCCL, each on ``cuda:LOCAL_RANK`` unless ``devices`` names one device per rank; gloo otherwise."""
    world = launched_ranks()
    if world <= 1:
        return SINGLE
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise QuantkitError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or not numbers; launch with "
                            "torchrun") from None
    cuda = any(device.type == "cuda" for device in devices) or (not devices and torch.cuda.is_available())
    if cuda:
        device = devices[local] if len(devices) == world else torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:  # no rendezvous address, a rank that never came
            raise QuantkitError(f"could not join the process group of {world} ranks: {exc}") from None
    if dist.get_world_size() != world:
        raise QuantkitError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE says {world}")
    return Ranks(rank, world, device)
