"""The command line as a user runs it: a real process, real files, one-line errors, no partial output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.api import CalibrationSpec, quantize
from quantkit.schemes import QuantScheme


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True, cwd=cwd, env=env)


# What quantkit prints on stderr before an error when it is not a terminal: a line per finished phase or task
# ("loading X: done in 2.3 s", "gptq w4 block 2/2: 2/2 in 0.4 s") and a line a minute while one runs.
PROGRESS_LINE = re.compile(r".+: (done in [\d.]+ s|[\d.]+(/[\d.]+)? in [\d.]+ s|[\d./]+, [\d.]+ s so far.*)")


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A non-zero exit and one ``error:`` line naming the problem, last (a usage error, exit 2, adds the line
    saying where help is); before it, progress lines only (no traceback, no warning)."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 2:
        assert len(lines) >= 2 and re.fullmatch(r"Try 'quantkit( [a-z]+)? -h' for help\.", lines[-1]), proc.stderr
        lines = lines[:-1]
    assert lines and lines[-1].startswith("error: "), proc.stderr
    assert all(PROGRESS_LINE.fullmatch(line) for line in lines[:-1]), proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


QUANTIZE_FLAGS = ["--method", "gptq", "--bits", "4", "--group-size", "16", "--act-order", "--nsamples", "4", "--seqlen", "32", "--seed", "3"]


def test_cli_quantize_load_gives_fake_quant_logits(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    out = tmp_path / "w4"
    proc = run_cli("quantize", str(tiny_model_dir), *QUANTIZE_FLAGS, "--calib", str(calib_file), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "bits per quantized weight" in proc.stdout
    fake = quantize(
        str(tiny_model_dir), method="gptq", scheme=QuantScheme(4, 16, True),
        calibration=CalibrationSpec(str(calib_file), 4, 32), seed=3, act_order=True,
    )
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    loaded = quantkit.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fake.model(ids).logits, rtol=0, atol=1e-6)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"] == {"source": str(calib_file), "nsamples": 4, "seqlen": 32, "true_sequential": True,
                                 "forward_dtype": "float32"}
    assert qc["seed"] == 3 and qc["quantizer"]["act_order"] is True
    tokenizer = quantkit.load_tokenizer(out)
    generated = loaded.generate(**tokenizer("The quick", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 2

    inspect = run_cli("inspect", str(out), "--json")
    assert inspect.returncode == 0, inspect.stderr
    info = json.loads(inspect.stdout)
    assert info["schemes"][0]["scheme"] == "int w4 g16 sym"  # act-order in a static order: no g_idx stored

    report = tmp_path / "report"
    evaluation = run_cli("eval", str(out), "--ppl", str(calib_file), "--seqlen", "64", "--baseline", str(tiny_model_dir), "--report", str(report))
    assert evaluation.returncode == 0, evaluation.stderr
    saved = json.loads((report / "report.json").read_text())
    assert [m["name"] for m in saved["models"]] == [str(tiny_model_dir), str(out)]
    assert saved["baseline"] == str(tiny_model_dir) and saved["models"][1]["quantized"] is True
    assert saved["models"][1]["perplexity"][str(calib_file)]["perplexity"] > 1
    assert (report / "report.md").is_file() and (report / "perplexity_vs_bits.png").is_file()


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["quantize", "./no/such/model", "-o", "{out}"], ["model not found"]),
        (["quantize", "{model}", "--method", "awq", "-o", "{out}"], ["--method 'awq' is not allowed; allowed: rtn, gptq, spqr"]),
        (["quantize", "{model}", "--group-size", "128", "--method", "rtn", "-o", "{out}"], ["group size 128 does not fit"]),
        (["quantize", "{model}", "--bits", "5", "-o", "{out}"], ["--bits 5 is not allowed", "2, 3, 4, 8"]),
        (["quantize", "{model}", "--frobnicate", "-o", "{out}"], ["No such option"]),
        (["quantize", "{model}", "--calib", "wikitext2", "-o", "{out}"], ["cannot reach the hub", "local"]),
        (["quantize", "{model}", "--calib", "{missing}", "-o", "{out}"], ["none.txt: no such file or directory", "'synthetic'"]),
        (["quantize", "{model}", "--nsamples", "0", "--calib", "{calib}", "-o", "{out}"], ["--nsamples 0 is not allowed", "an integer ≥ 1"]),
        (["eval", "{out}", "--ppl", "{calib}"], ["model not found"]),
        (["eval", "{out}"], ["model not found"]),
        (["inspect", "{out}"], ["checkpoint not found"]),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_no_output(
    tmp_path: Path, tiny_model_dir: Path, calib_file: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "out"
    values = {"out": str(out), "model": str(tiny_model_dir), "calib": str(calib_file), "missing": str(tmp_path / "none.txt")}
    proc = run_cli(*[a.format(**values) for a in args], cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("where", ["below-a-file", "read-only-filesystem"])
def test_unwritable_output_fails_before_any_work(tmp_path: Path, tiny_model_dir: Path, where: str) -> None:
    # Both are unwritable even for root, unlike a chmod-ed directory.
    if where == "below-a-file":
        (tmp_path / "file").write_text("x")
        output = tmp_path / "file" / "out"
    else:
        output = Path("/proc/quantkit-test/out")
    proc = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "-o", str(output))
    assert_one_line_error(proc, "cannot write to")


def test_output_path_that_is_a_file_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    proc = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "-o", str(target))
    assert_one_line_error(proc, "not a directory")
    assert target.read_text() == "x"


def test_truncated_checkpoint_is_refused_by_eval_and_inspect(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    out = tmp_path / "ckpt"
    assert run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "16", "-o", str(out)).returncode == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(run_cli("eval", str(out), "--ppl", str(calib_file)), "corrupt or truncated")
    assert_one_line_error(run_cli("inspect", str(out)), "corrupt or truncated")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    assert_one_line_error(run_cli("quantize", str(folder), "--method", "rtn", "-o", str(tmp_path / "out")), "unsupported architecture 'gpt2'")
    assert not (tmp_path / "out").exists()


def test_runtime_refusals_are_warned_before_any_work(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    three_bit = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--bits", "3", "--group-size", "16",
                        "--layout", "gptq", "-o", str(tmp_path / "w3"))
    assert three_bit.returncode == 0, three_bit.stderr
    warning = "warning: vLLM's CPU build serves 4- and 8-bit GPTQ only, not 3-bit: use --bits 4 or --bits 8"
    assert warning in three_bit.stderr
    assert three_bit.stderr.index(warning) < three_bit.stderr.index("loading")  # before the model is read
    native = tmp_path / "g_idx"
    made = run_cli("quantize", str(tiny_model_dir), *QUANTIZE_FLAGS, "--g-idx", "--calib", str(calib_file),
                   "-o", str(native))
    assert made.returncode == 0 and "warning" not in made.stderr  # the native layout: no runtime to warn of
    exported = run_cli("export", str(native), "-o", str(tmp_path / "gptq"), "--layout", "gptq")
    assert exported.returncode == 0, exported.stderr
    assert "warning: vLLM refuses GPTQ checkpoints with act-order groups (desc_act=True, g_idx): drop --g-idx" \
        in exported.stderr
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is True
