"""Calibration token windows from a named hub set, a local file or directory, or the model itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from quantkit.calib.sampling import sample_windows
from quantkit.calib.synthetic import self_windows, synthetic_windows
from quantkit.errors import OptionError, QuantkitError
from quantkit.textsources import (
    SUPPORTED_SUFFIXES,
    NamedSet,
    check_hub,
    data_dir_file,
    hub_documents,
    local_documents,
    read_conversations,
    read_documents,
    resolve_data_dir,
)

# Calibration never reads evaluation text: wikitext2 has no local file here, since only its test split is
# laid out in data directories.
CALIBRATION_SETS = {
    s.name: s
    for s in (
        NamedSet("wikitext2", "wikitext", "wikitext-2-raw-v1", "train"),
        NamedSet(
            "c4",
            "allenai/c4",
            None,
            "train",
            data_files="en/c4-train.00000-of-01024.json.gz",
            local_file="c4/c4_validation_2k.parquet",
        ),
    )
}
_LOCAL_ALTERNATIVE = f"a local {'/'.join(SUPPORTED_SUFFIXES)} file or directory, or 'synthetic'"
# (windows, tokens per window) when not given: GPTQ's 128 × 2048 for text; text sampled token by token from
# the model costs a decode step per token, so synthetic calibration takes 128 short windows of 64 tokens
# (scripts/bench_first_use.py: on SmolLM2-135M about half the time of 32 × 256, and a lower perplexity).
TEXT_WINDOWS = (128, 2048)
SYNTHETIC_WINDOWS = (128, 64)
# self: the chat template's prompt (SmolLM2's with its default system turn: about 40 tokens) and room to answer
SELF_WINDOWS = (128, 256)
# Sources sampled from the whole model, so not available where the model is read block by block.
MODEL_SAMPLED = ("synthetic", "self")


def default_windows(source: str) -> tuple[int, int]:
    """``(nsamples, seqlen)`` that calibration from ``source`` takes when they are not given."""
    return {"synthetic": SYNTHETIC_WINDOWS, "self": SELF_WINDOWS}.get(source, TEXT_WINDOWS)


CHAT_PREFIX = "chat:"  # --calib chat:FILE: conversations rendered through the model's chat template


def check_source(source: str, data_dir: str | None) -> None:
    """Refuse, before any model loads, a calibration source that cannot be read: a missing, empty or
    unreadable file, an unknown name, a data directory that does not exist or lacks the named set's file."""
    if source in MODEL_SAMPLED:
        return
    if source.startswith(CHAT_PREFIX):
        read_conversations(source[len(CHAT_PREFIX):])
        return
    spec = CALIBRATION_SETS.get(source)
    if spec is None:
        if not Path(source).exists():
            names = ", ".join(f"'{name}'" for name in [*MODEL_SAMPLED, *CALIBRATION_SETS])
            raise OptionError(f"--calib {source}: no such file or directory, and not one of {names}")
        read_documents(source)  # empty, binary or malformed text is named now, not after the model loaded
    elif data_dir_file(spec.local_file, data_dir) is None:
        check_hub(spec, _alternative(spec))
    if data_dir is not None:  # a bad --data-dir is refused even where this source does not read it
        resolve_data_dir(data_dir)


def _named_documents(spec: NamedSet, data_dir: str | None) -> Sequence[str]:
    local = data_dir_file(spec.local_file, data_dir)
    if local is not None:
        return read_documents(local, spec.field)
    return hub_documents(spec, _alternative(spec))


def _alternative(spec: NamedSet) -> str:
    """What to pass instead of a hub set that cannot be had."""
    if spec.local_file:
        return f"--data-dir DIR holding {spec.local_file}, or {_LOCAL_ALTERNATIVE}"
    return _LOCAL_ALTERNATIVE


def load_calibration(
    source: str,
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    model: torch.nn.Module | None = None,
    data_dir: str | None = None,
) -> torch.Tensor:
    """[nsamples, seqlen] int64 calibration token ids.

    `source`: 'synthetic' or 'self' (sampled from `model`), 'wikitext2' or 'c4' (train splits on the hub; c4 may come
    from `data_dir` or $QUANTKIT_DATA_DIR), 'chat:FILE' (JSONL conversations through the tokenizer's chat
    template), or a local file or directory (see textsources.read_documents).
    """
    if nsamples < 1:
        raise QuantkitError(f"calibration needs at least 1 sample, got nsamples={nsamples}")
    if seqlen < 2:
        raise QuantkitError(f"calibration sequences need at least 2 tokens, got seqlen={seqlen}")
    if source in MODEL_SAMPLED:
        if model is None:
            raise QuantkitError(f"{source} calibration samples text from the model, but no model was given")
        sample = synthetic_windows if source == "synthetic" else self_windows
        return sample(model, tokenizer, nsamples, seqlen, seed)
    spec = CALIBRATION_SETS.get(source)
    if source.startswith(CHAT_PREFIX):
        conversations = chat_documents(read_conversations(source[len(CHAT_PREFIX):]), tokenizer)
        return sample_windows(conversations, tokenizer, nsamples, seqlen, seed, anchored=True)
    if spec is None:
        documents = local_documents(source, [*MODEL_SAMPLED, *CALIBRATION_SETS], "calibration")
    else:
        documents = _named_documents(spec, data_dir)
    return sample_windows(documents, tokenizer, nsamples, seqlen, seed)


def chat_documents(conversations: list[list[dict[str, str]]], tokenizer) -> list[str]:
    """Each conversation as the model sees it: rendered by the tokenizer's chat template (no generation prompt;
    the template's own special tokens are in the text, so windows are cut from exactly what the model reads)."""
    if not getattr(tokenizer, "chat_template", None):
        raise QuantkitError("--calib chat:FILE renders conversations with the model's chat template, and this "
                            "model's tokenizer has none")
    return [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
