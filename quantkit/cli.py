"""The ``quantkit`` command line: a thin layer over :mod:`quantkit.api`."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from quantkit.errors import QuantkitError

app = typer.Typer(
    help="Post-training quantization for large language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
# quantize options that say how to run, not what to compute: never recipe fields
RUN_OPTIONS = ("model", "output", "overwrite", "recipe", "save_recipe", "offload", "devices", "trust_remote_code")
err_console = Console(stderr=True)


def _split_list(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _bit_choices(text: str | None) -> list[int] | None:
    """``--bit-choices 2,3,4`` as a list of widths."""
    if text is None:
        return None
    try:
        return [int(b) for b in _split_list([text])]
    except ValueError:
        raise QuantkitError(f"--bit-choices must be a comma list of integers, got {text!r}") from None


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


@app.command()
def quantize(
    ctx: typer.Context,
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write.")],
    recipe: Annotated[str | None, typer.Option(help="A recipe (YAML file, or the name of a shipped one: see `quantkit recipes`) giving every setting; flags given here override its fields.")] = None,
    save_recipe: Annotated[Path | None, typer.Option(help="After a successful run, write the settings it used (recipe and flags merged) as a recipe file.")] = None,
    method: Annotated[str | None, typer.Option(help="Quantizer: gptq (default), rtn or spqr.")] = None,
    bits: Annotated[float | None, typer.Option(help="Weight bits: 2, 3, 4 or 8 (default 4; 4 for the float formats); with --allocation, the average bits per weight as written, codes, scales and zeros included (e.g. 3.5).")] = None,
    number_format: Annotated[str | None, typer.Option("--format", help="Weight number format: int (default), fp4 (E2M1, float16 scales), mxfp4 (E8M0 scales per 32) or nvfp4 (E4M3 scales per 16 and a tensor scale).")] = None,
    group_size: GroupSizeOpt = None,
    sym: SymOpt = None,
    act_order: ActOrderOpt = None,
    static_groups: StaticGroupsOpt = None,
    true_sequential: Annotated[bool | None, typer.Option("--true-sequential/--no-true-sequential", help="Statistics of each group of linears after the earlier ones are quantized (default on).")] = None,
    damp: DampOpt = None,
    mse: MseOpt = None,
    act_bits: Annotated[int | None, typer.Option(help="Quantize the input of every quantized linear per token to 4 or 8 bits (fake quantization, recorded in the checkpoint). Default: weights only.")] = None,
    act_format: Annotated[str | None, typer.Option(help="Activation number format: int, fp4, mxfp4 or nvfp4. Default: the weight format for 4-bit activations of float weights, else int.")] = None,
    act_group_size: Annotated[int | None, typer.Option(help="Activation columns per scale; default one scale per token (int, fp4), 32 (mxfp4), 16 (nvfp4).")] = None,
    outlier_threshold: Annotated[float | None, typer.Option(help="SpQR: relative outlier threshold; higher keeps fewer outliers, inf none (default 0.2).")] = None,
    simplified_outliers: Annotated[bool | None, typer.Option("--simplified-outliers/--loo-outliers", help="SpQR: skip the leave-one-out pre-detection (faster, usually a little worse).")] = None,
    stat_bits: Annotated[int | None, typer.Option(help="SpQR: bits of the quantized scales and zero points (default 3).")] = None,
    stat_group_size: Annotated[int | None, typer.Option(help="SpQR: output rows sharing one second-level scale/zero (default 16).")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration: c4 (default), wikitext2 (hub), synthetic, or a local file/directory.")] = None,
    nsamples: Annotated[int | None, typer.Option(help="Calibration windows (default 128).")] = None,
    seqlen: Annotated[int | None, typer.Option(help="Tokens per calibration window (default 2048).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling and anything random (default 0).")] = None,
    data_dir: DataDirOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    layout: Annotated[str | None, typer.Option(help="Checkpoint layout: native (default), gptq (v1) or compressed-tensors (pack-quantized, nvfp4- or mxfp4-pack-quantized).")] = None,
    transform: Annotated[str | None, typer.Option(help="Rewrite the model first: hadamard (QuaRot), flatquant or ostquant (trained). Default: none.")] = None,
    transform_budget: Annotated[str | None, typer.Option(help="Training budget of flatquant/ostquant: cpu (default; minutes here) or paper.")] = None,
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
    offload: Annotated[str | None, typer.Option(help="disk: stream the model (a local safetensors directory) one block at a time, write each finished block at once and spill activations to disk; peak memory stays near one block, and rerunning a killed run's command resumes it from OUTPUT.partial. Native layout; no --transform or --allocation.")] = None,
    devices: Annotated[str | None, typer.Option(help="Spread the decoder blocks over these devices in contiguous runs, e.g. cuda:0,cuda:1 (default: where the model is).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Let transformers run Python code shipped with the model (off by default: only do this for models you trust).")] = False,
) -> None:
    """Quantize a causal LM and write a packed checkpoint (settings from flags, a recipe, or both)."""
    from quantkit.api import quantize as run_quantize
    from quantkit.checkpoint_info import inspect_checkpoint
    from quantkit.recipes import load_recipe, recipe_from_settings, resolve
    from quantkit.recipes.build import pinned_settings, quantize_arguments

    given = {name: value for name, value in ctx.params.items() if name not in RUN_OPTIONS}
    given["bit_choices"] = _bit_choices(bit_choices)
    settings = resolve(load_recipe(recipe) if recipe else None, given, recipe or "")
    arguments = quantize_arguments(settings)
    act_scheme = arguments["act_scheme"]
    saved = None
    if save_recipe is not None:
        if save_recipe.is_dir():
            raise QuantkitError(f"--save-recipe {save_recipe} is a directory; name a .yaml file")
        command = " ".join(["quantkit", *sys.argv[1:]])
        saved = recipe_from_settings(pinned_settings(settings, arguments), save_recipe.stem, f"saved by: {command}")
    result = run_quantize(model, output=output, overwrite=overwrite, offload=offload,
                          devices=devices.split(",") if devices is not None else None,
                          trust_remote_code=trust_remote_code, **arguments)
    if saved is not None:
        saved.save(save_recipe)
    info = inspect_checkpoint(output)
    table = Table(title=f"quantized {model} → {output}")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("method", f"{settings['method']} {' '.join(f'{k}={v}' for k, v in result.quantization_config['quantizer'].items())}")
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
    table.add_row("layers quantized", str(info.total.layers))
    table.add_row("bits per quantized weight", f"{info.bits_per_weight:.3f}")
    table.add_row("checkpoint size", f"{info.file_bytes / 2**20:.1f} MiB")
    for stage, seconds in result.seconds.items():
        table.add_row(f"time: {stage}", f"{seconds:.1f} s")
    console.print(table)
    if save_recipe is not None:
        console.print(f"recipe: {save_recipe}")
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
    from quantkit.recipes import resolve
    from quantkit.recipes.build import allocation_options as make_allocation_options

    options = dict(damp=damp, act_order=act_order, static_groups=static_groups, mse=mse)
    settings = resolve(None, dict(bit_choices=_bit_choices(bit_choices), score=score, granularity=granularity,
                                  search_generations=search_generations, search_offspring=search_offspring,
                                  layout=layout, seed=seed))
    allocation_options = make_allocation_options(bits, settings, allocation)
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


@app.command("recipes")
def list_recipes(
    show: Annotated[str | None, typer.Argument(help="A recipe name or file to print in full.")] = None,
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


@app.command("eval")
def evaluate(
    targets: Annotated[list[str], typer.Argument(help="Checkpoint directories or models to evaluate (side by side).")],
    ppl: Annotated[list[str] | None, typer.Option(help="Perplexity datasets: wikitext2, c4, ptb or a local file (repeat or comma list). Default: wikitext2 when no --tasks are given, else none.")] = None,
    tasks: Annotated[list[str] | None, typer.Option(help="Zero-shot tasks through lm-evaluation-harness (repeat or comma list), e.g. piqa,hellaswag,arc_easy,arc_challenge,winogrande,lambada_openai; local files with --data-dir.")] = None,
    limit: Annotated[int | None, typer.Option(help="Score only the first N examples of each task.")] = None,
    batch_size: Annotated[int, typer.Option(help="Zero-shot requests per forward pass.")] = 8,
    num_fewshot: Annotated[int, typer.Option(help="Examples shown before each question (0: zero-shot).")] = 0,
    seqlen: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 2048,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first N perplexity windows.")] = None,
    baseline: Annotated[str | None, typer.Option(help="Model to compare against. Default: the one unquantized model among several.")] = None,
    report: Annotated[Path | None, typer.Option(help="Directory for report.json, report.md and the plots. Default: quantkit-reports/eval-<time>.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Local data directory (or $QUANTKIT_DATA_DIR) for named perplexity sets and zero-shot tasks, laid out as wikitext-2-raw/, c4/, ptb/, piqa/, hellaswag/, arc_easy/, …")] = None,
    kernel: Annotated[str | None, typer.Option(help="Kernel serving quantized layers: auto, cpu, aten, triton or dequant.")] = None,
) -> None:
    """Perplexity and zero-shot accuracy of checkpoints and models, as a table, JSON, Markdown and plots."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars: quantkit shows its own (read when tqdm loads)
    from quantkit.eval.report import check_report_dir, report_table, write_report
    from quantkit.eval.run import EvalRequest, run_eval

    if seqlen < 2:
        raise QuantkitError(f"--seqlen must be at least 2, got {seqlen}")
    for flag, value in {"--max-windows": max_windows, "--limit": limit, "--batch-size": batch_size}.items():
        if value is not None and value < 1:
            raise QuantkitError(f"{flag} must be positive, got {value}")
    if num_fewshot < 0:
        raise QuantkitError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if kernel is not None:
        from quantkit.runtime.kernels import check_backend

        check_backend(kernel)
    task_names = _split_list(tasks or [])
    datasets = _split_list(ppl) if ppl is not None else ([] if task_names else ["wikitext2"])
    request = EvalRequest(targets, datasets, task_names, seqlen, max_windows, baseline, data_dir, kernel, limit,
                          batch_size, num_fewshot)
    folder = report or Path("quantkit-reports") / f"eval-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    check_report_dir(folder)
    result = run_eval(request)
    console.print(report_table(result))
    written = write_report(result, folder)
    console.print(f"report: {', '.join(str(p) for p in written)}")


@app.command("report")
def render_report(
    source: Annotated[Path, typer.Argument(help="A report.json written by `quantkit eval`.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Directory for the Markdown and plots. Default: the JSON's own directory.")] = None,
) -> None:
    """Render a saved evaluation report again (table, Markdown, plots) without any model."""
    from quantkit.eval.report import check_report_dir, load_report, report_table, write_report

    saved = load_report(source)
    check_report_dir(output or source.parent)
    console.print(report_table(saved))
    written = write_report(saved, output or source.parent)
    console.print(f"report: {', '.join(str(p) for p in written)}")


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
