"""A terminal heat map of bit widths: one row per decoder block, one column per linear."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rich.table import Table

_BLOCK_LAYER = re.compile(r"^(?P<prefix>.+?)\.(?P<block>\d+)\.(?P<linear>.+)$")
# Background per width: fewer bits, warmer colour.
_COLOURS = {2: "red3", 3: "dark_orange", 4: "green4", 8: "dodger_blue2"}


def _cell(bits: int | None) -> str:
    if bits is None:
        return ""
    return f"[bold white on {_COLOURS.get(bits, 'grey35')}] {bits} [/]"


def bits_heatmap(layer_bits: dict[str, int], title: str = "bits per linear", order: Sequence[str] = ()) -> Table:
    """Rows: blocks (then any layer outside a numbered block); columns: the linears named in ``order`` (names
    relative to the block), then any other in first-seen order."""
    rows: dict[str, dict[str, int]] = {}
    columns: list[str] = [name for name in order if any(layer.endswith(f".{name}") for layer in layer_bits)]
    for layer, bits in layer_bits.items():
        match = _BLOCK_LAYER.match(layer)
        row, column = (match["block"], match["linear"]) if match else ("other", layer)
        if column not in columns:
            columns.append(column)
        rows.setdefault(row, {})[column] = bits
    table = Table(title=title)
    table.add_column("block", justify="right")
    for column in columns:
        table.add_column(column.split(".")[-1], justify="center")
    for row, cells in sorted(rows.items(), key=lambda item: (not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0)):
        table.add_row(row, *(_cell(cells.get(column)) for column in columns))
    return table
