"""The model a config describes, built on the meta device after checking the config against the weights'
safetensors headers: field types, block count, parameter shapes. Shared by loading a source model, streaming
it and loading a quantized checkpoint."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from quantkit.config_fields import read_json
from quantkit.errors import QuantkitError, one_line
from quantkit.export.safetensors_io import INDEX_FILE, SINGLE_FILE, Headers, header_specs, shard_map
from quantkit.models.adapters import ModelAdapter
from quantkit.models.architectures import adapter_for
from quantkit.models.experts import stored_modules

_BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")
_JSON_KINDS = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "a list"), (dict, "an object"))


def _invalid_config(folder: Path, detail: str) -> QuantkitError:
    """The error for the model config in ``folder`` (a model's or a checkpoint's) that cannot be what it says."""
    return QuantkitError(f"invalid model config in {folder}: {detail}")


def _check_config_types(folder: Path, config_dict: dict, config: object) -> None:
    """Refuse a config field whose JSON type differs from the architecture's default for it in ``config`` (transformers
    accepts any value and fails later, deep in a forward pass); None passes where the config class allows it."""
    defaults = config.to_dict()
    nullable = {key for cls in type(config).__mro__ for key, hint in getattr(cls, "__annotations__", {}).items()
                if "None" in str(hint)}
    for key, value in config_dict.items():
        default = defaults.get(key)
        if default is None or (value is None and (key in nullable or key.endswith("_token_id"))):
            continue
        kind, words = next((k, w) for k, w in _JSON_KINDS if isinstance(default, k))
        fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            fits = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not fits:
            raise _invalid_config(folder, f"{key} is {value!r}, expected {words}")


def _check_depth(folder: Path, config_dict: dict, tensor_names: Iterable[str]) -> None:
    """The config's block count must be the checkpoint's, checked before any module is built (a lying count
    would otherwise build millions of empty blocks)."""
    stored = {int(match.group(1)) for name in tensor_names if (match := _BLOCK_INDEX.search(name))}
    declared = config_dict.get("num_hidden_layers")
    if declared != len(stored) or stored != set(range(len(stored))):
        raise _invalid_config(folder, f"num_hidden_layers is {declared!r} but the weights hold {len(stored)} blocks")


def build_skeleton(folder: Path, config_dict: dict, headers: Headers,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """The model ``config_dict`` (read from ``folder``) describes, with its parameters on the meta device (``dtype``: default the
    config's), after checking the config's field types, its block count and the shapes of the parameters
    stored as they are against the safetensors ``headers``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config_dict.get("model_type")
    adapter_for(str(model_type))
    _check_config_types(folder, config_dict, AutoConfig.for_model(str(model_type)))
    _check_depth(folder, config_dict, headers)
    try:
        config = AutoConfig.for_model(**config_dict)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with torch.device("meta"):  # allocates nothing, whatever sizes the config claims
            _check_stored_shapes(folder, AutoModelForCausalLM.from_config(config, dtype=dtype), headers)
        with init_empty_weights():  # allocates each parameter for a moment, and the (small) buffers
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except QuantkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers validates configs with several exception types
        raise _invalid_config(folder, one_line(exc)) from None
    model.tie_weights()  # empty-weight construction skips tying; tied tensors are stored once
    stored_modules(model, adapter_for(str(model_type)))
    return model


def _check_stored_shapes(folder: Path, model: nn.Module, headers: Headers) -> None:
    """Every parameter stored under its own name with as many dimensions must have the shape the config gives
    it (quantized layers store other tensors): a config that lies about a size is refused before anything
    of that size is allocated."""
    for name, param in model.named_parameters():
        stored = headers.get(name)
        if stored is not None and len(stored[0]) == param.dim() and tuple(stored[0]) != tuple(param.shape):
            raise _invalid_config(folder, f"it gives {name} the shape {list(param.shape)}, the file stores {list(stored[0])}")


def checked_shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file of a safetensors directory; a directory of pickle weights is refused."""
    if not (folder / SINGLE_FILE).is_file() and not (folder / INDEX_FILE).is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickled:
            raise QuantkitError(f"{folder} holds pickle weights ({pickled[0]}); quantkit loads only safetensors")
    return shard_map(folder)


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class CheckedSource:
    """A Hugging Face directory of safetensors shards, checked before any tensor data is read: its shard
    index, config (built into :attr:`model`, parameters on the meta device, float32, never from code shipped
    with the model) and every parameter's stored shape and float dtype."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = checked_shard_map(folder)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise QuantkitError(f"{folder} is not a Hugging Face model directory (no config.json)")
        self.specs = stored_headers(folder, self.files)
        self.config_dict = read_json(config_file, "config.json")
        self.model = build_skeleton(folder, self.config_dict, self.specs, torch.float32)
        self.model.eval().requires_grad_(False)
        self.adapter: ModelAdapter = adapter_for(self.model.config.model_type)
        self.tied = self._tied_names()
        self._check_tensors()

    def _tied_names(self) -> set[str]:
        """The output head's parameter names when the config ties it to the embeddings and the shards do not
        store it (as transformers does: a stored head is loaded as its own tensor)."""
        if not getattr(self.model.config, "tie_word_embeddings", False):
            return set()
        head = self.model.get_output_embeddings()
        names = {f"{name}.weight" for name, module in self.model.named_modules() if module is head}
        return set() if names & self.specs.keys() else names

    def _check_tensors(self) -> None:
        """Every parameter of the skeleton is stored, with its shape and a float dtype, before anything is read."""
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if name in self.tied:
                continue
            spec = self.specs.get(name)
            if spec is None:
                raise QuantkitError(f"{self.folder} is missing tensor {name}")
            shape, dtype = spec
            if shape != tuple(param.shape) or dtype not in _FLOAT_DTYPES:
                raise QuantkitError(f"tensor {name} in {self.files[name]} is {dtype} {list(shape)}; the config "
                                    f"needs a float tensor of shape {list(param.shape)}")


def stored_headers(folder: Path, files: dict[str, str]) -> Headers:
    """The header entry of every tensor in ``files`` (name -> shard), each read from the shard the index gives it."""
    return {name: spec for shard in sorted(set(files.values()))
            for name, spec in header_specs(folder / shard).items() if files.get(name) == shard}
