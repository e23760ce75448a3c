"""Hostile checkpoints: hypothesis mutates real checkpoints (native, GPTQ, compressed-tensors, and a float model
that ``--offload disk`` streams) byte by byte, header by header and config field by config field; every
mutation must either load (and run a forward pass; the float model: GPTQ in streaming, then load) or be
refused with a one-line QuantkitError that leaves no output behind. Anything else (a traceback from torch, safetensors, transformers
or json) fails the test. The budget is fixed and the search derandomized, so CI runs the same cases."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantkit
from quantkit.api import CalibrationSpec, quantize
from quantkit.errors import QuantkitError
from quantkit.schemes import QuantScheme

LAYOUTS = {"native": QuantScheme(4, 32, False), "gptq": QuantScheme(4, 32, True),
           "compressed-tensors": QuantScheme(4, 32, True)}
STREAMED = "float model, streamed"
EXAMPLES_PER_LAYOUT = int(os.environ.get("QUANTKIT_FUZZ_EXAMPLES", "200"))  # CI's fixed budget
# Mutation classes; the config's many fields (every layer's scheme) get a larger share of the budget.
KINDS = ["truncate", "flip_header", "flip_data", "header_length", "header_field", "config_text", "drop_file",
         "pickle", *["config_field"] * 4]
OUTCOMES: Counter = Counter()  # (layout, mutation class, outcome) over the whole module


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-originals")
    out = {}
    for layout, scheme in LAYOUTS.items():
        out[layout] = root / layout
        quantize(str(tiny_model_dir), method="rtn", scheme=scheme, calibration=CalibrationSpec(str(calib_file), 2, 16),
                 output=out[layout], layout=layout)
    out[STREAMED] = tiny_model_dir
    yield out
    summary = ", ".join(f"{layout}/{kind}/{outcome}: {n}" for (layout, kind, outcome), n in sorted(OUTCOMES.items()))
    print(f"\nfuzzed checkpoints ({sum(OUTCOMES.values())} mutations): {summary}")


def _split(blob: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, dict]:
    """A mutation class and its parameters (applied to a copy of a checkpoint by :func:`mutate`)."""
    kind = draw(st.sampled_from(KINDS))
    params = {"at": draw(st.floats(0, 1, exclude_max=True)), "mask": draw(st.integers(1, 255)),
              "value": draw(st.one_of(st.integers(-2**40, 2**40), st.sampled_from(
                  [0, -1, 1, 2**31, 2**63, "F64", "I8", "U8", "BOOL", "x", None, [], [1, 2], {}, 1.5, float("nan")]))),
              "pick": draw(st.integers(0, 10**6)),
              "field": draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "add"]))}
    return kind, params


def _pick(items: list, n: int):
    return items[n % len(items)]


def _config_paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    """Every (nested) key path of a JSON object whose value is a scalar or a list."""
    paths = []
    for key, value in config.items():
        if isinstance(value, dict):
            paths += _config_paths(value, (*prefix, key))
        else:
            paths.append((*prefix, key))
    return paths


def mutate(folder: Path, kind: str, p: dict) -> None:
    weights = folder / "model.safetensors"
    blob = weights.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    if kind == "truncate":
        weights.write_bytes(blob[: int(p["at"] * len(blob))])
    elif kind in ("flip_header", "flip_data"):
        start, end = (0, 8 + length) if kind == "flip_header" else (8 + length, len(blob))
        at = start + int(p["at"] * (end - start))
        weights.write_bytes(blob[:at] + bytes([blob[at] ^ p["mask"]]) + blob[at + 1:])
    elif kind == "header_length":
        value = p["value"] if isinstance(p["value"], int) else p["pick"]
        weights.write_bytes(struct.pack("<Q", value % 2**64) + blob[8:])
    elif kind == "header_field":
        header, data = _split(blob)
        names = sorted(k for k in header if k != "__metadata__")
        name = _pick(names, p["pick"])
        entry = header[name]
        if p["field"] == "drop":
            del header[name]
        elif p["field"] == "add":
            header[f"{name}.extra"] = dict(entry)
        elif p["field"] == "dtype":
            entry["dtype"] = p["value"] if isinstance(p["value"], str) else "F16"
        elif p["field"] == "shape":
            entry["shape"] = [*entry["shape"][:-1], p["value"]] if isinstance(p["value"], int) and entry["shape"] \
                else p["value"]
        else:
            begin, stop = entry["data_offsets"]
            entry["data_offsets"] = [begin, stop + (p["value"] if isinstance(p["value"], int) else 1)]
        weights.write_bytes(_join(header, data))
    elif kind == "config_field":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        keys = _pick(_config_paths(config), p["pick"])
        target = config
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = p["value"]
        path.write_text(json.dumps(config))
    elif kind == "config_text":
        path = folder / "config.json"
        text = path.read_text()
        path.write_text(text[: int(p["at"] * len(text))])
    elif kind == "drop_file":
        _pick(sorted(folder.iterdir()), p["pick"]).unlink()
    elif kind == "pickle":
        torch.save({"weight": torch.zeros(2)}, folder / "pytorch_model.bin")
        weights.unlink()


def outcome(folder: Path, layout: str, calib_file: Path) -> str:
    """``loaded`` (and a forward pass ran) or ``refused`` (one-line QuantkitError, nothing written); anything
    else raises."""
    checkpoint = folder
    try:
        if layout == STREAMED:
            checkpoint = folder.parent / "streamed"
            shutil.rmtree(checkpoint, ignore_errors=True)
            quantize(str(folder), method="gptq", scheme=QuantScheme(4, 32, False), output=checkpoint, offload="disk",
                     calibration=CalibrationSpec(str(calib_file), 2, 16))
        model = quantkit.load(checkpoint, kernel="dequant")
    except QuantkitError as exc:
        assert "\n" not in str(exc) and str(exc)
        assert not [p for p in folder.parent.iterdir() if p.name.startswith("streamed")]
        return "refused"
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    return "loaded"


@pytest.mark.parametrize("layout", [*LAYOUTS, STREAMED])
def test_every_mutation_loads_or_is_refused_in_one_line(layout: str, checkpoints: dict[str, Path], calib_file: Path,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp(f"fuzz-{layout}")

    @settings(max_examples=EXAMPLES_PER_LAYOUT, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutation=mutations())
    def check(mutation: tuple[str, dict]) -> None:
        kind, params = mutation
        folder = work / "ckpt"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(checkpoints[layout], folder)
        mutate(folder, kind, params)
        OUTCOMES[(layout, kind, outcome(folder, layout, calib_file))] += 1

    check()
    assert sum(n for (lay, _, _), n in OUTCOMES.items() if lay == layout) >= EXAMPLES_PER_LAYOUT
