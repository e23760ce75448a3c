"""A model read block by block from its safetensors shards: the skeleton is built without weights, the tensors
outside the blocks are read once, and each block's tensors are read (memory-mapped) when its turn comes and
dropped after it."""

from __future__ import annotations

import ctypes
import gc
import hashlib
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.export.safetensors_io import INDEX_FILE, shard_reader
from quantkit.interrupts import interrupts_held
from quantkit.models.loading import check_finite
from quantkit.models.skeleton import CheckedSource


class StreamedModel(CheckedSource):
    """The model at ``folder`` (a Hugging Face directory of safetensors shards), with every parameter on the
    meta device until :meth:`load_outer` or :meth:`load_block` reads it, as float32 on ``device``. Headers,
    shapes, dtypes and the config are checked before anything is read (see :class:`CheckedSource`)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.model.config.name_or_path = str(folder)  # as transformers records a model it loads
        self.model.generation_config = _generation_config(folder)

    @property
    def num_blocks(self) -> int:
        return len(self.adapter.get_blocks(self.model))

    def block(self, index: int) -> nn.Module:
        return self.adapter.get_blocks(self.model)[index]

    def _read(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        """Read ``module``'s parameters (named under ``prefix``) from the shards, one tensor at a time, into
        place as float32 on ``device``; its buffers follow to ``device``."""
        for name, _ in module.named_parameters(prefix=prefix, remove_duplicate=False):
            if name in self.tied:
                continue
            with shard_reader(self.folder / self.files[name]) as f:
                stored = f.get_tensor(name)
            owner, _, leaf = name.removeprefix(f"{prefix}.").rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._parameters[leaf] = nn.Parameter(stored.to(device=device, dtype=torch.float32), requires_grad=False)
        for owner in module.modules():
            for leaf, buffer in owner._buffers.items():
                if buffer is not None and buffer.device != device:
                    owner._buffers[leaf] = buffer.to(device)

    def load_outer(self) -> None:
        """Read every parameter outside the decoder blocks (embeddings, final norm, head) onto the CPU, where a
        resident model sits, so that both compute the blocks' inputs alike; refuse non-finite values in them."""
        blocks = self.adapter.get_blocks(self.model)
        saved = list(blocks)
        blocks_owner, _, attr = self.adapter.blocks.rpartition(".")
        holder = self.model.get_submodule(blocks_owner)
        setattr(holder, attr, nn.ModuleList())  # hide the blocks while reading the rest
        try:
            self._read(self.model, "", torch.device("cpu"))
        finally:
            setattr(holder, attr, nn.ModuleList(saved))
        if self.tied:
            self.model.tie_weights()
        check_finite(self.model)  # the blocks are still on the meta device: these tensors alone

    def load_block(self, index: int, device: torch.device) -> nn.Module:
        """Read block ``index`` onto ``device``; refuse non-finite values in it."""
        block = self.block(index)
        prefix = f"{self.adapter.blocks}.{index}"
        self._read(block, prefix, device)
        check_finite(block, prefix)
        return block

    def release_block(self, index: int) -> None:
        """Drop block ``index``'s weights (back to the meta device) and hand the freed memory back."""
        self.block(index).to("meta")
        with interrupts_held():
            gc.collect()
        _trim_heap()

    def identity(self) -> dict:
        """What identifies the weights for a resumed run: a digest of the config, index and tensor headers, and
        each shard's size and modification time (a rewritten or re-downloaded shard changes it)."""
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        index = self.folder / INDEX_FILE
        if index.is_file():
            digest.update(index.read_bytes())
        for name in sorted(self.specs):
            shape, dtype = self.specs[name]
            digest.update(f"{name}:{dtype}:{list(shape)}".encode())
        files = {}
        for shard in sorted(set(self.files.values())):
            stat = (self.folder / shard).stat()
            files[shard] = [stat.st_size, stat.st_mtime_ns]
        return {"config_and_headers": digest.hexdigest(), "shard_bytes_and_mtimes": files}


def _generation_config(folder: Path):
    """The model's own generation defaults, as transformers' ``from_pretrained`` keeps them: its
    generation_config.json, else the generation fields of its config.json."""
    from transformers import GenerationConfig

    own = (folder / "generation_config.json").is_file()
    try:
        if own:
            return GenerationConfig.from_pretrained(str(folder))
        return GenerationConfig.from_pretrained(str(folder), config_file_name="config.json", _from_model_config=True)
    except (OSError, ValueError) as exc:
        name = "generation_config.json" if own else "config.json"
        raise QuantkitError(f"corrupt {name} in {folder}: {str(exc).splitlines()[0]}") from None


def _trim_heap() -> None:
    """Return the C heap's free pages to the system. glibc keeps freed memory in its arenas, and a block's worth
    of mid-sized tensors fragments them: without this, a streamed run's resident memory creeps up by about
    half a block per block (measured: 24 blocks of 12 MB each, +165 MiB; with it, flat)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
