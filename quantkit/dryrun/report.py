"""The dry run's table and its JSON file."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from quantkit.diskspace import size_text
from quantkit.dryrun.run import DryRun
from quantkit.export.atomic import write_json

SIZE_MARKS = {"exact": "", "at least": "≥ ", "about": "≈ "}
REFUSED = "refused"  # --offload disk cannot make this run (another layout, a plan)


def dry_run_table(result: DryRun) -> Table:
    """Resident run and ``--offload disk`` side by side."""
    table = Table(title=f"dry run: quantizing {result.model} ({result.layout} layout)")
    for column in ("", "resident", "--offload disk"):
        table.add_column(column, justify="left" if not column else "right")
    size = SIZE_MARKS[result.size_basis]
    streamed = result.output_bytes_offload is not None
    table.add_row("peak memory (RSS)", size_text(result.peak_rss_resident),
                  size_text(result.peak_rss_offload) if streamed else REFUSED)
    table.add_row("output on disk", size + size_text(result.output_bytes_resident),
                  size + size_text(result.output_bytes_offload) if streamed else REFUSED)
    table.add_row("work directory at its fullest", "—",
                  size_text(result.work_dir_bytes_offload) if streamed else REFUSED)
    table.add_row("time", _seconds(result.seconds), _seconds(result.seconds) if streamed else REFUSED)
    table.caption = "loads the output: " + (", ".join(result.runtimes) or "no known runtime") + "".join(
        f"\nrefuses: {line}" for line in result.refusals)
    return table


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def write_dry_run(result: DryRun, path: Path) -> None:
    write_json(path, asdict(result))
