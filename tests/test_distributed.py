"""Data-parallel quantization under torchrun (2 gloo ranks on the CPU): the checkpoint the single process
writes, a killed rank failing the run cleanly and the same command resuming it, and what cannot be shared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error
from test_streaming import _tensors

from quantkit.api import CalibrationSpec, quantize
from quantkit.distributed import Ranks
from quantkit.errors import QuantkitError
from quantkit.models.synthetic import SyntheticShape, write_synthetic_llama
from quantkit.schemes import QuantScheme
from quantkit.streaming.state import STATE_FILE, work_dir

# 16 windows of 1024 tokens: the single process runs them in two batches of 8 (8192 tokens a batch), the two
# ranks one batch of 8 each, so every Gram product and every sum happens in the same float order. torchrun starts
# each rank with one thread; the single process runs with one too, since a GEMM's float order can depend on its
# thread count (it does with MKL on AVX-512 Xeons).
WINDOWS = ["--nsamples", "16", "--seqlen", "1024"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _quantize(model: Path, calib_file: Path, output: Path, ranks: int, *extra: str) -> list[str]:
    launcher = TORCHRUN if ranks > 1 else [sys.executable]
    return [*launcher, "-m", "quantkit", "quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size",
            "64", "--calib", str(calib_file), *WINDOWS, *extra, "-o", str(output)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("distributed") / "model"
    write_synthetic_llama(folder, SyntheticShape(6, 128, 256, 4, 2, 384))
    return folder


@pytest.fixture(scope="module")
def single_process(model_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("single") / "out"
    subprocess.run(_quantize(model_dir, calib_file, output, 1), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # as torchrun starts each rank
    return output


@pytest.mark.parametrize("offload", [False, True])
def test_two_ranks_write_the_single_process_checkpoint(model_dir: Path, calib_file: Path, single_process: Path,
                                                        tmp_path: Path, offload: bool) -> None:
    output = tmp_path / "ranks"
    done = subprocess.run(_quantize(model_dir, calib_file, output, 2, *(["--offload", "disk"] if offload else [])),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tensors(output) == _tensors(single_process)
    assert json.loads((output / "config.json").read_text()) == json.loads((single_process / "config.json").read_text())
    assert done.stdout.count("layers quantized") == 1  # one rank reports
    assert not work_dir(output).exists()


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The process id of torchrun's worker ``rank``: a child of the launcher with ``RANK=rank`` in its environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_rank_fails_the_run_and_the_same_command_resumes(model_dir: Path, calib_file: Path,
                                                                   single_process: Path, tmp_path: Path) -> None:
    output = tmp_path / "killed"
    command = _quantize(model_dir, calib_file, output, 2, "--offload", "disk")
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    state_file, killed_after, deadline = work_dir(output) / STATE_FILE, None, time.monotonic() + 300
    while launcher.poll() is None and time.monotonic() < deadline:
        try:
            finished = json.loads(state_file.read_text())["next_block"]
        except (OSError, ValueError, KeyError):
            finished = 0
        pid = _rank_pid(launcher, 1) if finished >= 1 else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed_after = finished
            break
        time.sleep(0.01)
    _, stderr = launcher.communicate(timeout=300)
    assert killed_after is not None and killed_after < 6, "the run ended before rank 1 could be killed"
    assert launcher.returncode != 0, "a run whose rank died must fail"
    assert not output.exists()
    assert state_file.is_file()
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming at block" in rerun.stderr
    assert _tensors(output) == _tensors(single_process)
    assert not work_dir(output).exists()


def test_a_state_left_by_two_ranks_is_not_resumed_by_one(model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    launcher = subprocess.Popen(_quantize(model_dir, calib_file, output, 2, "--offload", "disk"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file, deadline = work_dir(output) / STATE_FILE, time.monotonic() + 300
    while launcher.poll() is None and time.monotonic() < deadline:
        pid = _rank_pid(launcher, 0) if state_file.is_file() else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    launcher.wait(timeout=300)
    assert launcher.returncode != 0 and state_file.is_file() and not output.exists()
    single = subprocess.run(_quantize(model_dir, calib_file, output, 1, "--offload", "disk"), capture_output=True,
                            text=True)
    assert_one_line_error(single, "different arguments (ranks)")


def test_windows_are_split_in_contiguous_shares_that_cover_them_all() -> None:
    calib = torch.arange(7 * 3).reshape(7, 3)
    shares = [Ranks(rank, 3).windows(calib) for rank in range(3)]
    assert torch.equal(torch.cat(shares), calib)
    assert sorted(len(share) for share in shares) == [2, 2, 3]
    with pytest.raises(QuantkitError, match="2 calibration windows cannot be split over 3 ranks"):
        Ranks(0, 3).windows(calib[:2])


def test_solves_go_costliest_first_to_the_least_loaded_rank() -> None:
    costs = [576 * 576, 192 * 576, 192 * 576]  # q, k, v
    assert Ranks(0, 2).owners(costs) == [0, 1, 1]
    assert Ranks(0, 1).owners(costs) == [0, 0, 0]
    assert Ranks(1, 3).owners([5, 5, 5, 5]) == [0, 1, 2, 0]


@pytest.mark.parametrize("option", [{"transform": "hadamard"}, {"allocation": "target"}])
def test_what_the_ranks_cannot_share_is_refused_first(model_dir: Path, calib_file: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, option: dict) -> None:
    from quantkit.allocation.options import AllocationOptions
    from quantkit.transforms import make_transform

    monkeypatch.setenv("WORLD_SIZE", "2")
    extra = ({"transform": make_transform("hadamard")} if "transform" in option
             else {"allocation": AllocationOptions(target_bits=3.5)})
    with pytest.raises(QuantkitError, match="data-parallel runs \\(torchrun\\) cannot do"):
        quantize(str(model_dir), "gptq", QuantScheme(4, 64, True), CalibrationSpec(str(calib_file), 4, 32),
                 output=tmp_path / "out", **extra)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("environment", "message"), [
    ({"WORLD_SIZE": "2"}, "RANK/LOCAL_RANK are missing"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "could not join the process group of 2 ranks"),
    ({"WORLD_SIZE": "two"}, "is not a number of ranks"),
])
def test_a_launch_without_torchrun_s_rendezvous_is_one_line(model_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, environment: dict,
                                                            message: str) -> None:
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(QuantkitError, match=message):
        quantize(str(model_dir), "rtn", QuantScheme(4, 64, True), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _share_worker(rank: int, folder: str) -> None:
    """Rank 0 quantizes one layer with SpQR (tensors of four dtypes) and shares it with rank 1."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from quantkit.quantizers import make_quantizer
    from quantkit.quantizers.base import LayerStats

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        qt = None
        if rank == 0:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(256, 41, generator=gen)  # 41 int16 perm entries: the next int32 tensor starts unaligned
            quantizer = make_quantizer("spqr")
            qt = quantizer.quantize(torch.randn(9, 41, generator=gen), LayerStats((x.T @ x).double(), 256),
                                    quantizer.default_scheme(3))
            save_file({name: t.contiguous() for name, t in qt.to_tensors().items()}, f"{folder}/made.safetensors")
        shared = Ranks(rank, 2).share(qt, 0)
        save_file({"weight": shared.dequantize(), **{name: t.contiguous() for name, t in shared.to_tensors().items()}},
                  f"{folder}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_a_shared_tensor_arrives_with_the_bytes_its_owner_made(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    torch.multiprocessing.spawn(_share_worker, args=(str(tmp_path),), nprocs=2)
    made = load_file(str(tmp_path / "made.safetensors"))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert len({t.dtype for t in made.values()}) >= 3
    for received in ranks:
        assert set(received) == {"weight", *made}
        for name, tensor in made.items():
            assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
