#!/usr/bin/env python
"""MoE benchmark: wall time and peak RSS of GPTQ on a random Qwen3-MoE streamed block by block from disk
(`--offload disk`), against the same model's dense-equivalent, and whether peak memory is bounded by one block.

Models (`quantkit.models.synthetic`, bf16, seed 0, written one block at a time, one shard per block):
  * moe-N and moe-2N: Qwen3-MoE of N and 2N blocks, same width (every block sparse, top-k routing over
    `--experts` experts of `--moe-intermediate-size`, random router, no shared expert);
  * dense-2N: the dense-equivalent of moe-2N, a Llama of the same width, heads, depth and vocabulary whose one
    MLP per block holds as many parameters as all experts of a block (intermediate = experts x moe-intermediate).
Every model is quantized GPTQ W4 g64 (seed 0), calibrated on windows of the C4 validation parquet, in a fresh
`quantkit quantize ... --offload disk` process under `/usr/bin/time -v`, so wall time and peak RSS are what a
user sees. A process that only imports torch, transformers and quantkit's streaming path gives the baseline RSS.

Reported: both models' parameter counts; each run's wall time and peak RSS, and its peak over the baseline
in units of one block's float32 size (the form a streamed block takes in memory); the peak RSS while each block
is quantized (the process is sampled every 0.25 s beside `/usr/bin/time`, the blocks finished read from its run
state) and its drift in MiB per block; the MoE's peak RSS at 2N over N blocks (bounded by one block: doubling
the depth adds less than one block's float32 size, where a resident model would add N blocks); MoE over
dense-equivalent ratios of time and peak RSS; and the routed-expert record quantkit writes into the MoE
checkpoint's config.json (`quantization_config.experts`: experts, starved ones).

    python scripts/bench_moe.py            # 1024 wide, 16 experts x 512 (top-2), 4/8 blocks, 16 x 512 tokens
    python scripts/bench_moe.py --quick    # 256 wide, 8 experts x 128 (top-2), 1/2 blocks, 4 x 128 tokens

The default's largest MoE (8 blocks) holds 240M parameters. On 2 cores the whole run takes about 8 minutes
with the machine otherwise idle (the dense-equivalent's 8192-wide down projections take most of it) and two to
six times that while other work competes for the cores; `--quick` under a minute, `--blocks 3` (184M) about 7
minutes. Each run records the load average before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import (  # noqa: E402
    QUANT_FLAGS,
    TIME,
    add_run_arguments,
    console,
    finished_blocks,
    quantize_command,
    run_settings,
    run_timed,
)
from bench_streaming import synthetic_model as synthetic_llama  # noqa: E402

from quantkit.export.atomic import write_json  # noqa: E402
from quantkit.export.safetensors_io import header_specs  # noqa: E402
from quantkit.models.synthetic import SyntheticMoeShape, write_synthetic_qwen3_moe  # noqa: E402
from quantkit.streaming.state import work_dir  # noqa: E402
from quantkit_kernels.cpu_isa import describe  # noqa: E402

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
BLOCKS = "model.layers."
MIB = 2**20
BASELINE_IMPORTS = ("import torch, transformers, quantkit.cli, quantkit.api, quantkit.streaming.run, "
                    "transformers.models.qwen3_moe.modeling_qwen3_moe, transformers.models.llama.modeling_llama")
SAMPLE_S = 0.25  # between RSS samples of the quantize process
QUICK = dict(hidden_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)


def cpu_info() -> dict:
    """The CPU's model name, core count, and which of :data:`CPU_FLAGS` /proc/cpuinfo lists."""
    cpu = describe()
    return {"model": cpu["model"], "cpus": cpu["cores"], "flags": {flag: flag in cpu["flags"] for flag in CPU_FLAGS}}


def param_counts(folder: Path) -> dict:
    """Parameters of the checkpoint at ``folder`` (headers only): in all, in block 0, outside the blocks; bf16
    bytes on disk."""
    total = block = outer = 0
    for file in folder.glob("*.safetensors"):
        for name, (shape, _) in header_specs(file).items():
            count = torch.Size(shape).numel()
            total += count
            block += count if name.startswith(f"{BLOCKS}0.") else 0
            outer += 0 if name.startswith(BLOCKS) else count
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"params": total, "block_params": block, "outer_params": outer, "block_fp32_mib": block * 4 / MIB,
            "outer_fp32_mib": outer * 4 / MIB, "disk_mib": disk / MIB}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss_mib(pid: int) -> float | None:
    """Resident set size of ``pid`` now (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """Samples, every :data:`SAMPLE_S`, the resident memory of the `quantkit quantize` process below this one
    (under `/usr/bin/time`) and how many blocks its run state reports finished, so that the peak can be told
    apart block by block: ``by_block()[i]`` is the peak while block ``i`` was being quantized (block 0 includes
    reading the calibration text, the embeddings and the head), ``[blocks]`` while the checkpoint was published."""

    def __init__(self, output: Path) -> None:
        super().__init__(daemon=True)
        self.output, self.done = output, threading.Event()
        self.samples: list[tuple[float, float, int]] = []  # (seconds, RSS MiB, blocks finished)

    def run(self) -> None:
        start = time.monotonic()
        while not self.done.wait(SAMPLE_S):
            for timer in _children(os.getpid()):
                for pid in _children(timer):
                    rss = _rss_mib(pid)
                    if rss is not None:
                        self.samples.append((round(time.monotonic() - start, 2), round(rss, 1),
                                         finished_blocks(self.output)))

    def by_block(self) -> dict[int, float]:
        peaks: dict[int, float] = {}
        for _, rss, block in self.samples:
            peaks[block] = max(rss, peaks.get(block, 0.0))
        return dict(sorted(peaks.items()))


def run_sampled(command: list[str], log: Path, output: Path, blocks: int) -> dict:
    """:func:`run_timed` with an :class:`RssSampler` beside it: also the peak RSS during each block and its
    drift, the least-squares slope of those peaks over blocks 1 onwards (MiB per block; 0 when memory does not
    grow with depth)."""
    sampler = RssSampler(output)
    sampler.start()
    try:
        stats = run_timed(command, log)
    finally:
        sampler.done.set()
        sampler.join()
    peaks = sampler.by_block()
    per_block = [peaks.get(i) for i in range(blocks)]
    later = [(i, p) for i, p in enumerate(per_block) if i > 0 and p is not None]
    drift = None
    if len(later) > 1:
        mean_i, mean_p = (sum(v) / len(later) for v in zip(*later))
        drift = (sum((i - mean_i) * (p - mean_p) for i, p in later)
                 / sum((i - mean_i) ** 2 for i, _ in later))
    return stats | {"peak_rss_by_block_mib": per_block, "peak_rss_publish_mib": peaks.get(blocks),
                    "rss_drift_mib_per_block": drift, "rss_samples": sampler.samples}


def moe_model(folder: Path, shape: SyntheticMoeShape) -> dict:
    """Write a synthetic Qwen3-MoE of ``shape`` at ``folder`` unless one with the same config is there."""
    from transformers import AutoConfig

    expected = {k: v for k, v in asdict(shape).items() if k != "num_blocks"} | {"num_hidden_layers": shape.num_blocks}
    try:
        found = AutoConfig.from_pretrained(folder)
        reused = found.model_type == "qwen3_moe" and all(getattr(found, k, None) == v for k, v in expected.items())
    except (OSError, ValueError):
        reused = False
    if not reused:
        console.print(f"writing {folder} ({shape.num_blocks} blocks)")
        write_synthetic_qwen3_moe(folder, shape)
    return {"path": str(folder), "architecture": "qwen3_moe", "blocks": shape.num_blocks, "config": expected,
            "reused": reused}


def baseline_rss(log: Path) -> dict:
    """Peak RSS of a process that imports what `quantkit quantize` runs on, and nothing more."""
    return run_timed([TIME, "-v", sys.executable, "-c", BASELINE_IMPORTS], log)


def experts_record(output: Path) -> dict:
    """``quantization_config.experts`` from the quantized checkpoint's config.json, with a short summary."""
    record = json.loads((output / "config.json").read_text())["quantization_config"].get("experts") or {}
    starved = record.get("starved", {})
    return {"record": record, "count": record.get("count"), "min_tokens": record.get("min_tokens"),
            "starved_count": len(starved), "fewest_tokens": min(starved.values(), default=None)}


def print_tables(machine: dict, models: dict, runs: dict, baseline: dict, bounded: dict, ratios: dict,
                 settings: dict) -> None:
    """Machine, models, runs, the depth check, MoE over dense, and the experts record as rich tables."""
    table = Table(title="machine")
    table.add_column("item")
    table.add_column("value")
    table.add_row("CPU", f"{machine['cpu']['model']} ({machine['cpu']['cpus']} cores)")
    flags = machine["cpu"]["flags"]
    table.add_row("flags", "  ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in flags.items()))
    table.add_row("torch / python", f"{machine['torch']} / {machine['python']}")
    table.add_row("baseline RSS (imports only)", f"{baseline['peak_rss_mib']:.0f} MiB")
    table.add_row("calibration", f"{settings['nsamples']} x {settings['seqlen']} tokens of C4, GPTQ W4 g64, "
                  "--offload disk")
    console.print(table)

    table = Table(title="synthetic models (bf16, one shard per block)")
    for column in ("model", "architecture", "blocks", "params (M)", "per block (M)", "outside blocks (M)",
                   "one block fp32 (MiB)", "on disk (MiB)"):
        table.add_column(column, justify="left" if column in ("model", "architecture") else "right")
    for name, model in models.items():
        table.add_row(name, model["architecture"], str(model["blocks"]), f"{model['params'] / 1e6:.1f}",
                      f"{model['block_params'] / 1e6:.2f}", f"{model['outer_params'] / 1e6:.2f}",
                      f"{model['block_fp32_mib']:.0f}", f"{model['disk_mib']:.0f}")
    console.print(table)

    table = Table(title="GPTQ W4 g64, streamed from disk: one quantize process per model")
    for column in ("model", "blocks", "wall (s)", "s / block", "peak RSS (MiB)", "peak - baseline (MiB)",
                   "in blocks (fp32)", "load before"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, run in runs.items():
        model = models[name]
        above = run["peak_rss_mib"] - baseline["peak_rss_mib"]
        table.add_row(name, str(model["blocks"]), f"{run['wall_s']:.1f}",
                      f"{run['wall_s'] / model['blocks']:.1f}",
                      f"{run['peak_rss_mib']:.0f}", f"{above:.0f}", f"{above / model['block_fp32_mib']:.2f}",
                      f"{run['load_1m_before']:.1f}")
    console.print(table)

    deepest = max(model["blocks"] for model in models.values())
    table = Table(title=f"peak RSS (MiB) while each block is quantized ({SAMPLE_S} s samples; block 1 includes "
                  "calibration and the embeddings)")
    table.add_column("model")
    for i in range(deepest):
        table.add_column(f"block {i + 1}", justify="right")
    table.add_column("publish", justify="right")
    table.add_column("drift (MiB/block)", justify="right")
    for name, run in runs.items():
        cells = ["" if p is None else f"{p:.0f}" for p in run["peak_rss_by_block_mib"]]
        cells += [""] * (deepest - len(cells))
        publish, drift = run["peak_rss_publish_mib"], run["rss_drift_mib_per_block"]
        table.add_row(name, *cells, "" if publish is None else f"{publish:.0f}",
                      "—" if drift is None else f"{drift:+.1f}")
    console.print(table)

    table = Table(title=f"MoE peak RSS, {bounded['deep']} blocks over {bounded['shallow']}: bounded by one block?")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row(f"peak RSS at {bounded['shallow']} / {bounded['deep']} blocks (MiB)",
                  f"{bounded['peak_shallow_mib']:.0f} / {bounded['peak_deep_mib']:.0f}")
    table.add_row("ratio", f"{bounded['ratio']:.3f}")
    added = bounded["deep"] - bounded["shallow"]
    table.add_row(f"growth for {added} more block{'s' * (added > 1)} (MiB)", f"{bounded['growth_mib']:+.0f}")
    table.add_row("one block in float32 (MiB)", f"{bounded['block_fp32_mib']:.0f}")
    table.add_row("growth if every block stayed resident (MiB)", f"{bounded['resident_growth_mib']:.0f}")
    table.add_row("bounded (growth < one block)", "yes" if bounded["bounded"] else "NO")
    console.print(table)

    table = Table(title=f"{ratios['moe']} over its dense-equivalent {ratios['dense']}")
    table.add_column("item")
    table.add_column("MoE", justify="right")
    table.add_column("dense", justify="right")
    table.add_column("MoE / dense", justify="right")
    table.add_row("params (M)", f"{ratios['params'][0] / 1e6:.1f}", f"{ratios['params'][1] / 1e6:.1f}",
                  f"{ratios['params'][0] / ratios['params'][1]:.4f}")
    table.add_row("wall (s)", f"{ratios['wall_s'][0]:.1f}", f"{ratios['wall_s'][1]:.1f}",
                  f"{ratios['wall_ratio']:.2f}")
    table.add_row("peak RSS (MiB)", f"{ratios['peak_rss_mib'][0]:.0f}", f"{ratios['peak_rss_mib'][1]:.0f}",
                  f"{ratios['rss_ratio']:.2f}")
    console.print(table)

    table = Table(title="quantization_config.experts in the MoE checkpoints")
    for column in ("model", "routed experts", "min tokens", "starved", "fewest tokens (starved)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, run in runs.items():
        if "experts" in run:
            experts = run["experts"]
            table.add_row(name, str(experts["count"]), str(experts["min_tokens"]), str(experts["starved_count"]),
                          "—" if experts["fewest_tokens"] is None else str(experts["fewest_tokens"]))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 256 wide, 8 experts x 128, 1/2 blocks, 4 x 128 tokens")
    parser.add_argument("--blocks", type=int, help="N: the MoE runs at N and 2N blocks, the dense-equivalent at "
                        "2N (default 4, quick 1)")
    parser.add_argument("--hidden-size", type=int, help="hidden size (default 1024, quick 256)")
    parser.add_argument("--experts", type=int, help="routed experts per block (default 16, quick 8)")
    parser.add_argument("--moe-intermediate-size", type=int, help="each expert's inner size (default 512, quick 128)")
    parser.add_argument("--experts-per-token", type=int, help="top-k routing (default 2)")
    parser.add_argument("--heads", type=int, help="attention heads (default 16, quick 4); head dim = hidden / heads")
    parser.add_argument("--kv-heads", type=int, help="key-value heads (default 4, quick 2)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary (default 8192, quick 1024)")
    add_run_arguments(parser, "bench_moe")
    args = parser.parse_args()
    sizes = {**(QUICK if args.quick else {}), **{k: v for k, v in {
        "hidden_size": args.hidden_size, "moe_intermediate_size": args.moe_intermediate_size,
        "num_experts": args.experts, "num_experts_per_tok": args.experts_per_token, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size}.items() if v is not None}}
    base = args.blocks or (1 if args.quick else 4)
    nsamples, seqlen, calib, logs, checkpoints = run_settings(args)
    tag = "quick-" if args.quick else ""
    shallow, deep = base, 2 * base
    moe_shapes = {f"moe-{d}": SyntheticMoeShape(d, **sizes) for d in (shallow, deep)}
    dense_shape = moe_shapes[f"moe-{deep}"].dense_equivalent()

    models: dict[str, dict] = {}
    for name, shape in moe_shapes.items():
        models[name] = moe_model(args.models / f"{tag}{name}", shape)
    dense = synthetic_llama(args.models / f"{tag}dense-{deep}", dense_shape)
    models[f"dense-{deep}"] = {"path": dense["path"], "architecture": "llama", "blocks": deep,
                               "config": dense["config"], "reused": dense["reused"]}
    for model in models.values():
        model |= param_counts(Path(model["path"]))

    machine = {"cpu": cpu_info(), "torch": torch.__version__, "python": platform.python_version(),
               "platform": platform.platform()}
    baseline = baseline_rss(logs / f"{tag}baseline.log")
    runs: dict[str, dict] = {}
    for name, model in models.items():
        output = checkpoints / f"{tag}{name}"
        for stale in (output, work_dir(output)):
            shutil.rmtree(stale, ignore_errors=True)
        command = quantize_command(Path(model["path"]), output, calib, nsamples, seqlen, offload=True)
        runs[name] = {"output": str(output),
                      **run_sampled(command, logs / f"{tag}{name}.log", output, model["blocks"])}
        if model["architecture"] == "qwen3_moe":
            runs[name]["experts"] = experts_record(output)

    small, large, dense_run = runs[f"moe-{shallow}"], runs[f"moe-{deep}"], runs[f"dense-{deep}"]
    block_mib = models[f"moe-{deep}"]["block_fp32_mib"]
    growth = large["peak_rss_mib"] - small["peak_rss_mib"]
    bounded = {"shallow": shallow, "deep": deep, "peak_shallow_mib": small["peak_rss_mib"],
               "peak_deep_mib": large["peak_rss_mib"], "ratio": large["peak_rss_mib"] / small["peak_rss_mib"],
               "growth_mib": growth, "block_fp32_mib": block_mib, "resident_growth_mib": (deep - shallow) * block_mib,
               "bounded": growth < block_mib}
    ratios = {"moe": f"moe-{deep}", "dense": f"dense-{deep}",
              "params": [models[f"moe-{deep}"]["params"], models[f"dense-{deep}"]["params"]],
              "wall_s": [large["wall_s"], dense_run["wall_s"]], "wall_ratio": large["wall_s"] / dense_run["wall_s"],
              "peak_rss_mib": [large["peak_rss_mib"], dense_run["peak_rss_mib"]],
              "rss_ratio": large["peak_rss_mib"] / dense_run["peak_rss_mib"]}
    settings = {"quick": args.quick, "depths": [shallow, deep], "moe_shape": asdict(moe_shapes[f"moe-{deep}"]),
                "dense_shape": asdict(dense_shape), "quantize_flags": [*QUANT_FLAGS, "--offload", "disk"],
                "calib": str(calib), "nsamples": nsamples, "seqlen": seqlen, "command": " ".join(sys.argv)}

    print_tables(machine, models, runs, baseline, bounded, ratios, settings)
    path = args.out / f"{tag}bench_moe.json"
    write_json(path, {"settings": settings, "machine": machine, "baseline": baseline, "models": models, "runs": runs,
                      "moe_peak_rss_bounded_by_one_block": bounded, "moe_over_dense": ratios})
    console.print(f"saved {path}")


if __name__ == "__main__":
    main()
