"""The tokenizer part of a GGUF file's metadata (``tokenizer.*`` keys), so that llama.cpp tokenizes as the model
was trained.

When the model came from a GGUF file, its ``tokenizer.*`` keys are copied as they are (a Hugging Face tokenizer
converted from GGUF has lost, for one, llama.cpp's pre-tokenizer name). Otherwise they are built from the
Hugging Face tokenizer: byte-level BPE (``tokenizer.ggml.model = gpt2``), its tokens by id, merges, special
token ids and chat template, and the pre-tokenizer recognised from ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType

from quantkit.errors import QuantkitError

# (key, value, value type, element type of an array)
Field = tuple[str, Any, GGUFValueType, GGUFValueType | None]

_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp's token types
_DIGITS_THEN_BYTES = ("Digits", "ByteLevel")  # SmolLM's pre-tokenizer: every digit alone, then GPT-2's split


def copied_fields(path: Path) -> list[Field]:
    """The ``tokenizer.*`` keys of the GGUF file at ``path``, with their types."""
    fields = []
    for key, read in GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            types = read.types
            fields.append((key, read.contents(), types[0], types[1] if len(types) > 1 else None))
    return fields


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for a ``tokenizer.json`` pre-tokenizer it can reproduce."""
    kinds = tuple(p.get("type") for p in spec.get("pretokenizers", [])) if spec and spec.get("type") == "Sequence" else ()
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    if kinds == _DIGITS_THEN_BYTES and spec["pretokenizers"][0].get("individual_digits"):
        return "smollm"
    raise QuantkitError(f"GGUF export does not know llama.cpp's name for the pre-tokenizer {json.dumps(spec)[:80]}; "
                        "export from the model's own GGUF file, or from a byte-level BPE tokenizer")


def built_fields(tokenizer) -> list[Field]:
    """``tokenizer.*`` keys built from a Hugging Face fast tokenizer (byte-level BPE only)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise QuantkitError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise QuantkitError(f"GGUF export carries byte-level BPE tokenizers, not {model.get('type')}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {token["content"]: bool(token.get("special")) for token in spec.get("added_tokens", [])}
    vocab.update({token["content"]: token["id"] for token in spec.get("added_tokens", [])})
    size = max(vocab.values()) + 1
    tokens, token_types = [f"[PAD{i}]" for i in range(size)], [_UNUSED] * size  # ids no token has
    for token, index in vocab.items():
        tokens[index] = token
        token_types[index] = (_CONTROL if added[token] else _USER_DEFINED) if token in added else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: list[Field] = [
        ("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING, None),
        ("tokenizer.ggml.pre", _pre_tokenizer(spec.get("pre_tokenizer")), GGUFValueType.STRING, None),
        ("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        ("tokenizer.ggml.token_type", token_types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        ("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
        ("tokenizer.ggml.add_bos_token", bool(getattr(tokenizer, "add_bos_token", False)), GGUFValueType.BOOL, None),
    ]
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("unknown", tokenizer.unk_token),
                       ("padding", tokenizer.pad_token)):
        if token is not None and token in vocab:
            fields.append((f"tokenizer.ggml.{key}_token_id", vocab[token], GGUFValueType.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields.append(("tokenizer.chat_template", template, GGUFValueType.STRING, None))
    return fields


def tokenizer_fields(tokenizer, source_gguf: Path | None) -> list[Field]:
    """The ``tokenizer.*`` keys to write: copied from ``source_gguf`` when the model came from one, else built."""
    if source_gguf is not None:
        return copied_fields(source_gguf)
    if tokenizer is None:
        raise QuantkitError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    return built_fields(tokenizer)
