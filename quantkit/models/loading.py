"""Loading a full-precision causal LM and its tokenizer from a hub id, a directory, a GGUF file or an alias."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter, adapter_for
from quantkit.models.builtin import BUILTIN_MODELS, resolve_builtin
from quantkit.models.gguf_cache import converted_gguf_dir


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    source: str


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def check_model_exists(spec: str) -> None:
    """Refuse at once a spec that names a local file or directory which is not there."""
    if spec in BUILTIN_MODELS or Path(spec).expanduser().exists():
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith((".gguf", ".bin", ".safetensors")):
        raise QuantkitError(f"model not found: {spec}")


def _from_pretrained_kwargs(spec: str) -> dict:
    """Where and how transformers should read ``spec``; a clear error when it cannot exist."""
    if spec in BUILTIN_MODELS:
        return {"pretrained_model_name_or_path": str(converted_gguf_dir(resolve_builtin(spec)))}
    check_model_exists(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return {"pretrained_model_name_or_path": str(converted_gguf_dir(path))}
    if path.exists():
        if not (path / "config.json").is_file():
            raise QuantkitError(f"{spec} is not a Hugging Face model directory (no config.json)")
        return {"pretrained_model_name_or_path": str(path)}
    return {"pretrained_model_name_or_path": spec}


def _read_config(spec: str, kwargs: dict, trust_remote_code: bool):
    """The model's config, read without loading weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(**kwargs, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise QuantkitError(f"cannot read the config of {spec!r}: {_first_line(exc)}") from None


def load_model(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> LoadedModel:
    """Load ``spec`` for quantization or evaluation; unsupported architectures fail before any weight loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    kwargs = _from_pretrained_kwargs(spec)
    adapter = adapter_for(_read_config(spec, kwargs, trust_remote_code).model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**kwargs, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise QuantkitError(f"cannot load model {spec!r}: {_first_line(exc)}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, source=spec)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def local_model_dir(spec: str) -> Path:
    """The local Hugging Face directory ``spec`` names (for a GGUF file or a built-in alias, its converted copy);
    a hub id is refused, since streaming reads shards from disk."""
    path = Path(_from_pretrained_kwargs(spec)["pretrained_model_name_or_path"])
    if not path.is_dir():
        raise QuantkitError(f"--offload disk reads a model from a local directory; {spec!r} is not one "
                            "(download it first, e.g. with `hf download`)")
    return path


def load_local_tokenizer(folder: Path):
    """The tokenizer saved in ``folder`` (never running code shipped with it); a clear error if it is broken."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - tokenizers and transformers fail with many exception types
        raise QuantkitError(f"cannot load the tokenizer in {folder}: {_first_line(exc)}") from None
