#!/usr/bin/env python
"""Streaming benchmark (issue 9): peak RSS and wall time of GPTQ on synthetic Llama-shaped models of a base
depth, 4x and 16x it, streamed block by block from disk (`--offload disk`) and resident, and resume after a
SIGKILL.

Protocol: random bf16 Llamas (`quantkit.models.synthetic`, seed 0); GPTQ W4 g64 calibrated on windows of the C4
validation parquet, seed 0. Every quantize run is a fresh process under `/usr/bin/time -v`, so peak RSS and wall
time are what a user sees. The claim checked: streamed peak RSS at 16x depth within 15% of that at 4x (resident
runs, for contrast, grow with depth). Resume: the streamed run of the deepest model is SIGKILLed (its whole
process group) once `OUT.partial/state.json` reports half of the blocks finished, the same command is run
again, and its checkpoint is compared with the uninterrupted run's: every tensor's raw bytes, and config.json.

    python scripts/bench_streaming.py             # 1024 wide, 2/8/32 blocks, 16 x 512 tokens (12-17 minutes)
    python scripts/bench_streaming.py --quick     # 256 wide, 1/4/16 blocks, 4 x 128 tokens (about 1 minute)
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from quantkit.export.atomic import write_json
from quantkit.models.synthetic import SyntheticShape, write_synthetic_llama
from quantkit.streaming.state import work_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
C4 = Path("c4") / "c4_validation_2k.parquet"
TIME = "/usr/bin/time"
QUANT_FLAGS = ["--method", "gptq", "--bits", "4", "--group-size", "64", "--seed", "0"]
DEPTH_FACTORS = (1, 4, 16)
RSS_TOLERANCE = 0.15  # the claim: streamed peak RSS at 16x depth within 15% of 4x
POLL_S = 0.05
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
console = Console(width=140)


def synthetic_model(folder: Path, shape: SyntheticShape) -> dict:
    """Write a synthetic Llama of ``shape`` at ``folder`` unless one with the same config is there; its size."""
    expected = {k: v for k, v in asdict(shape).items() if k != "num_blocks"}
    expected["num_hidden_layers"] = shape.num_blocks
    config = folder / "config.json"
    found = json.loads(config.read_text()) if config.is_file() else {}
    reused = all(found.get(k) == v for k, v in expected.items())
    if not reused:
        console.print(f"writing {folder} ({shape.num_blocks} blocks)")
        write_synthetic_llama(folder, shape)
    params = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                params += torch.Size(f.get_slice(name).get_shape()).numel()
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"path": str(folder), "blocks": shape.num_blocks, "config": expected, "params": params,
            "disk_mib": disk / 2**20, "reused": reused}


def quantize_command(model: Path, output: Path, calib: Path, nsamples: int, seqlen: int,
                     offload: bool) -> list[str]:
    """`quantkit quantize` of ``model`` under `/usr/bin/time -v`, streamed from disk when ``offload``."""
    return [TIME, "-v", sys.executable, "-m", "quantkit", "quantize", str(model), "-o", str(output), *QUANT_FLAGS,
            "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            *(["--offload", "disk"] if offload else [])]


def fail(command: list[str], log: Path, why: str) -> None:
    """Exit non-zero, naming ``command`` and showing the tail of its ``log``."""
    sys.exit(f"{shlex.join(command)} {why}; log {log}:\n{log.read_text(errors='replace')[-3000:]}")


def time_stats(log: Path) -> dict:
    """Wall seconds and peak RSS (MiB) from the `/usr/bin/time -v` report at the end of ``log``."""
    text = log.read_text(errors="replace")
    wall = re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)[-1]
    rss_kb = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", text)[-1]
    return {"wall_s": sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":")))),
            "peak_rss_mib": int(rss_kb) / 1024}


def run_timed(command: list[str], log: Path) -> dict:
    """Run ``command`` to completion (output into ``log``); its wall time, peak RSS, the 1-minute load average
    before it (other work on the machine slows it), command line and log."""
    load = os.getloadavg()[0]
    with log.open("w") as out:
        returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=ENV).returncode
    if returncode != 0:
        fail(command, log, f"failed ({returncode})")
    stats = time_stats(log)
    console.print(f"{log.stem:>30}: {stats['wall_s']:7.1f} s, peak RSS {stats['peak_rss_mib']:6.0f} MiB")
    return stats | {"load_1m_before": load, "command": shlex.join(command), "log": str(log)}


def finished_blocks(output: Path) -> int:
    """``next_block`` of the streamed run writing ``output`` (0 before its first commit)."""
    try:
        return int(json.loads((work_dir(output) / "state.json").read_text())["next_block"])
    except FileNotFoundError:
        return 0


def run_killed(command: list[str], output: Path, blocks: int, log: Path) -> dict:
    """Start ``command`` in its own session and SIGKILL its process group once at least half of ``blocks`` are
    finished; fails loudly if it ends first. The blocks seen finished when the kill was sent and after it."""
    target, seen, killed = max(1, blocks // 2), 0, False
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        try:
            while proc.poll() is None and not killed:
                seen = finished_blocks(output)
                killed = seen >= target
                if killed:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if not killed:
        fail(command, log, f"ended ({proc.returncode}) before it could be killed at block {target} of {blocks}")
    after = finished_blocks(output)
    if after >= blocks or output.exists():
        fail(command, log, f"had finished all {blocks} blocks when the kill landed")
    console.print(f"{log.stem:>30}: SIGKILL with {after} of {blocks} blocks finished")
    return {"command": shlex.join(command), "log": str(log), "kill_threshold": target,
            "next_block_at_kill": seen, "next_block_after_kill": after}


def tensor_digests(folder: Path) -> dict[str, str]:
    """Tensor name -> dtype, shape and SHA-256 of the raw bytes, over the safetensors files of ``folder``."""
    digests = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name).contiguous()
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                digests[name] = f"{tensor.dtype} {tuple(tensor.shape)} {hashlib.sha256(raw).hexdigest()}"
    return digests


def compare_checkpoints(reference: Path, other: Path) -> dict:
    """Whether ``other`` holds the same tensors (byte for byte) and config.json text as ``reference``."""
    ref, oth = tensor_digests(reference), tensor_digests(other)
    differing = sorted(n for n in ref.keys() & oth.keys() if ref[n] != oth[n])
    ref_config, oth_config = ((p / "config.json").read_text() for p in (reference, other))
    config_diff = [line.rstrip("\n") for line in difflib.unified_diff(
        ref_config.splitlines(), oth_config.splitlines(), str(reference), str(other), lineterm="", n=0)]
    return {"tensors": len(ref), "only_in_reference": sorted(ref.keys() - oth.keys()),
            "only_in_other": sorted(oth.keys() - ref.keys()), "differing_tensors": differing,
            "config_identical": ref_config == oth_config, "config_diff": config_diff,
            "identical": ref == oth and ref_config == oth_config}


def rss_growth(runs: dict, mode: str, depths: list[int]) -> dict:
    """Peak RSS at 16x depth over 4x for ``mode``, the relative difference, and whether it is within 15%."""
    four, sixteen = (runs[f"{mode}-{d}"]["peak_rss_mib"] for d in depths[1:])
    ratio = sixteen / four
    return {"ratio_16x_over_4x": ratio, "relative_difference": ratio - 1,
            "within_15pct": abs(ratio - 1) <= RSS_TOLERANCE}


def print_tables(models: dict, runs: dict, growth: dict, resume: dict, depths: list[int]) -> None:
    """The runs, the depth claim, and the resume check as rich tables."""
    table = Table(title="GPTQ W4 g64 on synthetic Llamas: peak RSS and wall time per quantize process")
    columns = ("mode", "blocks", "params (M)", "bf16 on disk (MiB)", "peak RSS (MiB)", "wall (s)", "load before")
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right")
    for run in runs.values():
        model = models[run["blocks"]]
        table.add_row(run["mode"], str(run["blocks"]), f"{model['params'] / 1e6:.1f}", f"{model['disk_mib']:.0f}",
                      f"{run['peak_rss_mib']:.0f}", f"{run['wall_s']:.1f}", f"{run['load_1m_before']:.1f}")
    console.print(table)
    table = Table(title=f"peak RSS, {depths[2]} blocks (16x) over {depths[1]} blocks (4x)")
    for column in ("mode", "ratio", "relative difference", f"within {RSS_TOLERANCE:.0%}"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, row in growth.items():
        verdict = {"streamed": ("FAIL", "PASS"), "resident": ("no", "yes")}[mode][row["within_15pct"]]
        table.add_row(mode, f"{row['ratio_16x_over_4x']:.3f}", f"{row['relative_difference']:+.1%}", verdict)
    console.print(table)
    table = Table(title=f"resume after SIGKILL, {depths[2]} blocks streamed")
    table.add_column("item")
    table.add_column("value", justify="right")
    killed, same = resume["killed"], resume["vs_uninterrupted"]
    table.add_row("blocks finished when killed", f"{killed['next_block_after_kill']} of {depths[2]}")
    table.add_row("rerun said it resumed", "yes" if resume["rerun_said_resuming"] else "NO")
    table.add_row("rerun wall (s)", f"{resume['rerun']['wall_s']:.1f}")
    table.add_row("tensors compared", str(same["tensors"]))
    table.add_row("identical to the uninterrupted run", "yes" if same["identical"] else "NO")
    if not same["identical"]:
        table.add_row("differing tensors", ", ".join(same["differing_tensors"]) or "—")
        table.add_row("config.json identical", "yes" if same["config_identical"] else "no")
    stream_vs_resident = resume["streamed_vs_resident"]
    table.add_row("streamed identical to resident (informational)", "yes" if stream_vs_resident["identical"]
                  else f"no ({len(stream_vs_resident['differing_tensors'])} tensors differ)")
    console.print(table)
    for line in same["config_diff"]:
        console.print(line, markup=False, highlight=False)


def add_run_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The calibration, model and output options this benchmark shares with others (``name``: its results folder)."""
    parser.add_argument("--nsamples", type=int, help="calibration windows (default 16, quick 4)")
    parser.add_argument("--seqlen", type=int, help="tokens per calibration window (default 512, quick 128)")
    parser.add_argument("--data-dir", type=Path, default=DATA, help=f"holds {C4} (default ../shared/data)")
    parser.add_argument("--models", type=Path, default=ROOT / "results" / name / "models",
                        help="where the synthetic models are written (reused when their config matches)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / name,
                        help=f"{name}.json, logs/ and checkpoints/ go here")


def run_settings(args: argparse.Namespace) -> tuple[int, int, Path, Path, Path]:
    """Calibration windows, tokens per window, the C4 file (exits if absent), the logs and checkpoints folders."""
    calib = args.data_dir / C4
    if not calib.is_file():
        sys.exit(f"calibration file {calib} not found (see --data-dir)")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return (args.nsamples or (4 if args.quick else 16), args.seqlen or (128 if args.quick else 512), calib, logs,
            args.out / "checkpoints")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 wide, 1/4/16 blocks, 4 x 128 tokens")
    parser.add_argument("--base-blocks", type=int, help="base depth (default 2, quick 1); also 4x and 16x it")
    add_run_arguments(parser, "bench_streaming")
    args = parser.parse_args()
    width = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024) if args.quick else {}
    base = args.base_blocks or (1 if args.quick else 2)
    nsamples, seqlen, calib, logs, checkpoints = run_settings(args)
    depths = [base * factor for factor in DEPTH_FACTORS]
    tag = "quick-" if args.quick else ""
    models = {d: synthetic_model(args.models / f"{tag}llama-{d}", SyntheticShape(d, **width)) for d in depths}

    runs: dict[str, dict] = {}
    for mode in ("streamed", "resident"):
        for depth in depths:
            name = f"{mode}-{depth}"
            output = checkpoints / f"{tag}{name}"
            for stale in (output, work_dir(output)):
                shutil.rmtree(stale, ignore_errors=True)
            command = quantize_command(Path(models[depth]["path"]), output, calib, nsamples, seqlen,
                                       offload=mode == "streamed")
            runs[name] = {"mode": mode, "blocks": depth, "output": str(output),
                          **run_timed(command, logs / f"{tag}{name}.log")}
    growth = {mode: rss_growth(runs, mode, depths) for mode in ("streamed", "resident")}

    deepest = depths[-1]
    reference = Path(runs[f"streamed-{deepest}"]["output"])
    resumed = checkpoints / f"{tag}streamed-{deepest}-resumed"
    for stale in (resumed, work_dir(resumed)):
        shutil.rmtree(stale, ignore_errors=True)
    command = quantize_command(Path(models[deepest]["path"]), resumed, calib, nsamples, seqlen, offload=True)
    killed = run_killed(command, resumed, deepest, logs / f"{tag}streamed-{deepest}-killed.log")
    rerun = run_timed(command, logs / f"{tag}streamed-{deepest}-rerun.log")
    resume = {"killed": killed, "rerun": rerun,
              "rerun_said_resuming": "resuming" in Path(rerun["log"]).read_text(errors="replace").lower(),
              "partial_left_behind": work_dir(resumed).exists(),
              "vs_uninterrupted": compare_checkpoints(reference, resumed),
              "streamed_vs_resident": compare_checkpoints(Path(runs[f"resident-{deepest}"]["output"]), reference)}

    print_tables(models, runs, growth, resume, depths)
    path = args.out / "bench_streaming.json"
    write_json(path, {"settings": {"quick": args.quick, "depths": depths, "quantize_flags": QUANT_FLAGS,
                                   "calib": str(calib), "nsamples": nsamples, "seqlen": seqlen},
                      "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                  "python": platform.python_version(), "platform": platform.platform()},
                      "models": models, "runs": runs, "peak_rss_16x_over_4x": growth, "resume": resume})
    console.print(f"saved {path}")


if __name__ == "__main__":
    main()
