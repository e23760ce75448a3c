"""GGUF files converted once to a Hugging Face directory in a local cache, then loaded from there.

Reading a GGUF file through transformers parses its metadata several times (config, tokenizer, weights) and
dequantizes every tensor; the converted directory (float safetensors, config, tokenizer) loads in a
fraction of that time. The cache key is the file's name, size and a digest of its first and last 8 MiB, so
every copy of one file (one per virtual environment) shares a conversion, and reading the key costs no more
than 16 MiB however large the file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.progress import phase


def cache_root() -> Path:
    """``$QUANTKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/quantkit``, else ``~/.cache/quantkit``."""
    if os.environ.get("QUANTKIT_CACHE_DIR"):
        return Path(os.environ["QUANTKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantkit"


KEY_BYTES = 8 << 20  # read from each end of the file for its cache key


def _cache_key(path: Path) -> str:
    """The file's name, size and a digest of its two ends (header and metadata, first and last tensors)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(KEY_BYTES))
        handle.seek(max(size - KEY_BYTES, 0))
        digest.update(handle.read(KEY_BYTES))
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def converted_gguf_dir(path: Path) -> Path:
    """The Hugging Face directory holding ``path``'s weights, converting the file on first use."""
    target = cache_root() / "gguf" / _cache_key(path)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.resolve().parent), path.name
    with phase(f"converting {name} once into {target}"), _gguf_reader_bar_off():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise QuantkitError(f"cannot read GGUF file {path}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        _save_converted(loaded, tokenizer, target)
    return target


def _save_converted(loaded, tokenizer, target: Path) -> None:
    """Write a GGUF-loaded model and its tokenizer as a float Hugging Face directory at ``target``, atomically."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the weights below are already dequantized
    # transformers refuses to save a GGUF-loaded model, so build a plain one and hand it the weights.
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException as exc:  # a failure or an interrupt leaves no half-written conversion behind
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(exc, OSError) or not (target / "config.json").is_file():
            raise


@contextmanager
def _gguf_reader_bar_off() -> Iterator[None]:
    """Switch off the tqdm bar transformers' GGUF reader draws (its progress switch does not reach it): in a
    log it is a screenful of carriage returns, and the conversion's phase line says the same."""
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar
