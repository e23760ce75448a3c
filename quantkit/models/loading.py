"""Loading a full-precision causal LM and its tokenizer from a hub id, a directory, a GGUF file or an alias."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.diskspace import size_text
from quantkit.errors import OptionError, QuantkitError, one_line
from quantkit.hub import MODELS_OFFLINE, cached_config, is_repo_id, unreachable
from quantkit.models.adapters import ModelAdapter
from quantkit.models.architectures import adapter_for
from quantkit.models.builtin import BUILTIN_MODELS, resolve_builtin
from quantkit.models.experts import stored_modules
from quantkit.models.gguf_cache import converted_gguf_dir
from quantkit.models.skeleton import CheckedSource


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    source: str
    stored_dtype: torch.dtype = torch.float32  # the dtype the source keeps its weights in

    @property
    def stored_bytes(self) -> int:
        """The size of the model's parameters in the dtype the source stores them in."""
        return stored_bytes(self.model, self.stored_dtype)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def check_model_exists(spec: str) -> None:
    """Refuse at once a spec that is no built-in alias, no local file or directory, and no hub id that can be
    had (downloaded already, or the hub reachable): the hub clients would retry for half a minute first."""
    if spec in BUILTIN_MODELS or Path(spec).expanduser().exists():
        return
    if not is_repo_id(spec) or spec.endswith((".gguf", ".bin", ".safetensors")):
        raise QuantkitError(f"model not found: {spec} (no such file or directory)")
    if cached_config(spec):
        return
    reason = unreachable(MODELS_OFFLINE)
    if reason:
        raise QuantkitError(f"model not found: {spec} is no local file or directory, and as a hub id it is not "
                            f"downloaded ({reason})")


def _from_pretrained_kwargs(spec: str) -> dict:
    """Where and how transformers should read ``spec``; a clear error when it cannot exist."""
    if spec in BUILTIN_MODELS:
        return {"pretrained_model_name_or_path": str(converted_gguf_dir(resolve_builtin(spec)))}
    check_model_exists(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return {"pretrained_model_name_or_path": str(converted_gguf_dir(path))}
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise QuantkitError(f"{spec} is not a Hugging Face model directory (no config.json)")
        return {"pretrained_model_name_or_path": str(path)}
    # a hub id: downloaded already, or the hub answered just now; offline, never let the clients retry
    return {"pretrained_model_name_or_path": spec, "local_files_only": unreachable(MODELS_OFFLINE) is not None}


def check_float_model(spec: str, in_memory: bool = True, trust_remote_code: bool = False) -> tuple[dict, object]:
    """Refuse at once, before any data or weights are read, a model that quantization cannot start from: one
    that is not there, an unsupported architecture, a quantized checkpoint, pickle weights, a config its
    weights contradict, and (when it is to be loaded whole, ``in_memory``) one larger than the memory.
    Returns how transformers reads it and its config."""
    _quiet_transformers()
    kwargs = _from_pretrained_kwargs(spec)
    config = _read_config(spec, kwargs, trust_remote_code)
    _refuse_quantized(spec, getattr(config, "quantization_config", None))
    adapter_for(config.model_type)
    folder = Path(kwargs["pretrained_model_name_or_path"])
    if folder.is_dir():
        _check_local_weights(folder, in_memory)
    return kwargs, config


def float32_bytes(module: nn.Module) -> int:
    """What ``module``'s parameters (each shared one once) take in float32, the dtype quantkit loads them in."""
    return sum(p.numel() for p in module.parameters()) * torch.float32.itemsize


def _check_local_weights(folder: Path, in_memory: bool) -> None:
    """Refuse a directory whose weights are pickles, whose safetensors headers disagree with its config (a
    lying size would allocate terabytes), or (when it is to be loaded whole, ``in_memory``) whose weights are
    more than the memory can hold."""
    skeleton = CheckedSource(folder).model  # the config and headers, checked; the model on the meta device
    needed = float32_bytes(skeleton)
    available = _available_memory()
    if in_memory and available is not None and needed > available:
        raise QuantkitError(f"{folder} needs {size_text(needed)} of memory in float32 and only "
                            f"{size_text(available)} is available; quantize it with --offload disk")


def _refuse_quantized(spec: str, quantization_config: object) -> None:
    if quantization_config is not None:
        method = (quantization_config.get("quant_method") if isinstance(quantization_config, dict)
                  else getattr(quantization_config, "quant_method", None))
        raise QuantkitError(f"{spec} is already quantized (quant_method {method}); this needs the float model "
                            "(`quantkit eval` and quantkit.load read a quantized checkpoint from its local directory)")


def _available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _read_config(spec: str, kwargs: dict, trust_remote_code: bool):
    """The model's config, read without loading weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(**kwargs, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers validates configs with several exception types
        raise QuantkitError(f"cannot read the config of {spec!r}: {one_line(exc)}") from None


def load_model(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               checked: tuple[dict, object] | None = None) -> LoadedModel:
    """Load ``spec`` for quantization or evaluation; unsupported architectures fail before any weight loads
    (``checked``: what :func:`check_float_model` returned for it already)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs, config = checked or check_float_model(spec, trust_remote_code=trust_remote_code)
    adapter = adapter_for(config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**kwargs, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise QuantkitError(f"cannot load model {spec!r}: {_first_line(exc)}") from None
    model.eval()
    stored_modules(model, adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    check_finite(model)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, source=spec,
                       stored_dtype=stored_dtype(config))


def check_finite(module: nn.Module, prefix: str = "") -> None:
    """Refuse NaN or infinite values in any float parameter or buffer of ``module`` (named under ``prefix``;
    those still on the meta device are skipped): in embeddings and norms as in linears, one would poison
    every activation, and the error would surface far from its cause."""
    for name, tensor in [*module.named_parameters(prefix=prefix), *module.named_buffers(prefix=prefix)]:
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            raise QuantkitError(f"the model's tensor {name} contains NaN or infinite values")


def stored_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The size of ``model``'s parameters (tied ones once) stored in ``dtype``."""
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def stored_dtype(config: object) -> torch.dtype:
    """The float dtype a config (object or config.json dict) says the weights are stored in (float32 when it
    does not say)."""
    fields = config if isinstance(config, dict) else vars(config)
    dtype = fields.get("dtype") or fields.get("torch_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def local_model_dir(spec: str, reader: str = "--offload disk") -> Path:
    """The local Hugging Face directory ``spec`` names (for a GGUF file or a built-in alias, its converted copy);
    a hub id is refused, since ``reader`` (streaming, the dry run) reads shards from disk."""
    path = Path(_from_pretrained_kwargs(spec)["pretrained_model_name_or_path"])
    if not path.is_dir():
        raise QuantkitError(f"{reader} reads a model from a local directory; {spec!r} is not one "
                            "(download it first, e.g. with `hf download`)")
    return path


def load_local_tokenizer(folder: Path):
    """The tokenizer saved in ``folder`` (never running code shipped with it); a clear error if it is broken."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - tokenizers and transformers fail with many exception types
        raise QuantkitError(f"cannot load the tokenizer in {folder}: {_first_line(exc)}") from None


def check_context(model: nn.Module, seqlen: int, flag: str) -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``): positions it never saw
    would skew the statistics measured on them."""
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:
        raise OptionError(f"{flag} {seqlen} is longer than the model's context of {context} tokens "
                          "(max_position_embeddings)")
