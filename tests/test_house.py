"""The house's walls: serving imports nothing of quantization, packages import each other without cycles, and
the kernels import nothing of quantkit but its formats."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.api import quantize
from quantkit.schemes import QuantScheme
from quantkit.transforms import make_transform

REPO = Path(__file__).resolve().parents[1]
# what quantizing needs and serving must never import
QUANTIZATION = ("quantkit.quantizers", "quantkit.transforms", "quantkit.engine", "quantkit.allocation",
                "quantkit.calib", "quantkit.hessian", "quantkit.lockstep", "quantkit.api", "quantkit.recipes",
                "quantkit.streaming")


@pytest.fixture(scope="module")
def served_checkpoints(tiny_model_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """An integer W4A4 checkpoint with online Hadamard input maps, an SpQR one and an NVFP4 one."""
    from quantkit.api import CalibrationSpec

    root = tmp_path_factory.mktemp("served")
    calibration = CalibrationSpec(str(calib_file), nsamples=2, seqlen=16)
    runs = {
        "w4a4-hadamard": {"method": "rtn", "scheme": QuantScheme(4, 16), "act_scheme": QuantScheme(4, -1),
                          "transform": make_transform("hadamard")},
        "spqr": {"method": "spqr", "scheme": QuantScheme(3, 16, False), "calibration": calibration},
        "nvfp4": {"method": "rtn", "scheme": QuantScheme(4, 16, format="nvfp4")},
    }
    for name, arguments in runs.items():
        quantize(str(tiny_model_dir), output=root / name, **arguments)
    return [root / name for name in runs]


def test_loading_and_running_a_checkpoint_imports_nothing_of_quantization(served_checkpoints: list[Path]) -> None:
    script = (
        "import json, sys, torch, quantkit\n"
        f"for path in {[str(p) for p in served_checkpoints]!r}:\n"
        "    with torch.no_grad():\n"
        "        quantkit.load(path)(torch.arange(8).reshape(1, 8))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('quantkit'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    assert "quantkit.runtime.loader" in loaded
    assert [m for m in loaded if m.startswith(QUANTIZATION)] == []


def _imports(path: Path) -> list[str]:
    """Every quantkit module ``path`` imports, at the top or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)  # ``from quantkit import defaults``
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [name for name in names if name.split(".")[0] in ("quantkit", "quantkit_kernels")]


def _package(module: str) -> str:
    """The room a module belongs to: ``quantkit.X`` (a subpackage or a top-level module), or the kernels."""
    parts = module.split(".")
    return parts[0] if parts[0] == "quantkit_kernels" else ".".join(parts[:2])


def _module_files() -> dict[str, Path]:
    files = {}
    for base in (REPO, REPO / "kernels"):
        for top in ("quantkit", "quantkit_kernels"):
            for path in (base / top).rglob("*.py") if (base / top).is_dir() else ():
                files[".".join(path.relative_to(base).with_suffix("").parts).removesuffix(".__init__")] = path
    return files


def package_graph() -> dict[str, set[str]]:
    """Which package imports which (edges between distinct packages only; the ``quantkit`` root is a facade)."""
    graph: dict[str, set[str]] = {}
    files = _module_files()
    for module, path in files.items():
        for target in _imports(path):
            if target not in files and target.rpartition(".")[0] in files:
                continue  # a name imported from a module, not a module
            source, dest = _package(module), _package(target)
            if source != dest and dest != "quantkit":
                graph.setdefault(source, set()).add(dest)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one package (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                found.append(sorted([node, *group]))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}}) == []


def test_packages_import_each_other_without_cycles() -> None:
    graph = package_graph()
    assert "quantkit.runtime" in graph and "quantkit.formats" in graph["quantkit.runtime"]  # the walk sees imports
    assert cycles(graph) == []


def test_kernels_import_only_quantkit_formats() -> None:
    outside = sorted({target for module, path in _module_files().items() if module.startswith("quantkit_kernels")
                      for target in _imports(path)
                      if not target.startswith(("quantkit_kernels", "quantkit.formats"))})
    assert outside == []
