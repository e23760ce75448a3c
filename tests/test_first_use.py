"""First use and bad input as a new user meets them: the CLI's conventions, options refused with exit code 2
before any work, a missing model or data directory named at once, sources quantkit must not start from,
progress in logs, Ctrl-C. Each case is a row of docs/BAD_INPUTS.md."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from test_cli import PROGRESS_LINE, assert_one_line_error, run_cli

from quantkit import __version__
from quantkit.cli import main
from quantkit.diskspace import size_text
from quantkit.progress import PIPED_WIDTH, LineProgress
from quantkit.recipes.fields import FIELDS
from quantkit.schemes import QuantScheme

Result = subprocess.CompletedProcess


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., Result]:
    """``quantkit ARGS`` run in this process (the same main() as the console script, without the start-up
    cost of a new interpreter), offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("QUANTKIT_DATA_DIR", raising=False)

    def run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["quantkit", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return Result(args, exit_info.value.code, out, err)

    return run


@pytest.fixture(scope="module")
def broken_sources(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the tiny float model, each broken in one way."""
    root = tmp_path_factory.mktemp("broken-sources")
    weights = load_file(tiny_model_dir / "model.safetensors")

    def copy(name: str, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
        folder = root / name
        folder.mkdir()
        for item in tiny_model_dir.iterdir():
            if item.name != "model.safetensors":
                (folder / item.name).write_bytes(item.read_bytes())
        if tensors is not None:
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            base = json.loads((tiny_model_dir / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**base, **config}))
        return folder

    def poisoned(name: str, value: float) -> dict[str, torch.Tensor]:
        tensors = {key: t.clone() for key, t in weights.items()}
        tensors[name].view(-1)[7] = value
        return tensors

    pickled = copy("pickle-only")
    torch.save(weights, pickled / "pytorch_model.bin")
    return {
        "pickle-only": pickled,
        "nan-embedding": copy("nan-embedding", poisoned("model.embed_tokens.weight", math.nan)),
        "inf-norm": copy("inf-norm", poisoned("model.layers.1.post_attention_layernorm.weight", math.inf)),
        "vocab-lie": copy("vocab-lie", weights, {"vocab_size": 10**12}),
        "hidden-lie": copy("hidden-lie", weights, {"hidden_size": 128}),
    }


def test_version_and_help(cli: Callable[..., Result]) -> None:
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"quantkit {__version__}"
    top = cli("-h")
    assert top.returncode == 0 and "Usage: quantkit" in top.stdout and "quantize" in top.stdout
    quantize_help = cli("quantize", "-h")
    assert quantize_help.returncode == 0
    assert all(choice in quantize_help.stdout for choice in
               ("<rtn|gptq|spqr>", "<int|fp4|mxfp4|nvfp4|fp8|q8_0|q5_0|q4_0|q4_k>", "<native|gptq|compressed-tensors|gguf>",
             "<4|8>"))
    assert "<auto|dequant|cpu|cpu-int8|aten|triton>" in cli("eval", "--help").stdout
    assert cli("inspect").returncode == 2  # a missing argument is a usage error


# (arguments, what the one error line says); {model}, {calib}, {tmp} are filled in. Exit code 2: usage errors.
USAGE_ERRORS = [
    (["quantize", "{model}", "-o", "{tmp}/o", "--format", "int5"], "--format 'int5' is not allowed; allowed: int, fp4, mxfp4, nvfp4, fp8, q8_0, q5_0, q4_0, q4_k (gptq and"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--frobnicate"], "No such option: --frobnicate"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--bits", "five"], "'--bits': Input should be a valid number"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--outlier-threshold", "0.5"],
     "method 'gptq' has no option --outlier-threshold; its options: --damp, --act-order, --static-groups, --g-idx, --mse"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--data-dir", "{tmp}/no/such/dir"], "no/such/dir: no such directory"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--data-dir", "{calib}"], "calib.txt: not a directory"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--calib", "{tmp}/missing.txt"], "missing.txt: no such file or directory"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--calib", "{calib}", "--seqlen", "4096"],
     "--seqlen 4096 is longer than the model's context of 256 tokens"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--offload", "ram"], "'--offload': 'ram' is not one of 'disk'"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--bit-choices", "2,x"], "--bit-choices must be a comma list"),
    (["quantize", "{model}", "-o", "{tmp}/o", "--act-format", "nvfp4"], "--act-format, --act-group-size and --act-static need --act-bits"),
    (["eval", "{model}", "--ppl", "{calib}", "--seqlen", "1"], "'--seqlen': Input should be greater than or equal to 2"),
    (["eval", "{model}", "--ppl", "{calib}", "--seqlen", "4096"], "--seqlen 4096 is longer than the model's context"),
    (["eval", "{model}", "--ppl", "{calib}", "--kernel", "fast"], "'--kernel': 'fast' is not one of"),
    (["eval", "{model}", "--data-dir", "{tmp}/nowhere"], "--data-dir {tmp}/nowhere: no such directory"),
    (["export", "{model}", "-o", "{tmp}/o", "--layout", "awq"], "'--layout': 'awq' is not one of"),
    (["allocate", "{model}", "--bits", "3.5", "--allocation", "greedy"], "'--allocation': 'greedy' is not one of"),
]


@pytest.mark.parametrize("args,message", USAGE_ERRORS, ids=[f"{a[0]} {' '.join(a[-2:])}" for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_with_the_help_line(cli: Callable[..., Result], tiny_model_dir: Path, calib_file: Path,
                                                tmp_path: Path, args: list[str], message: str) -> None:
    values = {"model": str(tiny_model_dir), "calib": str(calib_file), "tmp": str(tmp_path)}
    result = cli(*[a.format(**values) for a in args])
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, message.format(**values))
    assert not (tmp_path / "o").exists()


def _bad_values(field) -> list[str]:
    """Values a numeric recipe field refuses: below its minimum, above its maximum, not a number it takes."""
    values = []
    if field.minimum is not None:
        below = field.minimum - 1 if field.kind == "int" else field.minimum - 0.5
        values.append(str(int(below)) if field.kind == "int" else str(below))
    if field.maximum is not None:
        values.append(str(int(field.maximum) + 1))
    if field.allowed:
        values.append("3")
    if field.kind == "float" and not field.infinite:
        values.append("inf")
    return [v for v in values if v not in {str(a) for a in field.also}]


NUMERIC = [(f.flag, value) for f in FIELDS if f.kind in ("int", "float") for value in _bad_values(f)]


@pytest.mark.parametrize("flag,value", NUMERIC, ids=[f"{flag}={value}" for flag, value in NUMERIC])
def test_every_numeric_flag_refuses_a_bad_number(cli: Callable[..., Result], tiny_model_dir: Path, tmp_path: Path,
                                                 flag: str, value: str) -> None:
    result = cli("quantize", str(tiny_model_dir), "-o", str(tmp_path / "o"), f"{flag}={value}")
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, flag)
    assert not (tmp_path / "o").exists()


def test_missing_models_are_named_at_once_and_before_missing_data(cli: Callable[..., Result], tmp_path: Path) -> None:
    started = time.perf_counter()
    typo = cli("eval", "out/nonexistent", "--ppl", "wikitext2", "--data-dir", str(tmp_path), "--max-windows", "1")
    assert_one_line_error(typo, "model not found: out/nonexistent", "not downloaded", "HF_HUB_OFFLINE=1")
    assert_one_line_error(cli("eval", "out/nonexistent", "--ppl", "wikitext2"), "model not found: out/nonexistent")
    assert_one_line_error(cli("quantize", "someone/some-model", "-o", str(tmp_path / "o")), "model not found")
    assert_one_line_error(cli("inspect", str(tmp_path / "nonexistent")), "checkpoint not found")
    assert_one_line_error(cli("quantize", str(tmp_path / "x.gguf"), "-o", str(tmp_path / "o")),
                          "model not found", "no such file")
    assert time.perf_counter() - started < 10  # no retries against an unreachable hub


def test_missing_data_is_named_before_any_model_loads(cli: Callable[..., Result], tiny_model_dir: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "o")
    assert_one_line_error(cli("quantize", str(tiny_model_dir), "-o", out, "--calib", "c4", "--data-dir", str(tmp_path)),
                          f"the data directory {tmp_path} has no c4/c4_validation_2k.parquet")
    assert_one_line_error(cli("quantize", str(tiny_model_dir), "-o", out, "--calib", "c4"),
                          "cannot reach the hub for 'c4'", "--data-dir DIR holding c4/c4_validation_2k.parquet")
    assert_one_line_error(cli("eval", str(tiny_model_dir), "--ppl", "ptb", "--data-dir", str(tmp_path)),
                          "has no ptb/ptb.test.txt")
    monkeypatch.setenv("QUANTKIT_DATA_DIR", str(tmp_path / "gone"))
    result = cli("quantize", str(tiny_model_dir), "-o", out, "--calib", "c4")
    assert result.returncode == 1  # not an option: the environment
    assert_one_line_error(result, f"$QUANTKIT_DATA_DIR {tmp_path / 'gone'}: no such directory")
    assert "loading" not in result.stderr  # refused before the model was read


def test_zero_shot_tasks_fail_at_once_offline(tiny_model_dir: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.endswith("_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a hub that refuses connections, as an offline machine's does
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantkit", "eval", str(tiny_model_dir), "--tasks", "piqa,hellaswag"],
                          capture_output=True, text=True, env=env)
    assert_one_line_error(proc, "--tasks piqa, hellaswag read their data from the hub, which cannot be reached",
                          "127.0.0.1 unreachable", "piqa, hellaswag can run from local files with --data-dir")
    assert time.perf_counter() - started < 30 and "Retrying" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("name,message", [
    ("pickle-only", "holds pickle weights (pytorch_model.bin); quantkit loads only safetensors"),
    ("nan-embedding", "tensor model.embed_tokens.weight contains NaN or infinite values"),
    ("inf-norm", "tensor model.layers.1.post_attention_layernorm.weight contains NaN or infinite values"),
    ("vocab-lie", "it gives model.embed_tokens.weight the shape [1000000000000, 64], the file stores [320, 64]"),
    ("hidden-lie", "it gives model.embed_tokens.weight the shape [320, 128], the file stores [320, 64]"),
])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sources_quantkit_cannot_start_from(cli: Callable[..., Result], broken_sources: dict[str, Path],
                                            calib_file: Path, tmp_path: Path, name: str, message: str,
                                            method: str) -> None:
    out = tmp_path / "o"
    result = cli("quantize", str(broken_sources[name]), "--method", method, "--group-size", "16", "--calib",
                 str(calib_file), "--nsamples", "2", "--seqlen", "16", "-o", str(out))
    assert_one_line_error(result, message)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("name", ["pickle-only", "nan-embedding"])
def test_eval_refuses_the_same_sources(cli: Callable[..., Result], broken_sources: dict[str, Path],
                                       calib_file: Path, name: str) -> None:
    assert_one_line_error(cli("eval", str(broken_sources[name]), "--ppl", str(calib_file), "--seqlen", "16"),
                          str(broken_sources[name]) if name == "pickle-only" else "NaN")


def test_a_quantized_checkpoint_is_no_source(cli: Callable[..., Result], tiny_model_dir: Path, tmp_path: Path) -> None:
    first = cli("quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "16", "-o", str(tmp_path / "q"))
    assert first.returncode == 0, first.stderr
    assert_one_line_error(cli("quantize", str(tmp_path / "q"), "--method", "rtn", "-o", str(tmp_path / "again")),
                          "is already quantized (quant_method quantkit); this needs the float model")


def test_summary_shows_resolved_settings_and_sizes(cli: Callable[..., Result], tiny_model_dir: Path,
                                                    calib_file: Path, tmp_path: Path) -> None:
    result = cli("quantize", str(tiny_model_dir), "--group-size", "16", "--calib", str(calib_file), "--nsamples", "2",
                 "--seqlen", "16", "-o", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "gptq damp=0.01 act_order=True static_groups=True g_idx=False mse=False" in result.stdout
    assert "block_size" not in result.stdout
    source_bytes = sum(t.numel() * 4 for t in load_file(tiny_model_dir / "model.safetensors").values())
    assert f"(source: {size_text(source_bytes)} in float32)" in result.stdout


def test_tables_keep_their_numbers_when_piped(cli: Callable[..., Result], tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / ("a-checkpoint-with-a-rather-long-name-" * 3)
    assert cli("quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "16", "-o", str(out)).returncode == 0
    shown = cli("inspect", str(out)).stdout
    row = next(line for line in shown.splitlines() if "not quantized (embeddings, norms, head)" in line)
    params = sum(t.numel() for t in load_file(out / "model.safetensors").values() if t.is_floating_point()
                 and t.dim() > 0 and t.dtype == torch.float32)
    assert f"{params:,}" in row  # whole, on the row's own line
    assert max(len(line) for line in shown.splitlines()) > 80


def test_logs_get_a_line_per_phase_and_no_library_noise(tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    quantized = run_cli("quantize", str(tiny_model_dir), "--group-size", "16", "--calib", "synthetic", "--nsamples", "2",
                        "--seqlen", "8", "-o", str(tmp_path / "o"))
    assert quantized.returncode == 0, quantized.stderr
    lines = quantized.stderr.splitlines()
    assert lines and all(PROGRESS_LINE.fullmatch(line) for line in lines), quantized.stderr
    for start in (f"loading {tiny_model_dir}: done in", "synthetic calibration: 2/2 in", "gptq w4 block 2/2: 2/2 in",
                  f"writing {tmp_path / 'o'}: done in"):
        assert any(line.startswith(start) for line in lines), quantized.stderr
    evaluated = run_cli("eval", str(tmp_path / "o"), "--ppl", str(calib_file), "--seqlen", "32", "--report",
                        str(tmp_path / "r"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert any(line.startswith(f"{tmp_path / 'o'}: perplexity {calib_file}: ") for line in evaluated.stderr.splitlines())


def test_log_lines_report_a_running_phase_each_minute_with_an_eta_from_this_run_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    console = Console(file=io.StringIO(), width=PIPED_WIDTH)
    with LineProgress(console) as bars:
        task = bars.add_task("block", total=10, completed=4)  # resumed: 4 of 10 were done before
        clock[0] += 30.0
        bars.advance(task)  # under a minute: no line
        clock[0] += 30.0
        bars.advance(task)  # 2 steps in 60 s in this run: 4 left at 30 s each
        clock[0] += 10.0
        bars.advance(task, 4)
    lines = console.file.getvalue().splitlines()
    assert lines == ["block: 6/10, 60.0 s so far, eta 120 s", "block: 10/10 in 70.0 s"]
    assert all(PROGRESS_LINE.fullmatch(line) for line in lines)


def _interrupted(args: list[str], wait_for: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``quantkit ARGS`` with its log in a file, send SIGINT once ``wait_for`` appears in it."""
    log = tmp_path / "stderr.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "quantkit", *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env, cwd=tmp_path)
        deadline = time.monotonic() + 120
        while wait_for not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, out, log.read_text())


def test_ctrl_c_exits_130_with_one_line_and_no_output(tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = _interrupted(["quantize", str(tiny_model_dir), "--group-size", "16", "--calib", "synthetic", "--nsamples",
                         "64", "--seqlen", "250", "-o", str(out)], "loading", tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert_one_line_error(proc, "interrupted")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["stderr.log"]


@pytest.mark.parametrize("scheme", [QuantScheme(3, 32, True), QuantScheme(4, 16, True, "nvfp4")], ids=["int3-g32", "nvfp4"])
def test_odd_widths_and_dead_columns_quantize_and_load(tmp_path: Path, calib_file: Path, scheme: QuantScheme) -> None:
    """Widths that no group size divides (72 and 200 inputs: partial last groups) and an input column that
    calibration never sees (a zeroed row of up_proj feeds down_proj nothing there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import quantkit
    from helpers_tokenizer import tiny_tokenizer
    from quantkit.api import CalibrationSpec, quantize

    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=72, intermediate_size=200, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=18, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5].zero_()
    model.save_pretrained(tmp_path / "odd")
    tiny_tokenizer().save_pretrained(tmp_path / "odd")
    result = quantize(str(tmp_path / "odd"), method="gptq", scheme=scheme, output=tmp_path / "q",
                      calibration=CalibrationSpec(str(calib_file), 4, 64))
    loaded = quantkit.load(tmp_path / "q")
    down = loaded.get_submodule("model.layers.0.mlp.down_proj").quantized().dequantize()
    assert torch.all(down[:, 5] == 0)  # what no input reaches is not spent on
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, reference = loaded(ids).logits, result.model(ids).logits
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("content,message", [(b"", "no text found"), (b" \n\n \n", "no text found"),
                                             (b"\xff\xfe\x00\x81binary", "cannot read"), (b"ab", "the calibration text has only")],
                         ids=["empty", "blank", "binary", "too-short"])
def test_calibration_files_without_usable_text(cli: Callable[..., Result], tiny_model_dir: Path, tmp_path: Path,
                                               content: bytes, message: str) -> None:
    text = tmp_path / "calib.txt"
    text.write_bytes(content)
    result = cli("quantize", str(tiny_model_dir), "--group-size", "16", "--calib", str(text), "--nsamples", "2",
                 "--seqlen", "32", "-o", str(tmp_path / "o"))
    assert_one_line_error(result, message)
    assert "loading" not in result.stderr or message.startswith("the calibration text")  # named before the model loads
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_keeps_the_unquantized_tensors_in_it_and_the_checkpoint_loads(
        cli: Callable[..., Result], tiny_model_dir: Path, tmp_path: Path, dtype: str) -> None:
    import quantkit

    wide, narrow = tmp_path / "fp32", tmp_path / dtype
    for out, chosen in ((wide, "auto"), (narrow, dtype)):
        result = cli("quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "16", "--dtype", chosen,
                     "-o", str(out))
        assert result.returncode == 0, result.stderr
    stored = load_file(narrow / "model.safetensors")
    floats = {name: t.dtype for name, t in stored.items() if t.is_floating_point() and t.dim() > 0
              and "scales" not in name}
    assert floats and set(floats.values()) == {getattr(torch, dtype)}, floats
    assert json.loads((narrow / "config.json").read_text())["dtype"] == dtype
    assert (narrow / "model.safetensors").stat().st_size < (wide / "model.safetensors").stat().st_size
    # the same codes; the plain tensors rounded to the narrower float, nothing else
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, reference = quantkit.load(narrow)(ids).logits, quantkit.load(wide)(ids).logits
    torch.testing.assert_close(ours.float(), reference, rtol=0.05, atol=0.05)
    assert cli("quantize", str(tiny_model_dir), "--dtype", "float8", "-o", str(tmp_path / "x")).returncode == 2


def test_eval_reports_a_float_model_at_the_bits_it_is_stored_in(cli: Callable[..., Result], tiny_model_dir: Path,
                                                                calib_file: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(half)
    for item in tiny_model_dir.iterdir():
        if "token" in item.name:
            (half / item.name).write_bytes(item.read_bytes())
    result = cli("eval", str(half), "--ppl", str(calib_file), "--seqlen", "32", "--max-windows", "1", "--report",
                 str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    model = json.loads((tmp_path / "r" / "report.json").read_text())["models"][0]
    params = sum(t.numel() for t in load_file(half / "model.safetensors").values())
    assert model["bits_per_weight"] == 16 and model["size_bytes"] == 2 * params
