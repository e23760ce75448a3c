"""Typed reads of JSON config fields: a checkpoint's config must say ``4``, not ``"4"``, ``4.5`` or ``true``.

Python's ``int()`` and ``bool()`` accept all of those (``bool("no")`` is True), so every format's reader checks
a field's JSON type here instead: an integer is a JSON integer (not a boolean, not ``4.0``), a number any finite
JSON number, a boolean ``true`` or ``false``, a string a JSON string, a list a JSON array, a dict an object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

_REQUIRED = object()
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "an object"}


def check_type(value: object, kind: type, what: str) -> Any:
    """``value`` when it is a JSON value of ``kind`` (``int``, ``float``, ``bool``, ``str``, ``list`` or ``dict``),
    else a one-line error naming ``what``."""
    if kind is int:
        fits = type(value) is int
    elif kind is float:
        fits = type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
    else:
        fits = type(value) is kind
    if not fits:
        raise QuantkitError(f"{what} is {value!r}, expected {_KINDS[kind]}")
    return float(value) if kind is float else value  # type: ignore[arg-type]


def field(entry: Mapping, key: str, kind: type, default: object = _REQUIRED) -> Any:
    """``entry[key]`` checked by :func:`check_type`; an absent key gives ``default`` (an error without one)."""
    if key not in entry:
        if default is _REQUIRED:
            raise QuantkitError(f"{key} is missing")
        return default
    return check_type(entry[key], kind, key)


def optional_field(entry: Mapping, key: str, kind: type, default: object) -> Any:
    """Like :func:`field`, with ``null`` meaning the default too (formats that write ``"group_size": null``)."""
    return default if entry.get(key) is None else field(entry, key, kind)


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (``what`` names it in errors); unreadable, malformed or not an object is one
    line naming the folder."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise QuantkitError(f"cannot read {what} in {path.parent}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise QuantkitError(f"corrupt {what} in {path.parent}: {exc}") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"corrupt {what} in {path.parent}: not a JSON object")
    return data
