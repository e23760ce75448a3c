"""docs/BAD_INPUTS.md is the table of bad inputs tried: every row names a test that exists and repeats it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<input>.+?) \| (?P<outcome>.+?) \| `(?P<file>test_\w+\.py)::(?P<test>test_\w+)` \|$")


def _rows() -> list[re.Match]:
    lines = (ROOT / "docs" / "BAD_INPUTS.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| Input |")]
    rows = [ROW.match(line) for line in table]
    assert all(rows), [line for line, row in zip(table, rows) if row is None]  # every table row names its test
    return rows


def _test_names(file: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / file).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_row_names_a_test_that_exists() -> None:
    rows = _rows()
    assert len(rows) >= 60
    missing = [f"{row['file']}::{row['test']}" for row in rows if row["test"] not in _test_names(row["file"])]
    assert missing == []
