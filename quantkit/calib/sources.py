"""Calibration token windows from a named hub set, a local file or directory, or the model itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantkit.calib.sampling import sample_windows
from quantkit.calib.synthetic import synthetic_windows
from quantkit.errors import QuantkitError
from quantkit.textsources import (
    SUPPORTED_SUFFIXES,
    NamedSet,
    data_dir_file,
    hub_documents,
    local_documents,
    read_documents,
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


def _named_documents(spec: NamedSet, data_dir: str | None) -> Sequence[str]:
    local = data_dir_file(spec.local_file, data_dir)
    if local is not None:
        return read_documents(local, spec.field)
    alternative = _LOCAL_ALTERNATIVE
    if spec.local_file:
        alternative = f"--data-dir DIR holding {spec.local_file}, or {alternative}"
    return hub_documents(spec, alternative)


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

    `source`: 'synthetic' (sampled from `model`), 'wikitext2' or 'c4' (train splits on the hub; c4 may come
    from `data_dir` or $QUANTKIT_DATA_DIR), or a local file or directory (see textsources.read_documents).
    """
    if nsamples < 1:
        raise QuantkitError(f"calibration needs at least 1 sample, got nsamples={nsamples}")
    if seqlen < 2:
        raise QuantkitError(f"calibration sequences need at least 2 tokens, got seqlen={seqlen}")
    if source == "synthetic":
        if model is None:
            raise QuantkitError("synthetic calibration samples text from the model, but no model was given")
        return synthetic_windows(model, tokenizer, nsamples, seqlen, seed)
    spec = CALIBRATION_SETS.get(source)
    if spec is None:
        documents = local_documents(source, ["synthetic", *CALIBRATION_SETS], "calibration")
    else:
        documents = _named_documents(spec, data_dir)
    return sample_windows(documents, tokenizer, nsamples, seqlen, seed)
