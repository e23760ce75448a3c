"""The ``quantkit`` command line: a thin layer over :mod:`quantkit.api`."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.allocation.options import AllocationOptions
    from quantkit.allocation.plan import AllocationPlan

app = typer.Typer(
    help="Post-training quantization for large language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)


def _split_list(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


# Options shared by `quantize` and `allocate`.
ModelArg = Annotated[str, typer.Argument(help="Hub id, local directory, .gguf file or built-in alias (smollm2-135m).")]
MethodOpt = Annotated[str, typer.Option(help="Quantizer: gptq, rtn or spqr.")]
GroupSizeOpt = Annotated[int | None, typer.Option(help="Input columns per scale/zero group; -1 for per-channel. Default: 128 (gptq, rtn), 16 (spqr), 32 (fp4); fixed for mxfp4 (32) and nvfp4 (16).")]
SymOpt = Annotated[bool | None, typer.Option("--sym/--asym", help="Symmetric grid (zero point fixed mid-range) or asymmetric. Default: sym (gptq, rtn), asym (spqr).")]
ActOrderOpt = Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="GPTQ/SpQR: columns in decreasing Hessian-diagonal order (default on).")]
StaticGroupsOpt = Annotated[bool | None, typer.Option("--static-groups/--no-static-groups", help="GPTQ: group grids fixed before any update (no g_idx).")]
DampOpt = Annotated[float | None, typer.Option(help="Damping as a fraction of the mean Hessian diagonal. Default: 0.01 (gptq), 1.0 (spqr).")]
MseOpt = Annotated[bool | None, typer.Option("--mse/--no-mse", help="GPTQ/RTN: search a clipping ratio per group (integer grids) or the block scale among candidates (float formats).")]
CalibOpt = Annotated[str, typer.Option(help="Calibration: c4, wikitext2 (hub), synthetic, or a local file/directory.")]
NsamplesOpt = Annotated[int, typer.Option(help="Calibration windows.")]
SeqlenOpt = Annotated[int, typer.Option(help="Tokens per calibration window.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling and anything random.")]
DataDirOpt = Annotated[str | None, typer.Option(help="Local data directory for named sources (c4).")]
BitChoicesOpt = Annotated[str | None, typer.Option(help="Widths a mixed allocation may give a linear (comma list; default 2,3,4,8).")]
ScoreOpt = Annotated[str | None, typer.Option(help="Allocation score: lim, zd, error (output NMSE per width) or kl (end-to-end, per unit and width). Default: kl (auto, solver), lim (ranked).")]
GranularityOpt = Annotated[str | None, typer.Option(help="Allocation unit: linear, group (linears sharing an input, which serving engines fuse and which must then share a scheme) or block. Default: linear for the native layout, group for gptq and compressed-tensors.")]
GenerationsOpt = Annotated[int | None, typer.Option(help="Evolutionary search generations (auto allocation; default 12, 0 keeps the solver's answer).")]
OffspringOpt = Annotated[int | None, typer.Option(help="Evolutionary search offspring per generation (default 12).")]


def _allocation_options(bits: float, bit_choices: str | None, strategy: str, score: str | None,
                        granularity: str | None, layout: str, generations: int | None, offspring: int | None,
                        seed: int) -> AllocationOptions:
    """The allocation asked for on the command line."""
    from dataclasses import replace

    from quantkit.allocation.options import CPU_SEARCH, AllocationOptions

    try:
        choices = tuple(int(b) for b in _split_list([bit_choices or "2,3,4,8"]))
    except ValueError:
        raise QuantkitError(f"--bit-choices must be a comma list of integers, got {bit_choices!r}") from None
    search = replace(CPU_SEARCH, **{k: v for k, v in (("generations", generations), ("offspring", offspring))
                                    if v is not None})
    granularity = granularity or ("linear" if layout == "native" else "group")
    return AllocationOptions(bits, choices, strategy, score, granularity, search, seed=seed)


def _quantize_allocation(allocation: str | None, bits: float | None, bit_choices: str | None, score: str | None,
                         granularity: str | None, layout: str, generations: int | None, offspring: int | None,
                         seed: int) -> tuple[AllocationOptions | AllocationPlan | None, int]:
    """``quantize``'s allocation (none, options, or a plan file) and the width of its base scheme."""
    from quantkit.allocation.plan import AllocationPlan

    others = {"--bit-choices": bit_choices, "--score": score, "--granularity": granularity,
              "--search-generations": generations, "--search-offspring": offspring}
    given = [flag for flag, value in others.items() if value is not None]
    if allocation is not None and Path(allocation).suffix == ".json":
        if given or bits is not None:
            raise QuantkitError(f"{(given or ['--bits'])[0]} cannot change a saved allocation plan; "
                                "make a new one with `quantkit allocate`")
        plan = AllocationPlan.load(Path(allocation))
        return plan, plan.bit_choices[0]
    if allocation is not None:
        options = _allocation_options(4 if bits is None else bits, bit_choices, allocation, score, granularity, layout,
                                      generations, offspring, seed)
        return options, options.bit_choices[0]
    if given:
        raise QuantkitError(f"{given[0]} needs --allocation")
    bits = 4 if bits is None else bits
    if bits != int(bits):
        raise QuantkitError(f"--bits {bits} is not a whole width; an average needs --allocation")
    return None, int(bits)


@app.command()
def quantize(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write.")],
    method: MethodOpt = "gptq",
    bits: Annotated[float | None, typer.Option(help="Weight bits: 2, 3, 4 or 8 (default 4; 4 for the float formats); with --allocation, the average bits per weight as written, codes, scales and zeros included (e.g. 3.5).")] = None,
    number_format: Annotated[str, typer.Option("--format", help="Weight number format: int, fp4 (E2M1, float16 scales), mxfp4 (E8M0 scales per 32) or nvfp4 (E4M3 scales per 16 and a tensor scale).")] = "int",
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    act_order: ActOrderOpt = None,
    static_groups: StaticGroupsOpt = None,
    true_sequential: Annotated[bool, typer.Option("--true-sequential/--no-true-sequential", help="Statistics of each group of linears after the earlier ones are quantized.")] = True,
    damp: DampOpt = None,
    mse: MseOpt = None,
    act_bits: Annotated[int | None, typer.Option(help="Quantize the input of every quantized linear per token to 4 or 8 bits (fake quantization, recorded in the checkpoint). Default: weights only.")] = None,
    act_format: Annotated[str | None, typer.Option(help="Activation number format: int, fp4, mxfp4 or nvfp4. Default: the weight format for 4-bit activations of float weights, else int.")] = None,
    act_group_size: Annotated[int | None, typer.Option(help="Activation columns per scale; default one scale per token (int, fp4), 32 (mxfp4), 16 (nvfp4).")] = None,
    outlier_threshold: Annotated[float | None, typer.Option(help="SpQR: relative outlier threshold; higher keeps fewer outliers, inf none (default 0.2).")] = None,
    simplified_outliers: Annotated[bool | None, typer.Option("--simplified-outliers/--loo-outliers", help="SpQR: skip the leave-one-out pre-detection (faster, usually a little worse).")] = None,
    stat_bits: Annotated[int | None, typer.Option(help="SpQR: bits of the quantized scales and zero points (default 3).")] = None,
    stat_group_size: Annotated[int | None, typer.Option(help="SpQR: output rows sharing one second-level scale/zero (default 16).")] = None,
    calib: CalibOpt = "c4",
    nsamples: NsamplesOpt = 128,
    seqlen: SeqlenOpt = 2048,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    layout: Annotated[str, typer.Option(help="Checkpoint layout: native, gptq (v1) or compressed-tensors (pack-quantized, nvfp4- or mxfp4-pack-quantized).")] = "native",
    transform: Annotated[str | None, typer.Option(help="Rewrite the model first: hadamard (QuaRot), flatquant or ostquant (trained). Default: none.")] = None,
    transform_budget: Annotated[str, typer.Option(help="Training budget of flatquant/ostquant: cpu (minutes here) or paper.")] = "cpu",
    transform_nsamples: Annotated[int | None, typer.Option(help="Transform training windows (overrides the budget).")] = None,
    transform_seqlen: Annotated[int | None, typer.Option(help="Tokens per transform training window (overrides the budget).")] = None,
    transform_epochs: Annotated[int | None, typer.Option(help="Passes over the transform training windows (overrides the budget).")] = None,
    transform_batch_size: Annotated[int | None, typer.Option(help="Transform training windows per step (overrides the budget).")] = None,
    allocation: Annotated[str | None, typer.Option(help="Mixed bits: auto (solver, then evolutionary search), solver (exact knapsack), ranked (layer-wise paper), random, or a plan file from `quantkit allocate`. Default: one width everywhere.")] = None,
    bit_choices: BitChoicesOpt = None,
    score: ScoreOpt = None,
    granularity: GranularityOpt = None,
    search_generations: GenerationsOpt = None,
    search_offspring: OffspringOpt = None,
) -> None:
    """Quantize a causal LM and write a packed checkpoint."""
    from quantkit.actquant import activation_scheme
    from quantkit.api import CalibrationSpec
    from quantkit.api import quantize as run_quantize
    from quantkit.checkpoint_info import inspect_checkpoint
    from quantkit.quantizers import make_quantizer
    from quantkit.transforms import make_transform

    options = dict(
        damp=damp, act_order=act_order, static_groups=static_groups, mse=mse, outlier_threshold=outlier_threshold,
        simplified_outliers=simplified_outliers, stat_bits=stat_bits, stat_group_size=stat_group_size,
    )
    allocation_spec, base_bits = _quantize_allocation(allocation, bits, bit_choices, score, granularity, layout,
                                                      search_generations, search_offspring, seed)
    if allocation_spec is not None and number_format != "int":  # the API refuses it, saying why
        base_bits = 4
    scheme = make_quantizer(method, **options).default_scheme(base_bits, group_size, sym, number_format)
    act_scheme = None
    if act_bits is not None:
        default_format = number_format if scheme.is_float and act_bits == 4 else "int"
        act_scheme = activation_scheme(act_bits, act_format or default_format, act_group_size)
    elif act_format is not None or act_group_size is not None:
        raise QuantkitError("--act-format and --act-group-size need --act-bits")
    budget_options = dict(nsamples=transform_nsamples, seqlen=transform_seqlen, epochs=transform_epochs,
                          batch_size=transform_batch_size)
    if transform is not None:
        transform_object = make_transform(transform, transform_budget, **budget_options)
    elif transform_budget != "cpu" or any(v is not None for v in budget_options.values()):
        raise QuantkitError("--transform-budget and the --transform-* training options need --transform")
    else:
        transform_object = None
    result = run_quantize(
        model,
        method=method,
        scheme=scheme,
        calibration=CalibrationSpec(calib, nsamples, seqlen, data_dir),
        output=output,
        seed=seed,
        true_sequential=true_sequential,
        overwrite=overwrite,
        layout=layout,
        act_scheme=act_scheme,
        transform=transform_object,
        allocation=allocation_spec,
        **options,
    )
    info = inspect_checkpoint(output)
    table = Table(title=f"quantized {model} → {output}")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("method", f"{method} {' '.join(f'{k}={v}' for k, v in result.quantization_config['quantizer'].items())}")
    table.add_row("scheme", ", ".join(s.scheme for s in info.schemes))
    if act_scheme is not None:
        table.add_row("activations", f"{act_scheme.format} {act_scheme.bits}-bit per token"
                      + (f", groups of {act_scheme.group_size}" if act_scheme.group_size != -1 else ""))
    transform_record = result.quantization_config["transform"]
    if transform_record is not None:
        table.add_row("transform", f"{transform_record['name']}, {len(transform_record['online'])} online input maps")
    allocation_record = result.quantization_config["allocation"]
    if allocation_record is not None:
        table.add_row("allocation", f"{allocation_record['strategy']} (score {allocation_record['score']}), "
                      f"target {allocation_record['target_bits']} bits over {allocation_record['bit_choices']}")
    table.add_row("layers quantized", str(len(result.quantized)))
    table.add_row("bits per quantized weight", f"{info.bits_per_weight:.3f}")
    table.add_row("checkpoint size", f"{info.file_bytes / 2**20:.1f} MiB")
    for stage, seconds in result.seconds.items():
        table.add_row(f"time: {stage}", f"{seconds:.1f} s")
    console.print(table)
    if allocation_record is not None:
        from quantkit.allocation.heatmap import bits_heatmap

        console.print(bits_heatmap(allocation_record["layer_bits"]))


@app.command()
def allocate(
    model: ModelArg,
    bits: Annotated[float, typer.Option(help="Target average bits per quantized weight as written (codes, scales, zeros).")],
    report: Annotated[Path, typer.Option(help="JSON file for the plan (pass it to `quantize --allocation`).")] = Path("allocation.json"),
    allocation: Annotated[str, typer.Option(help="auto (solver, then evolutionary search), solver, ranked or random.")] = "auto",
    bit_choices: BitChoicesOpt = None,
    score: ScoreOpt = None,
    granularity: GranularityOpt = None,
    search_generations: GenerationsOpt = None,
    search_offspring: OffspringOpt = None,
    method: MethodOpt = "gptq",
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    act_order: ActOrderOpt = None,
    static_groups: StaticGroupsOpt = None,
    damp: DampOpt = None,
    mse: MseOpt = None,
    calib: CalibOpt = "c4",
    nsamples: NsamplesOpt = 128,
    seqlen: SeqlenOpt = 2048,
    seed: SeedOpt = 0,
    data_dir: DataDirOpt = None,
    layout: Annotated[str, typer.Option(help="Checkpoint layout whose bytes the target counts: native, gptq or compressed-tensors.")] = "native",
) -> None:
    """Plan mixed bit widths for every linear under an average-bits target, without quantizing the model."""
    from quantkit.allocation.heatmap import bits_heatmap
    from quantkit.api import CalibrationSpec
    from quantkit.api import allocate as run_allocate
    from quantkit.quantizers import make_quantizer

    options = dict(damp=damp, act_order=act_order, static_groups=static_groups, mse=mse)
    allocation_options = _allocation_options(bits, bit_choices, allocation, score, granularity, layout,
                                             search_generations, search_offspring, seed)
    scheme = make_quantizer(method, **options).default_scheme(allocation_options.bit_choices[0], group_size, sym)
    plan = run_allocate(model, allocation_options, method, scheme, CalibrationSpec(calib, nsamples, seqlen, data_dir),
                        seed, layout, **options)
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


@app.command("eval")
def evaluate(
    targets: Annotated[list[str], typer.Argument(help="Checkpoint directories or models to evaluate.")],
    ppl: Annotated[list[str], typer.Option(help="Perplexity datasets: wikitext2, c4, ptb or a local file (repeat or comma list).")] = ["wikitext2"],  # noqa: B006
    seqlen: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 2048,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows.")] = None,
    baseline: Annotated[str | None, typer.Option(help="Model to compare against (e.g. the unquantized one).")] = None,
    report: Annotated[Path, typer.Option(help="Directory for the JSON report.")] = Path("quantkit-reports"),
    data_dir: Annotated[str | None, typer.Option(help="Local data directory for named datasets.")] = None,
    kernel: Annotated[str | None, typer.Option(help="Kernel serving quantized layers: auto, cpu, aten, triton or dequant.")] = None,
) -> None:
    """Perplexity of checkpoints (and a baseline), as a table and a JSON report."""
    from quantkit.eval.report import perplexity_table, save_json
    from quantkit.eval.run import EvalRequest, run_eval

    if seqlen < 2:
        raise QuantkitError(f"--seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise QuantkitError(f"--max-windows must be positive, got {max_windows}")
    if kernel is not None:
        from quantkit.runtime.kernels import check_backend

        check_backend(kernel)
    request = EvalRequest(targets, _split_list(ppl), seqlen, max_windows, baseline, data_dir, kernel)
    result = run_eval(request)
    console.print(perplexity_table(result))
    path = report / f"eval-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.json"
    save_json(result, path)
    console.print(f"report: {path}")


@app.command("export")
def export_checkpoint(
    source: Annotated[str, typer.Argument(help="A checkpoint quantkit loads (native, GPTQ or compressed-tensors).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write.")],
    layout: Annotated[str, typer.Option(help="Target layout: native, gptq or compressed-tensors.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Convert a quantized checkpoint to another layout (the quantized weights are carried over exactly)."""
    from quantkit.api import export
    from quantkit.checkpoint_info import inspect_checkpoint

    export(source, output, layout, overwrite=overwrite)
    info = inspect_checkpoint(output)
    console.print(f"wrote {layout} checkpoint {output}: {sum(s.layers for s in info.schemes)} "
                  f"quantized layers ({', '.join(s.scheme for s in info.schemes)}), {info.file_bytes / 2**20:.1f} MiB")


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A quantkit checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show what a checkpoint holds: schemes, sizes, bits per weight."""
    from quantkit.checkpoint_info import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    if as_json:
        console.print_json(json.dumps(info.to_dict()))
        return
    from quantkit.checkpoint_info import ROLES

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
        from quantkit.models.adapters import ADAPTERS

        adapter = ADAPTERS.get(info.model_type)
        console.print(bits_heatmap(info.layer_bits, order=adapter.linear_names() if adapter else ()))
    console.print_json(json.dumps(info.quantization_config))


def main() -> None:
    """Console entry point: every failure is one line on stderr and a non-zero exit."""
    command = typer.main.get_command(app)
    try:
        command.main(standalone_mode=False)
    except QuantkitError as exc:
        _fail(str(exc), 1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `quantkit`: the help is the answer
            print(message)
            sys.exit(0)
        _fail(message, getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _fail(message: str, code: int) -> None:
    one_line = " ".join(message.split())
    err_console.print(f"error: {one_line}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)
