"""`quantkit quantize --dry-run`: file sizes against the safetensors writer, and the predictions against real
runs of a small model (output size exact, peak RSS within 25%, resident and --offload disk)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantkit.dryrun.run import _loading_runtimes, _refusals, check_dry_run
from quantkit.dryrun.sizes import safetensors_bytes
from quantkit.errors import QuantkitError
from quantkit.models.synthetic import SyntheticShape, write_synthetic_llama
from quantkit.runplan import plan_run
from quantkit.transforms import make_transform

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.int8,
          torch.float64, torch.int16, torch.bool, torch.float8_e4m3fn]
SHAPE = SyntheticShape(num_blocks=4, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=4096)
# peak resident memory of the command, printed as the process exits
PEAK = ("import atexit, runpy, sys; atexit.register(lambda: print('PEAK', [l.split()[1] for l in "
        "open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)); "
        "sys.argv = ['quantkit', *sys.argv[1:]]; runpy.run_module('quantkit', run_name='__main__')")


@pytest.mark.parametrize("seed", range(6))
def test_safetensors_sizes_match_the_writer(tmp_path: Path, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(int(torch.randint(1, 40, (1,), generator=generator))):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=generator))]
        shape = tuple(int(n) for n in torch.randint(0, 300, (int(torch.randint(0, 3, (1,), generator=generator)),),
                                                    generator=generator))
        tensors[f"model.layers.{i % 7}.w{i}.{'é' if i == 5 else 'x'}"] = torch.zeros(shape, dtype=dtype)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert safetensors_bytes({n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}) == path.stat().st_size


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dry-run") / "model"
    write_synthetic_llama(folder, SHAPE)
    return folder


def _quantize(model: Path, calib_file: Path, output: Path, *flags: str, cwd: Path) -> tuple[int, str]:
    """Peak RSS and stdout of a `quantkit quantize` process."""
    command = [sys.executable, "-c", PEAK, "quantize", str(model), "--method", "gptq", "--bits", "4",
               "--group-size", "64", "--calib", str(calib_file), "--nsamples", "16", "--seqlen", "128",
               "-o", str(output), *flags]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stderr.split("PEAK")[-1].split()[0]) * 1024, proc.stdout


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def test_dry_run_predicts_size_exactly_and_peak_memory_within_a_quarter(small_model: Path, calib_file: Path,
                                                                         tmp_path: Path) -> None:
    _, stdout = _quantize(small_model, calib_file, tmp_path / "never", "--dry-run", cwd=tmp_path)
    assert not (tmp_path / "never").exists()
    (report,) = (tmp_path / "quantkit-reports").glob("dry-run-*.json")
    predicted = json.loads(report.read_text())
    assert "peak memory" in stdout and predicted["size_basis"] == "exact"
    resident_peak, _ = _quantize(small_model, calib_file, tmp_path / "resident", cwd=tmp_path)
    offload_peak, _ = _quantize(small_model, calib_file, tmp_path / "offload", "--offload", "disk", cwd=tmp_path)
    assert predicted["output_bytes_resident"] == _folder_bytes(tmp_path / "resident")
    assert predicted["output_bytes_offload"] == _folder_bytes(tmp_path / "offload")
    assert abs(predicted["peak_rss_resident"] / resident_peak - 1) <= 0.25, (predicted, resident_peak)
    assert abs(predicted["peak_rss_offload"] / offload_peak - 1) <= 0.25, (predicted, offload_peak)
    assert predicted["runtimes"] == ["quantkit.load", "transformers (after import quantkit)"]


def test_runtimes_leave_out_those_that_refuse() -> None:
    four = plan_run("rtn", bits=4, group_size=128, layout="gptq")
    assert "vLLM" in _loading_runtimes(four, _refusals(four))
    three = plan_run("rtn", bits=3, group_size=128, layout="gptq")
    assert _loading_runtimes(three, _refusals(three)) == ["quantkit.load", "transformers", "GPTQModel"]


def test_whole_model_steps_are_refused() -> None:
    with pytest.raises(QuantkitError, match="--dry-run cannot predict a transform"):
        check_dry_run(plan_run("rtn", bits=4, transform=make_transform("hadamard")))
