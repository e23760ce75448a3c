"""Streaming quantization (--offload disk): equal to the resident run, one block in memory, resumable after a
failure or SIGKILL with byte-identical output, refusing mismatched reruns and bad input; device placement."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.api import CalibrationSpec, quantize
from quantkit.devices import resolve_devices
from quantkit.engine import block_devices
from quantkit.errors import QuantkitError
from quantkit.models.synthetic import SyntheticShape, write_synthetic_llama
from quantkit.schemes import QuantScheme
from quantkit.streaming.source import StreamedModel
from quantkit.streaming.state import STATE_FILE, RunState, work_dir

SHAPE = SyntheticShape(num_blocks=5, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=384)
SCHEME = QuantScheme(4, 64, False)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic") / "model"
    write_synthetic_llama(folder, SHAPE)
    return folder


def _tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor of a checkpoint as raw bytes (with its dtype and shape)."""
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def _options(calib_file: Path, output: Path | None) -> dict:
    return dict(method="gptq", scheme=SCHEME, calibration=CalibrationSpec(str(calib_file), 4, 32), output=output)


def _run(model: Path, output: Path, calib_file: Path, **kwargs):
    return quantize(str(model), **(_options(calib_file, output) | kwargs))


@pytest.mark.parametrize(("model", "method"), [("synthetic_dir", "gptq"), ("synthetic_dir", "rtn"),
                                               ("tiny_model_dir", "gptq")])  # untied and tied heads
def test_streamed_checkpoint_equals_the_resident_one(model: str, method: str, calib_file: Path, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(model)
    _run(folder, tmp_path / "resident", calib_file, method=method)
    _run(folder, tmp_path / "streamed", calib_file, method=method, offload="disk")
    resident, streamed = _tensors(tmp_path / "resident"), _tensors(tmp_path / "streamed")
    assert len(streamed) == len(resident) and streamed == resident
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == \
        json.loads((tmp_path / "resident" / "config.json").read_text())
    assert (tmp_path / "streamed" / "generation_config.json").read_text() == \
        (tmp_path / "resident" / "generation_config.json").read_text()  # with or without the source's own file
    assert not work_dir(tmp_path / "streamed").exists()
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert len(set(index["weight_map"].values())) == blocks + 1  # a shard per block, one for the rest


def test_only_one_block_is_in_memory_at_a_time(synthetic_dir: Path, calib_file: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    resident_blocks: list[int] = []
    original = StreamedModel.load_block

    def counting_load(self: StreamedModel, index: int, device: torch.device):
        block = original(self, index, device)
        resident_blocks.append(sum(not self.block(i).self_attn.q_proj.weight.is_meta for i in range(self.num_blocks)))
        return block

    monkeypatch.setattr(StreamedModel, "load_block", counting_load)
    _run(synthetic_dir, tmp_path / "out", calib_file, offload="disk")
    assert resident_blocks == [1] * SHAPE.num_blocks


@contextmanager
def _crash_at_block(crash_at: int) -> Iterator[None]:
    """A crash (not a refusal) when the streamed run reaches block ``crash_at``, as a killed process would stop."""
    original = StreamedModel.load_block

    def failing_load(self: StreamedModel, index: int, device: torch.device):
        if index == crash_at:
            raise RuntimeError("simulated crash")
        return original(self, index, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StreamedModel, "load_block", failing_load)
        yield


def test_a_failed_run_resumes_and_writes_the_same_bytes(synthetic_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    _run(synthetic_dir, tmp_path / "whole", calib_file, offload="disk")
    with _crash_at_block(3), pytest.raises(RuntimeError, match="simulated crash"):
        _run(synthetic_dir, tmp_path / "resumed", calib_file, offload="disk")
    state = json.loads((work_dir(tmp_path / "resumed") / STATE_FILE).read_text())
    assert state["next_block"] == 3 and not (tmp_path / "resumed").exists()
    _run(synthetic_dir, tmp_path / "resumed", calib_file, offload="disk")
    assert _tensors(tmp_path / "resumed") == _tensors(tmp_path / "whole")
    assert not work_dir(tmp_path / "resumed").exists()


def test_a_run_stopped_in_its_publish_step_only_publishes_when_rerun(synthetic_dir: Path, calib_file: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    def crash(*_args) -> None:
        raise RuntimeError("simulated crash")

    _run(synthetic_dir, tmp_path / "whole", calib_file, offload="disk")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="simulated crash"):
        patch.setattr("quantkit.streaming.run.publish_directory", crash)
        _run(synthetic_dir, tmp_path / "out", calib_file, offload="disk")
    folder = work_dir(tmp_path / "out")
    assert json.loads((folder / STATE_FILE).read_text())["next_block"] == SHAPE.num_blocks
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", STATE_FILE]  # no half-made publish folder
    capsys.readouterr()
    _run(synthetic_dir, tmp_path / "out", calib_file, offload="disk")
    stderr = capsys.readouterr().err
    assert f"all {SHAPE.num_blocks} blocks are done in {folder}; publishing" in stderr and "resuming" not in stderr
    assert _tensors(tmp_path / "out") == _tensors(tmp_path / "whole") and not folder.exists()


def test_sigkill_mid_run_then_the_same_command_resumes_byte_identically(tmp_path: Path, calib_file: Path) -> None:
    model = tmp_path / "deep"
    write_synthetic_llama(model, SyntheticShape(8, 256, 512, 4, 2, 384))
    command = [sys.executable, "-m", "quantkit", "quantize", str(model), "--method", "gptq", "--bits", "4",
               "--group-size", "64", "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "64",
               "--offload", "disk", "-o"]
    subprocess.run([*command, str(tmp_path / "whole")], check=True, capture_output=True)
    state_file = work_dir(tmp_path / "killed") / STATE_FILE
    process = subprocess.Popen([*command, str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    killed_after = None
    while process.poll() is None:
        try:
            finished = json.loads(state_file.read_text())["next_block"]
        except (OSError, ValueError):
            finished = 0
        if finished >= 2:
            os.killpg(process.pid, signal.SIGKILL)
            killed_after = finished
            break
        time.sleep(0.01)
    process.wait()
    assert killed_after is not None and killed_after < 8, "the run ended before it could be killed"
    assert not (tmp_path / "killed").exists()
    rerun = subprocess.run([*command, str(tmp_path / "killed")], check=True, capture_output=True, text=True)
    assert "resuming at block" in rerun.stderr
    assert _tensors(tmp_path / "killed") == _tensors(tmp_path / "whole")
    assert (tmp_path / "killed" / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()


def test_a_rerun_with_other_arguments_or_calibration_is_refused(synthetic_dir: Path, calib_file: Path,
                                                                  tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(calib_file.read_text())
    with _crash_at_block(2), pytest.raises(RuntimeError):
        _run(synthetic_dir, tmp_path / "out", text, offload="disk")
    with pytest.raises(QuantkitError, match=r"different arguments \(seed\)"):
        _run(synthetic_dir, tmp_path / "out", text, offload="disk", seed=1)
    with pytest.raises(QuantkitError, match=r"different arguments \(scheme\)"):
        _run(synthetic_dir, tmp_path / "out", text, offload="disk", scheme=QuantScheme(3, 64, False))
    text.write_text(calib_file.read_text().replace("model", "network"))
    with pytest.raises(QuantkitError, match="calibration windows differ"):
        _run(synthetic_dir, tmp_path / "out", text, offload="disk")
    assert (work_dir(tmp_path / "out") / STATE_FILE).is_file()  # still there to resume


def test_non_finite_weights_are_refused_and_leave_nothing(synthetic_dir: Path, calib_file: Path,
                                                          tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    write_synthetic_llama(broken, SHAPE)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.3.mlp.up_proj.weight"
    shard = broken / index["weight_map"][name]
    with safe_open(str(shard), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard))
    with pytest.raises(QuantkitError, match="tensor model.layers.3.mlp.up_proj.weight contains NaN"):
        _run(broken, tmp_path / "out", calib_file, offload="disk")
    assert not (tmp_path / "out").exists() and not work_dir(tmp_path / "out").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"offload": "ram"}, "unknown --offload 'ram'"),
    ({"offload": "disk", "layout": "gptq", "scheme": QuantScheme(4, 64, True)}, "cannot work with the gptq layout"),
    ({"offload": "disk", "output": None}, "cannot work with no output directory"),
    ({"offload": "disk", "calibration": CalibrationSpec("synthetic", 2, 16)}, "synthetic calibration"),
    ({"devices": ["cuda:0"]}, "cuda:0 is not available"),
    ({"devices": ["tpu"]}, "unknown device 'tpu'"),
])
def test_bad_streaming_options_are_refused(synthetic_dir: Path, calib_file: Path, tmp_path: Path, kwargs: dict,
                                           message: str) -> None:
    if "cuda" in str(kwargs.get("devices")) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(QuantkitError, match=message):
        quantize(str(synthetic_dir), **(_options(calib_file, tmp_path / "out") | kwargs))
    assert not (tmp_path / "out").exists() and not work_dir(tmp_path / "out").exists()


def test_missing_tensors_and_pickle_weights_are_refused_before_any_work(synthetic_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match="model not found"):
        quantize("org/never-downloaded", offload="disk", output=tmp_path / "out")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((synthetic_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(QuantkitError, match="pickle weights"):
        StreamedModel(pickled)
    short = tmp_path / "short"
    write_synthetic_llama(short, SHAPE)
    index = json.loads((short / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.4.mlp.down_proj.weight"]
    (short / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(QuantkitError, match="missing tensor model.layers.4.mlp.down_proj.weight"):
        StreamedModel(short)


def test_devices_spread_blocks_in_even_contiguous_runs_and_change_no_result(
        synthetic_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    a, b, c = (torch.device(f"cuda:{i}") for i in range(3))
    assert block_devices(10, [a, b, c]) == [a] * 4 + [b] * 3 + [c] * 3
    assert block_devices(2, [a, b, c]) == [a, b]
    assert resolve_devices(["cpu", " cpu"]) == (torch.device("cpu"),) * 2
    _run(synthetic_dir, tmp_path / "plain", calib_file)
    _run(synthetic_dir, tmp_path / "spread", calib_file, devices=["cpu", "cpu"])
    _run(synthetic_dir, tmp_path / "streamed", calib_file, devices=["cpu", "cpu"], offload="disk")
    assert _tensors(tmp_path / "spread") == _tensors(tmp_path / "plain") == _tensors(tmp_path / "streamed")


def test_remote_code_runs_only_when_trusted(tmp_path: Path) -> None:
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom-remote'\n")
    (model / "config.json").write_text(json.dumps({
        "model_type": "custom-remote", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    for kwargs in ({}, {"offload": "disk"}):
        with pytest.raises(QuantkitError):
            quantize(str(model), method="rtn", output=tmp_path / "out", **kwargs)
        assert not marker.exists()
    with pytest.raises(QuantkitError, match="custom-remote"):  # ran, then refused as an unsupported architecture
        quantize(str(model), method="rtn", output=tmp_path / "out", trust_remote_code=True)
    assert marker.exists()


def test_a_stored_head_despite_a_tie_and_the_generation_defaults_are_kept_as_transformers_keeps_them(
        tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    model = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, model)
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    head = torch.randn_like(tensors["model.embed_tokens.weight"])  # stored despite the tie: transformers uses it
    save_file(tensors | {"lm_head.weight": head}, str(model / "model.safetensors"), metadata={"format": "pt"})
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.3, "top_p": 0.9}))
    _run(model, tmp_path / "resident", calib_file)
    _run(model, tmp_path / "streamed", calib_file, offload="disk")
    streamed = _tensors(tmp_path / "streamed")
    assert streamed["lm_head.weight"][2] == head.numpy().tobytes() and streamed == _tensors(tmp_path / "resident")
    assert "lm_head.weight" not in _tensors(tiny_model_dir)  # the usual tied checkpoint stores the head once
    generation = json.loads((tmp_path / "streamed" / "generation_config.json").read_text())
    assert generation["temperature"] == 0.3 and generation["do_sample"] is True
    assert generation == json.loads((tmp_path / "resident" / "generation_config.json").read_text())


def test_two_runs_cannot_share_a_work_directory(synthetic_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    holder = RunState.open(tmp_path / "out", {"another": "run"})
    try:
        with pytest.raises(QuantkitError, match="another quantkit run is writing"):
            _run(synthetic_dir, tmp_path / "out", calib_file, offload="disk")
    finally:
        holder.release()
    holder.discard()
