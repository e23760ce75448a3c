"""The ``quantkit`` command line: a thin layer over :mod:`quantkit.api`."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Table
from typer.exceptions import TyperException

from quantkit import __version__, defaults
from quantkit.allocation.options import STRATEGIES
from quantkit.calib.sources import SYNTHETIC_WINDOWS, TEXT_WINDOWS
from quantkit.diskspace import size_text
from quantkit.errors import OptionError, QuantkitError
from quantkit.progress import make_console
from quantkit.recipes.fields import BY_PARAM
from quantkit.runtime.kernels import BACKENDS
from quantkit.schemes import CHECKPOINT_LAYOUTS

if TYPE_CHECKING:
    from quantkit.checkpoint_info import CheckpointInfo

console = make_console()
err_console = make_console(stderr=True)
# quantize options that say how to run, not what to compute: never recipe fields
RUN_OPTIONS = ("model", "output", "overwrite", "recipe", "save_recipe", "offload", "devices", "trust_remote_code",
               "gguf_type", "dry_run")
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _version(value: bool) -> None:
    if value:
        print(f"quantkit {__version__}")
        raise typer.Exit()


app = typer.Typer(
    help="Post-training quantization for large language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Post-training quantization for large language models."""


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which would turn it into a bare exit code)."""


def command(name: str | None = None) -> Callable:
    """Register a command of ``app`` whose Ctrl-C keeps its message (e.g. how to resume)."""

    def register(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except KeyboardInterrupt as exc:
                raise _Interrupted(str(exc) or "interrupted") from None

        return app.command(name)(run)

    return register


def _choices(param: str) -> str:
    """The values a recipe field's option takes, for the help (the field itself checks them, with its notes)."""
    field = BY_PARAM[param]
    files = (f"FILE{field.suffix}",) if field.suffix else ()
    return f"<{'|'.join(map(str, (*field.allowed, *field.also, *files)))}>"


def _split_list(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _bit_choices(text: str | None) -> list[int] | None:
    """``--bit-choices 2,3,4`` as a list of widths."""
    if text is None:
        return None
    try:
        return [int(b) for b in _split_list([text])]
    except ValueError:
        raise OptionError(f"--bit-choices must be a comma list of integers, got {text!r}") from None


Layout = Literal[CHECKPOINT_LAYOUTS]
Strategy = Literal[STRATEGIES]
Backend = Literal[BACKENDS]

# Options shared by `quantize` and `allocate`.
ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="Hub id, local directory, .gguf file or built-in alias (smollm2-135m).")]
GroupSizeOpt = Annotated[int | None, typer.Option(help="Input columns per scale/zero group; -1 for per-channel. Default: 128 (gptq, rtn), 16 (spqr), 32 (fp4); fixed for mxfp4 (32) and nvfp4 (16).")]
SymOpt = Annotated[bool | None, typer.Option("--sym/--asym", help="Symmetric grid (zero point fixed mid-range) or asymmetric. Default: sym (gptq, rtn), asym (spqr).")]
ActOrderOpt = Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="GPTQ/SpQR: columns in decreasing Hessian-diagonal order (default on). GPTQ stores no g_idx unless --g-idx.")]
StaticGroupsOpt = Annotated[bool | None, typer.Option("--static-groups/--no-static-groups", help="GPTQ: group grids fitted on the original weights before any update, so act-order stores no g_idx. Default: on from 4 bits with act-order (unless --g-idx); --no-static-groups (the default below 4 bits) keeps each group's columns together instead, fitting each group when the sweep reaches it.")]
GGUFTypeOpt = Annotated[str | None, typer.Option(metavar="q4_k|q4_0|q5_0|q8_0|f16|f32|bf16", help="The GGUF type to write (with --layout gguf): a block format quantize rounds onto (q4_k falls back to q5_0 on rows that are no multiple of 256, as llama.cpp does), or a float type for export of an unquantized model.")]
GIdxOpt = Annotated[bool | None, typer.Option("--g-idx/--no-g-idx", help="GPTQ: plain act-order with each column's group stored (g_idx, desc_act=True); vLLM refuses such checkpoints. Default off.")]
DampOpt = Annotated[float | None, typer.Option(help="Damping as a fraction of the mean Hessian diagonal. Default: 0.01 (gptq), 1.0 (spqr).")]
MseOpt = Annotated[bool | None, typer.Option("--mse/--no-mse", help="GPTQ/RTN: search a clipping ratio per group (integer grids) or the block scale among candidates (float formats). Default: GPTQ on integer grids below 4 bits, otherwise off.")]
CalibOpt = Annotated[str | None, typer.Option(help=f"Calibration (default {defaults.CALIBRATION}): c4, wikitext2 (hub), synthetic, self (the model's answers to built-in prompts through its chat template), chat:FILE (JSONL conversations through the model's chat template), or a local file/directory.")]
NsamplesOpt = Annotated[int | None, typer.Option(
    help=f"Calibration windows (default {TEXT_WINDOWS[0]}; synthetic: {SYNTHETIC_WINDOWS[0]}).")]
SeqlenOpt = Annotated[int | None, typer.Option(
    help=f"Tokens per calibration window (default {TEXT_WINDOWS[1]}; synthetic: {SYNTHETIC_WINDOWS[1]}).")]
SeedOpt = Annotated[int | None, typer.Option(help=f"Seed for sampling and anything random (default {defaults.SEED}).")]
DataDirOpt = Annotated[str | None, typer.Option(help="Local data directory for named sources, laid out like c4/c4_validation_2k.parquet (or $QUANTKIT_DATA_DIR).")]
BitChoicesOpt = Annotated[str | None, typer.Option(help="Widths a mixed allocation may give a linear (comma list; default 2,3,4,8).")]
ScoreOpt = Annotated[str | None, typer.Option(metavar=_choices("score"), help="Allocation score: error is the output NMSE per width, kl the end-to-end KL per unit and width. Default: kl (auto, solver), lim (ranked).")]
GranularityOpt = Annotated[str | None, typer.Option(metavar=_choices("granularity"), help="Allocation unit: a linear, a group of linears sharing an input (which serving engines fuse and which must then share a scheme) or a block. Default: linear for the native layout, group for gptq and compressed-tensors.")]
GenerationsOpt = Annotated[int | None, typer.Option(help="Evolutionary search generations (auto allocation; default 12, 0 keeps the solver's answer).")]
OffspringOpt = Annotated[int | None, typer.Option(help="Evolutionary search offspring per generation (default 12).")]


@command()
def quantize(
    ctx: typer.Context,
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write.")],
    recipe: Annotated[str | None, typer.Option(help="A recipe (YAML file, or the name of a shipped one: see `quantkit recipes`) giving every setting; flags given here override its fields.")] = None,
    save_recipe: Annotated[Path | None, typer.Option(help="After a successful run, write the settings it used (recipe and flags merged) as a recipe file.")] = None,
    method: Annotated[str | None, typer.Option(metavar=_choices("method"), help=f"Quantizer (default {defaults.METHOD}).")] = None,
    bits: Annotated[float | None, typer.Option(help=f"Weight bits: 2, 3, 4 or 8 (default {defaults.BITS}; 4 for the float formats); with --allocation, the average bits per weight as written, codes, scales and zeros included (e.g. 3.5).")] = None,
    number_format: Annotated[str | None, typer.Option("--format", metavar=_choices("number_format"), help="Weight number format: int (default), fp4 (E2M1, float16 scales), mxfp4 (E8M0 scales per 32), nvfp4 (E4M3 scales per 16 and a tensor scale), fp8 (E4M3, float32 scales per channel or group), or a GGUF type.")] = None,
    group_size: GroupSizeOpt = None,
    block_rows: Annotated[int | None, typer.Option(help="fp8: output rows sharing one weight scale (default 1): 128 with --group-size 128 gives 128x128 blocks (DeepSeek-V3's FP8), -1 with --group-size -1 one scale per tensor.")] = None,
    sym: SymOpt = None,
    act_order: ActOrderOpt = None,
    static_groups: StaticGroupsOpt = None,
    g_idx: GIdxOpt = None,
    true_sequential: Annotated[bool | None, typer.Option("--true-sequential/--no-true-sequential", help="Statistics of each group of linears after the earlier ones are quantized (default on).")] = None,
    forward_dtype: Annotated[str | None, typer.Option(metavar=_choices("forward_dtype"), help="Arithmetic of calibration's forward passes through the blocks: float32 (default; the same result on every machine) or bfloat16 (autocast: faster on CPUs with AVX512-BF16/AMX and on GPUs; Hessians and solves stay float32/float64).")] = None,
    damp: DampOpt = None,
    mse: MseOpt = None,
    act_bits: Annotated[int | None, typer.Option(metavar=_choices("act_bits"), help="Quantize the input of every quantized linear per token (fake quantization, recorded in the checkpoint). Default: weights only.")] = None,
    act_format: Annotated[str | None, typer.Option(metavar=_choices("act_format"), help="Activation number format: int, fp8 (E4M3) or an FP4 format. Default: the weight format for 4-bit activations of FP4 weights and 8-bit activations of fp8 weights, else int.")] = None,
    act_group_size: Annotated[int | None, typer.Option(help="Activation columns per scale; default one scale per token (int, fp4), 32 (mxfp4), 16 (nvfp4).")] = None,
    act_static: Annotated[bool | None, typer.Option("--act-static/--act-dynamic", help="Static activation scales calibrated on the calibration windows (int or fp8, stored as each layer's input_scale) instead of per-token scales computed at run time (default dynamic).")] = None,
    act_granularity: Annotated[str | None, typer.Option(metavar=_choices("act_granularity"), help="Static activation scales per tensor (default; what vLLM serves) or per input channel.")] = None,
    act_observer: Annotated[str | None, typer.Option(metavar=_choices("act_observer"), help="How static scales are calibrated: minmax (default), percentile of |x|, or mse (the clipping with the least error).")] = None,
    act_percentile: Annotated[float | None, typer.Option(help="The percentile of |x| that --act-observer percentile maps to the grid's largest value (default 99.99).")] = None,
    kv_format: Annotated[str | None, typer.Option(metavar=_choices("kv_format"), help="Quantize the KV cache to 8 bits: int or fp8 (E4M3), keys after RoPE and values, with static scales calibrated on the calibration windows (default: float KV cache).")] = None,
    quantize_head: Annotated[str | None, typer.Option(metavar=_choices("quantize_head"), help="Quantize the output head (lm_head) too, round-to-nearest: int8 per row or int4 in the run's groups (g128 for per-channel runs); a head tied to the embeddings is untied, the embeddings stay float. Weight-only runs. Default: float head.")] = None,
    kv_granularity: Annotated[str | None, typer.Option(metavar=_choices("kv_granularity"), help="KV-cache scales per layer (tensor, default; what compressed-tensors and vLLM hold) or per key/value head.")] = None,
    outlier_threshold: Annotated[float | None, typer.Option(help="SpQR: relative outlier threshold; higher keeps fewer outliers, inf none (default 0.2).")] = None,
    simplified_outliers: Annotated[bool | None, typer.Option("--simplified-outliers/--loo-outliers", help="SpQR: skip the leave-one-out pre-detection (faster, usually a little worse).")] = None,
    stat_bits: Annotated[int | None, typer.Option(help="SpQR: bits of the quantized scales and zero points (default 3).")] = None,
    stat_group_size: Annotated[int | None, typer.Option(help="SpQR: output rows sharing one second-level scale/zero (default 16).")] = None,
    calib: CalibOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    expert_min_tokens: Annotated[int | None, typer.Option(help=f"MoE: a routed expert that calibration sends fewer tokens is starved; its statistics then come from every calibration token of its block, and the summary lists it (default {defaults.EXPERT_MIN_TOKENS}).")] = None,
    dtype: Annotated[str | None, typer.Option(metavar=_choices("dtype"), help="Dtype of the tensors left unquantized (embeddings, norms, head, biases). Default: auto, the source model's.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    layout: Annotated[str | None, typer.Option(metavar=_choices("layout"), help=f"Checkpoint layout (default {defaults.LAYOUT}); gptq is GPTQ v1, compressed-tensors is pack-quantized (nvfp4- or mxfp4-pack-quantized for those formats), gguf one .gguf file for llama.cpp.")] = None,
    gguf_type: GGUFTypeOpt = None,
    transform: Annotated[str | None, typer.Option(metavar=_choices("transform"), help="Rewrite the model first: hadamard (QuaRot), flatquant or ostquant (trained), awq (activation-aware scales and clipping), smoothquant (for W8A8) or mergequant (per-channel static activation steps merged into the layers, with --act-static); two joined by + run in order, e.g. hadamard+awq (AWQ on the rotated model) or smoothquant+hadamard; none switches off a recipe's. Default: none.")] = None,
    transform_budget: Annotated[str | None, typer.Option(metavar=_choices("transform_budget"), help="Calibration budget of flatquant/ostquant/awq/smoothquant/mergequant: cpu (default; minutes here) or paper.")] = None,
    transform_nsamples: Annotated[int | None, typer.Option(help="Transform training windows (overrides the budget).")] = None,
    transform_seqlen: Annotated[int | None, typer.Option(help="Tokens per transform training window (overrides the budget).")] = None,
    transform_epochs: Annotated[int | None, typer.Option(help="Passes over the transform training windows (overrides the budget).")] = None,
    transform_batch_size: Annotated[int | None, typer.Option(help="Transform training windows per step (overrides the budget).")] = None,
    transform_alpha: Annotated[float | None, typer.Option(help="SmoothQuant's migration strength α in [0, 1] (default 0.5): larger moves more of each input channel's range into the weights.")] = None,
    allocation: Annotated[str | None, typer.Option(metavar=_choices("allocation"), help="Mixed bits: auto (solver, then evolutionary search), solver (exact knapsack), ranked (layer-wise paper), random, or a plan file from `quantkit allocate`; none switches off a recipe's. Default: one width everywhere.")] = None,
    bit_choices: BitChoicesOpt = None,
    score: ScoreOpt = None,
    granularity: GranularityOpt = None,
    search_generations: GenerationsOpt = None,
    search_offspring: OffspringOpt = None,
    offload: Annotated[Literal["disk"] | None, typer.Option(help="disk: stream the model (a local safetensors directory) one block at a time, write each finished block at once and spill activations to disk; peak memory stays near one block, and rerunning a killed run's command resumes it from OUTPUT.partial. Native layout; no --transform or --allocation.")] = None,
    devices: Annotated[str | None, typer.Option(help="Spread the decoder blocks over these devices in contiguous runs, e.g. cuda:0,cuda:1 (default: where the model is).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Let transformers run Python code shipped with the model (off by default: only do this for models you trust).")] = False,
    dry_run: Annotated[bool, typer.Option(help="Write nothing to OUTPUT: predict the peak memory (resident and --offload disk), the output's size and the work directory's, the time from a probe on one block, and which runtimes load the output; saved as quantkit-reports/dry-run-<time>.json.")] = False,
) -> None:
    """Quantize a causal LM and write a packed checkpoint (settings from flags, a recipe, or both)."""
    from quantkit.api import quantize_run
    from quantkit.checkpoint_info import inspect_checkpoint
    from quantkit.recipes import load_recipe, recipe_from_settings, resolve
    from quantkit.recipes.build import pinned_settings, run_plan

    given = {name: value for name, value in ctx.params.items() if name not in RUN_OPTIONS}
    given["bit_choices"] = _bit_choices(bit_choices)
    if gguf_type is not None:
        given.update(_gguf_settings(gguf_type, number_format, layout))
    settings = resolve(load_recipe(recipe) if recipe else None, given, recipe or "")
    run = run_plan(settings)
    if dry_run:
        _dry_run(model, run)
        return
    saved = None
    if save_recipe is not None:
        _check_output_file(save_recipe, "--save-recipe", ".yaml")
        command_line = " ".join(["quantkit", *sys.argv[1:]])
        saved = recipe_from_settings(pinned_settings(settings, run), save_recipe.stem, f"saved by: {command_line}")
    result = quantize_run(model, run, output=output, overwrite=overwrite, offload=offload,
                          devices=devices.split(",") if devices is not None else None,
                          trust_remote_code=trust_remote_code)
    if saved is not None:
        saved.save(save_recipe)
    if not result.writer:  # another rank of a data-parallel run wrote the checkpoint and reports
        return
    _print_summary(f"quantized {model} → {output}", inspect_checkpoint(output), result.quantization_config,
                   result.seconds, result.source_size)
    if save_recipe is not None:
        console.print(f"recipe: {save_recipe}")


def _report_path(kind: str) -> Path:
    """The default place of a command's report: quantkit-reports/KIND-<UTC time>."""
    return Path("quantkit-reports") / f"{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def _dry_run(model: str, run) -> None:
    from quantkit.dryrun.report import dry_run_table, write_dry_run
    from quantkit.dryrun.run import dry_run

    path = _report_path("dry-run").with_suffix(".json")
    result = dry_run(model, run)
    console.print(dry_run_table(result))
    write_dry_run(result, path)
    console.print(f"saved {path}")


def _check_output_file(path: Path, flag: str, suffix: str) -> None:
    """Refuse, before the work rather than after it, a file option naming a directory or an unwritable place."""
    from quantkit.export.atomic import check_writable

    if path.is_dir():
        raise OptionError(f"{flag} {path} is a directory; name a {suffix} file")
    check_writable(path.parent)


def _gguf_settings(gguf_type: str, number_format: str | None, layout: str | None) -> dict[str, str]:
    """The number format and layout ``--gguf-type`` stands for; a conflicting --format or --layout is refused."""
    from quantkit.layouts.gguf import FLOAT_TYPES, check_gguf_type

    if check_gguf_type(gguf_type) in FLOAT_TYPES:
        raise OptionError(f"--gguf-type {gguf_type} is unquantized: write it with "
                          f"`quantkit export MODEL -o OUT.gguf --layout gguf --gguf-type {gguf_type}`")
    if number_format not in (None, gguf_type):
        raise OptionError(f"--gguf-type {gguf_type} is the number format: drop --format {number_format}")
    if layout not in (None, "gguf"):
        raise OptionError(f"--gguf-type writes the gguf layout, not --layout {layout}")
    return {"number_format": gguf_type, "layout": "gguf"}


def _print_summary(title: str, info: CheckpointInfo, record: dict, seconds: dict[str, float], source: str) -> None:
    """The table ``quantize`` prints: what was done, what the checkpoint holds, how long each phase took."""
    table = Table(title=title)
    table.add_column("item")
    table.add_column("value", justify="right")
    options = " ".join(f"{key}={value}" for key, value in record["quantizer"].items())
    table.add_row("method", f"{record['method']} {options}".strip())
    table.add_row("scheme", ", ".join(s.scheme for s in info.schemes))
    if record["transform"] is not None:
        table.add_row("transform", f"{record['transform']['name']}, {len(record['transform']['online'])} online input maps")
    if record.get("head") is not None:
        head = record["head"]
        groups = "per row" if head["group_size"] == -1 else f"g{head['group_size']}"
        table.add_row("output head", f"int{head['bits']} {groups}, round-to-nearest")
    if record.get("kv_cache") is not None:
        table.add_row("KV cache", f"{record['kv_cache']['format']} 8-bit, static scales per {record['kv_cache']['granularity']}")
    allocation_record = record["allocation"]
    if allocation_record is not None:
        table.add_row("allocation", f"{allocation_record['strategy']} (score {allocation_record['score']}), "
                      f"target {allocation_record['target_bits']} bits over {allocation_record['bit_choices']}")
    experts = record.get("experts")
    if experts is not None:
        starved = experts["starved"]
        table.add_row("routed experts", f"{experts['count']}, {len(starved)} starved (< {experts['min_tokens']} "
                      "calibration tokens; statistics from all tokens of their block)")
        for name, tokens in starved.items():
            table.add_row(f"  starved: {name}", f"{tokens} tokens")
    table.add_row("layers quantized", str(info.total.layers))
    table.add_row("bits per quantized weight", f"{info.bits_per_weight:.3f}")
    table.add_row("checkpoint size", f"{size_text(info.file_bytes)} ({source})")
    for stage, spent in seconds.items():
        table.add_row(f"time: {stage}", f"{spent:.1f} s")
    console.print(table)
    if allocation_record is not None:
        from quantkit.allocation.heatmap import bits_heatmap

        console.print(bits_heatmap(allocation_record["layer_bits"]))


@command()
def allocate(
    model: ModelArg,
    bits: Annotated[float, typer.Option(help="Target average bits per quantized weight as written (codes, scales, zeros).")],
    report: Annotated[Path, typer.Option(help="JSON file for the plan (pass it to `quantize --allocation`).")] = Path("allocation.json"),
    allocation: Annotated[Strategy, typer.Option(help="auto is the solver, then the evolutionary search; solver the exact knapsack; ranked the layer-wise paper.")] = "auto",
    bit_choices: BitChoicesOpt = None,
    score: ScoreOpt = None,
    granularity: GranularityOpt = None,
    search_generations: GenerationsOpt = None,
    search_offspring: OffspringOpt = None,
    method: Annotated[str | None, typer.Option(metavar=_choices("method"), help=f"Quantizer (default {defaults.METHOD}).")] = None,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    act_order: ActOrderOpt = None,
    static_groups: StaticGroupsOpt = None,
    g_idx: GIdxOpt = None,
    damp: DampOpt = None,
    mse: MseOpt = None,
    calib: CalibOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    seed: SeedOpt = None,
    data_dir: DataDirOpt = None,
    layout: Annotated[str | None, typer.Option(metavar=_choices("layout"), help=f"Checkpoint layout whose bytes the target counts (default {defaults.LAYOUT}).")] = None,
) -> None:
    """Plan mixed bit widths for every linear under an average-bits target, without quantizing the model."""
    _check_output_file(report, "--report", ".json")
    from quantkit.allocation.heatmap import bits_heatmap
    from quantkit.api import allocate_run
    from quantkit.recipes import resolve
    from quantkit.recipes.build import allocation_options as make_allocation_options
    from quantkit.recipes.fields import QUANTIZER_OPTIONS
    from quantkit.runplan import CalibrationSpec, plan_run

    settings = resolve(None, dict(bit_choices=_bit_choices(bit_choices), score=score, granularity=granularity,
                                  search_generations=search_generations, search_offspring=search_offspring,
                                  layout=layout, seed=seed, method=method, group_size=group_size, sym=sym,
                                  act_order=act_order, static_groups=static_groups, g_idx=g_idx, damp=damp, mse=mse, calib=calib,
                                  nsamples=nsamples, seqlen=seqlen, data_dir=data_dir))
    options = {name: settings[name] for name in QUANTIZER_OPTIONS if settings[name] is not None}
    calibration = CalibrationSpec(settings["calib"], settings["nsamples"], settings["seqlen"], settings["data_dir"])
    run = plan_run(settings["method"], group_size=group_size, symmetric=sym, calibration=calibration,
                   seed=settings["seed"], layout=settings["layout"],
                   allocation=make_allocation_options(bits, settings, allocation), **options)
    plan = allocate_run(model, run)
    plan.save(report)
    table = Table(title=f"allocation for {model}")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("strategy", f"{plan.strategy} (score {plan.score}, {plan.granularity} units)")
    table.add_row("target", f"{plan.target_bits} bits per weight ({plan.budget_bytes:,} bytes)")
    table.add_row("planned", f"{plan.bits_per_weight:.4f} bits per weight ({plan.nbytes:,} bytes)")
    for width in plan.bit_choices:
        share = sum(u.weights for u in plan.units if u.bits == width) / plan.weights
        table.add_row(f"weights at {width} bits", f"{share:.1%}")
    if plan.search_history:
        table.add_row("search KL", f"{plan.search_history[0]:.4f} → {plan.search_history[-1]:.4f}")
    console.print(table)
    console.print(bits_heatmap(plan.layer_bits))
    console.print(f"plan: {report}")


@command("env")
def env(
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write what is shown to this JSON file.")] = None,
) -> None:
    """This machine as quantkit's kernels see it: the CPU, its flags, the kernel build chosen and why."""
    import torch

    from quantkit.runtime.kernels import default_backend, describe_machine

    facts = {**describe_machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
             "cuda": torch.cuda.is_available(), "backend": default_backend()}
    table = Table(title="quantkit env")
    table.add_column("item")
    table.add_column("value")
    table.add_row("CPU", f"{facts['model']} ({facts['cores']} cores, torch uses {facts['threads']} threads)")
    table.add_row("flags", " ".join(facts["flags"]) or "none of interest")
    table.add_row("kernel builds this CPU runs", ", ".join(facts["builds"]))
    table.add_row("C kernel build", f"{facts['isa']} ($QUANTKIT_CPU_ISA to choose another)")
    table.add_row("prefill GEMM", f"{facts['prefill']} ($QUANTKIT_CPU_PREFILL=bf16|fp32)")
    table.add_row("kernel backend", f"{facts['backend']} ($QUANTKIT_KERNEL; cpu-int8 rounds decode activations to int8)")
    table.add_row("torch", f"{facts['torch']}, CUDA {'available' if facts['cuda'] else 'not available'}")
    console.print(table)
    if json_out is not None:
        from quantkit.export.atomic import write_json

        write_json(json_out, facts)


@command()
def generate(
    target: Annotated[str, typer.Argument(metavar="TARGET", help="A checkpoint directory or a model (name, hub id or folder).")],
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most (stops at end of sequence).")] = 64,
    kernel: Annotated[Backend | None, typer.Option(help="Kernel serving quantized layers (default auto).")] = None,
    decoder: Annotated[str, typer.Option(help="lean: quantkit's decoder (Llama, Mistral, Qwen2, Qwen3); transformers: its generate; auto: lean where the family has it.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the text, tokens and timings to this JSON file.")] = None,
) -> None:
    """Greedy generation from a checkpoint or model, with its prefill time and decode speed."""
    from quantkit.eval.models import load_target
    from quantkit.runtime.generate import DECODERS
    from quantkit.runtime.generate import generate as generate_text

    if decoder not in DECODERS:
        raise OptionError(f"--decoder {decoder!r} is not allowed; allowed: {', '.join(DECODERS)}")
    loaded = load_target(target, kernel)
    result = generate_text(loaded.model.eval(), loaded.tokenizer, prompt, max_new_tokens, decoder)
    console.print(prompt + result.text, markup=False, highlight=False)
    table = Table(title=f"quantkit generate {target}")
    for column in ("decoder", "prompt tokens", "new tokens", "prefill s", "decode tok/s"):
        table.add_column(column, justify="left" if column == "decoder" else "right")
    speed = result.decode_tokens_per_s
    table.add_row(result.decoder, str(result.prompt_tokens), str(len(result.tokens)), f"{result.prefill_s:.3f}",
                  f"{speed:.1f}" if speed is not None else "")
    console.print(table)
    if json_out is not None:
        from quantkit.export.atomic import write_json

        write_json(json_out, {"target": target, "prompt": prompt, **result.as_dict()})


@command("recipes")
def list_recipes(
    show: Annotated[str | None, typer.Argument(metavar="[RECIPE]", help="A recipe name or file to print in full.")] = None,
) -> None:
    """List the recipes that ship with quantkit (or print one)."""
    from quantkit.recipes import find_recipe, load_recipe, shipped_recipes

    if show is not None:
        load_recipe(show)  # validated before it is shown
        path = find_recipe(show)
        print(f"# {path}\n{path.read_text(encoding='utf-8')}", end="")
        return
    table = Table(title="recipes (quantkit quantize MODEL --recipe NAME -o OUT)")
    for column in ("name", "pipeline", "description"):
        table.add_column(column)
    for name, path in shipped_recipes().items():
        recipe = load_recipe(str(path))
        table.add_row(name, recipe.summary(), recipe.description or "")
    console.print(table)


@command("eval")
def evaluate(
    targets: Annotated[list[str], typer.Argument(metavar="TARGET...", help="Checkpoint directories or models to evaluate (side by side).")],
    ppl: Annotated[list[str] | None, typer.Option(help="Perplexity datasets: wikitext2, c4, ptb or a local file (repeat or comma list). Default: wikitext2 when no --tasks are given, else none.")] = None,
    tasks: Annotated[list[str] | None, typer.Option(help="Zero-shot tasks through lm-evaluation-harness (repeat or comma list), e.g. piqa,hellaswag,arc_easy,arc_challenge,winogrande,lambada_openai; local files with --data-dir.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N examples of each task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Zero-shot requests per forward pass.")] = 8,
    num_fewshot: Annotated[int, typer.Option(min=0, help="Examples shown before each question (0: zero-shot).")] = 0,
    seqlen: Annotated[int, typer.Option(min=2, help="Tokens per perplexity window.")] = 2048,
    max_windows: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N perplexity windows.")] = None,
    baseline: Annotated[str | None, typer.Option(help="Model to compare against. Default: the one unquantized model among several.")] = None,
    report: Annotated[Path | None, typer.Option(help="Directory for report.json, report.md and the plots. Default: quantkit-reports/eval-<time>.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Local data directory (or $QUANTKIT_DATA_DIR) for named perplexity sets and zero-shot tasks, laid out as wikitext-2-raw/, c4/, ptb/, piqa/, hellaswag/, arc_easy/, …")] = None,
    kernel: Annotated[Backend | None, typer.Option(help="Kernel serving quantized layers (default auto).")] = None,
) -> None:
    """Perplexity and zero-shot accuracy of checkpoints and models, as a table, JSON, Markdown and plots."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars: quantkit shows its own (read when tqdm loads)
    from quantkit.eval.report import check_report_dir, report_table, write_report
    from quantkit.eval.run import EvalRequest, run_eval

    task_names = _split_list(tasks or [])
    datasets = _split_list(ppl) if ppl is not None else ([] if task_names else ["wikitext2"])
    request = EvalRequest(targets, datasets, task_names, seqlen, max_windows, baseline, data_dir, kernel, limit,
                          batch_size, num_fewshot)
    folder = report or _report_path("eval")
    check_report_dir(folder)
    result = run_eval(request)
    console.print(report_table(result))
    written = write_report(result, folder)
    console.print(f"report: {', '.join(str(p) for p in written)}")


@command("report")
def render_report(
    source: Annotated[Path, typer.Argument(metavar="REPORT_JSON", help="A report.json written by `quantkit eval`.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Directory for the Markdown and plots. Default: the JSON's own directory.")] = None,
) -> None:
    """Render a saved evaluation report again (table, Markdown, plots) without any model."""
    from quantkit.eval.report import check_report_dir, load_report, report_table, write_report

    saved = load_report(source)
    check_report_dir(output or source.parent)
    console.print(report_table(saved))
    written = write_report(saved, output or source.parent)
    console.print(f"report: {', '.join(str(p) for p in written)}")


@command("diagnose")
def diagnose(
    base: Annotated[str, typer.Argument(metavar="BASE", help="The float model: hub id, local directory, .gguf file or built-in alias.")],
    quantized: Annotated[str, typer.Argument(metavar="QUANTIZED", help="A quantkit checkpoint of BASE (weight-only, no transform).")],
    heldout: Annotated[str, typer.Option(help="Text the divergence is measured on: wikitext2, c4, ptb or a local file.")] = "wikitext2",
    windows: Annotated[int, typer.Option(min=1, help="Held-out windows.")] = defaults.DIAGNOSE_HELDOUT[0],
    seqlen: Annotated[int, typer.Option(min=2, help="Tokens per held-out window.")] = defaults.DIAGNOSE_HELDOUT[1],
    calib: Annotated[str, typer.Option(help="Text whose inputs the relative output errors are measured on (as --calib of quantize).")] = defaults.CALIBRATION,
    nsamples: Annotated[int, typer.Option(min=1, help="Calibration windows for the output errors.")] = defaults.DIAGNOSE_CALIBRATION[0],
    calib_seqlen: Annotated[int, typer.Option(min=2, help="Tokens per calibration window.")] = defaults.DIAGNOSE_CALIBRATION[1],
    granularity: Annotated[str, typer.Option(metavar=_choices("granularity"), help="Unit measured (and repaired): a linear, a group of linears sharing an input (each routed expert whole), or a block.")] = "linear",
    top: Annotated[int, typer.Option(min=1, help="Units shown in the table (the JSON has all).")] = 20,
    repair: Annotated[bool, typer.Option(help="Find the fewest units (in attribution order) to raise to --repair-bits so that KL <= --target-kl (or top-1 agreement >= --target-top1), and write their allocation plan.")] = False,
    target_kl: Annotated[float | None, typer.Option(help="The KL target of --repair.")] = None,
    target_top1: Annotated[float | None, typer.Option(help="The top-1 agreement target of --repair (a fraction, e.g. 0.9).")] = None,
    repair_bits: Annotated[int, typer.Option(help="The width repaired units are raised to.")] = defaults.REPAIR_BITS,
    plan: Annotated[Path | None, typer.Option(help="The repair's allocation plan (for `quantize --allocation`). Default: REPORT/repair-plan.json.")] = None,
    report: Annotated[Path | None, typer.Option(help="Directory for diagnose.json and heatmap.png. Default: quantkit-reports/diagnose-<time>.")] = None,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Which layers cause a quantized model's divergence from its float base; with --repair, a plan that meets a KL target."""
    from quantkit.allocation.units import GRANULARITIES
    from quantkit.diagnose.repair import RepairTarget
    from quantkit.diagnose.report import report_tables, write_diagnosis
    from quantkit.diagnose.run import DiagnoseRequest, run_diagnose
    from quantkit.eval.report import check_report_dir

    targets = [RepairTarget(metric, value) for metric, value in (("kl", target_kl), ("top1", target_top1))
               if value is not None]
    if not repair and targets:
        raise OptionError(f"--target-{targets[0].metric} needs --repair")
    if repair and len(targets) != 1:
        raise OptionError("--repair takes one target: --target-kl or --target-top1")
    if plan is not None and not repair:
        raise OptionError("--plan is written by --repair")
    if granularity not in GRANULARITIES:
        raise OptionError(f"unknown --granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    folder = report or _report_path("diagnose")
    check_report_dir(folder)
    plan_file = (plan or folder / "repair-plan.json") if repair else None
    if plan_file is not None:
        _check_output_file(plan_file, "--plan", ".json")
    request = DiagnoseRequest(base, quantized, heldout, windows, seqlen, calib, nsamples, calib_seqlen, granularity,
                              data_dir, defaults.SEED if seed is None else seed, targets[0] if repair else None,
                              repair_bits, plan_file)
    result = run_diagnose(request)
    for table in report_tables(result, top):
        console.print(table)
    written = write_diagnosis(result, folder)
    console.print(f"report: {', '.join(str(p) for p in written)}")
    if plan_file is not None:
        console.print(f"plan: {plan_file} (quantize with the checkpoint's method and scheme and --allocation {plan_file})")


@command("export")
def export_checkpoint(
    source: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="A checkpoint quantkit loads (native, GPTQ or compressed-tensors); to --layout gguf also an unquantized model.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory (gguf: .gguf file) to write.")],
    layout: Annotated[Layout, typer.Option(help="Target layout.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    gguf_type: GGUFTypeOpt = None,
) -> None:
    """Convert a quantized checkpoint to another layout (the quantized weights are carried over exactly), or
    write an unquantized model as a float GGUF file."""
    from quantkit.api import export
    from quantkit.checkpoint_info import inspect_checkpoint

    export(source, output, layout, overwrite=overwrite, gguf_type=gguf_type)
    info = inspect_checkpoint(output)
    console.print(f"wrote {layout} checkpoint {output}: {sum(s.layers for s in info.schemes)} "
                  f"quantized layers ({', '.join(s.scheme for s in info.schemes)}), {size_text(info.file_bytes)}")


@command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A quantkit checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show what a checkpoint holds: schemes, sizes, bits per weight."""
    from quantkit.checkpoint_info import inspect_checkpoint
    from quantkit.formats import ROLES

    info = inspect_checkpoint(checkpoint)
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    roles = [r for r in ROLES if info.total.role_bytes[r]]
    table = Table(title=f"{checkpoint} ({info.model_type}, method {info.method})")
    for column in ("scheme", "layers", "weights", "MiB", "bits/weight", *(f"{r} bits" for r in roles), "outliers"):
        table.add_column(column, justify="left" if column == "scheme" else "right")

    def add(s, name: str) -> None:
        role_bits = s.role_bits()
        table.add_row(name, str(s.layers), f"{s.weights:,}", f"{s.bytes / 2**20:.2f}", f"{s.bits_per_weight:.3f}",
                      *(f"{role_bits[r]:.3f}" for r in roles), f"{s.outliers / s.weights:.3%}")

    for s in info.schemes:
        add(s, s.scheme)
    table.add_row("not quantized (embeddings, norms, head)", "", f"{info.other_params:,}", f"{info.other_bytes / 2**20:.2f}")
    if info.total.weights:
        add(info.total, info.total.scheme)
    console.print(table)
    console.print(f"files on disk: {info.file_bytes / 2**20:.2f} MiB")
    if len(set(info.layer_bits.values())) > 1:
        from quantkit.allocation.heatmap import bits_heatmap
        from quantkit.models.architectures import ADAPTERS

        adapter = ADAPTERS.get(info.model_type)
        console.print(bits_heatmap(info.layer_bits, order=adapter.linear_names() if adapter else ()))
    console.print_json(json.dumps(info.quantization_config))


def _quiet_third_party_warnings() -> None:
    """Library deprecation notices are for the developers of quantkit, not for its users (unless they ask
    with -W or $PYTHONWARNINGS)."""
    if not sys.warnoptions:
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


def main() -> None:
    """Console entry point: every failure is one line on stderr and a non-zero exit (2 for a usage error or a
    bad option value, 130 for Ctrl-C)."""
    _quiet_third_party_warnings()
    command_group = typer.main.get_command(app)
    try:
        code = command_group.main(prog_name="quantkit", standalone_mode=False)
    except OptionError as exc:
        _fail(str(exc), EXIT_USAGE, _try_help(_command_path(command_group)))
    except QuantkitError as exc:
        _fail(str(exc), 1)
    except _Interrupted as exc:
        _fail(str(exc), EXIT_INTERRUPTED)
    except typer.Abort:  # Ctrl-C or end of input that click caught outside a command
        _fail("interrupted", EXIT_INTERRUPTED)
    except TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `quantkit`: the help is the answer
            print(exc.format_message())
            sys.exit(0)
        context = getattr(exc, "ctx", None)
        message = exc.format_message().replace("Value error, ", "")
        _fail(message, getattr(exc, "exit_code", EXIT_USAGE),
              _try_help(context.command_path if context else _command_path(command_group)))
    except OSError as exc:  # a write path that should have said this itself
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", 1)
    except MemoryError:
        _fail("out of memory", 1)
    if code == EXIT_INTERRUPTED:  # Ctrl-C outside a command (while parsing or importing)
        _fail("interrupted", EXIT_INTERRUPTED)
    sys.exit(code or 0)


def _command_path(command_group) -> str:
    """``quantkit`` and the subcommand of ``command_group`` named on the command line, if any."""
    named = next((word for word in sys.argv[1:] if not word.startswith("-")), None)
    return f"quantkit {named}" if named in command_group.commands else "quantkit"


def _try_help(command_path: str) -> str:
    return f"Try '{command_path} -h' for help."


def _fail(message: str, code: int, hint: str | None = None) -> None:
    one_line = " ".join(message.split())
    if os.environ.get("WORLD_SIZE", "1") != "1":  # which rank of a torchrun launch failed
        one_line = f"rank {os.environ.get('RANK', '?')}: {one_line}"
    err_console.print(f"error: {one_line}", markup=False, highlight=False, soft_wrap=True)
    if hint:
        err_console.print(hint, markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)
