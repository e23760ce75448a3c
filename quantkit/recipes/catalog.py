"""The recipes that ship with quantkit, found by name or path."""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.recipes.recipe import Recipe

RECIPES_ENV = "QUANTKIT_RECIPES"
SUFFIXES = (".yaml", ".yml")


def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: ``$QUANTKIT_RECIPES``, the source checkout's ``recipes/`` (next to its
    ``pyproject.toml``), and the copy a wheel installs under ``<prefix>/share/quantkit/recipes`` (the user base
    for ``pip install --user``)."""
    checkout = Path(__file__).resolve().parents[2]
    candidates = [os.environ.get(RECIPES_ENV), checkout / "recipes" if (checkout / "pyproject.toml").is_file() else None,
                  *(Path(base) / "share" / "quantkit" / "recipes" for base in (sys.prefix, site.USER_BASE))]
    dirs: list[Path] = []
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and Path(candidate).resolve() not in dirs:
            dirs.append(Path(candidate).resolve())
    return dirs


def shipped_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> file; the first directory that has a name wins."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.iterdir()):
            if path.suffix in SUFFIXES:
                found.setdefault(path.stem, path)
    return found


def find_recipe(spec: str) -> Path:
    """A recipe file named by path, or by the name of a shipped recipe."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix in SUFFIXES or len(path.parts) > 1:
        raise QuantkitError(f"recipe {spec} not found")
    shipped = shipped_recipes()
    if spec in shipped:
        return shipped[spec]
    raise QuantkitError(f"no recipe named {spec!r}; shipped: {', '.join(shipped) or 'none'} "
                        "(or give a path to a .yaml file)")


def load_recipe(spec: str) -> Recipe:
    return Recipe.load(find_recipe(spec))
