"""Running a function right after another library's module is imported, without importing it ourselves.

``import quantkit`` must stay cheap: registering with a library means importing that library's (heavy)
registry, so quantkit registers when the library itself imports it, or at once if it already has. The finder
and loader are plain classes: ``importlib.abc`` alone (with ``typing``) takes longer to import than quantkit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class _Then:
    """A loader: executes a module with the loader of its ``spec``, which it then gives back the module, and
    calls ``callback``."""

    def __init__(self, spec: ModuleSpec, callback: Callable[[], None]) -> None:
        self.loader, self.callback = spec.loader, callback

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # source lines in tracebacks, as before
        self.loader.exec_module(module)
        self.callback()


class _Finder:
    """A meta path finder that finds nothing itself: it gives the spec that the other finders find for module
    ``name`` a :class:`_Then` loader, once."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _Then(spec, self.callback)
                return spec
        return None


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` now if module ``name`` is imported, else right after it is (whoever imports it)."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _Finder) and f.name == name and f.callback == callback for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(name, callback))
