"""A recipe: a whole quantization pipeline in one validated YAML file, and its merge with command-line flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from quantkit.errors import OptionError, QuantkitError
from quantkit.export.atomic import write_text
from quantkit.recipes.fields import BY_PARAM, DEPENDENTS, FIELDS, OFF, SECTIONS, RecipeField
from quantkit.schemes import SUPPORTED_BITS

HEADER_KEYS = ("name", "description")
SECTION_SWITCHES = {"transform": "transform", "allocation": "allocation", "activations": "act_bits"}


@dataclass
class Recipe:
    """The settings a recipe file names (``param -> value``); unnamed settings take their defaults."""

    values: dict[str, object] = field(default_factory=dict)
    name: str | None = None
    description: str | None = None

    @classmethod
    def from_dict(cls, data: object, where: str) -> Recipe:
        """Validate a parsed recipe; every problem is one line naming ``where``, the field, the value and what
        the field allows."""
        if not isinstance(data, dict):
            raise QuantkitError(f"recipe {where}: expected a mapping of sections "
                                f"({', '.join(SECTIONS)}), got {type(data).__name__}")
        header = {}
        values: dict[str, object] = {}
        for section, body in data.items():
            if section in HEADER_KEYS:
                if not isinstance(body, str):
                    raise QuantkitError(f"recipe {where}: {section} = {body!r} is not allowed; expected a string")
                header[section] = body
                continue
            if section not in SECTIONS:
                raise QuantkitError(f"recipe {where}: unknown section {section!r}; allowed: "
                                    f"{', '.join((*HEADER_KEYS, *SECTIONS))}")
            if body is None:
                continue
            if not isinstance(body, dict):
                raise QuantkitError(f"recipe {where}: section {section} must be a mapping of fields, "
                                    f"got {body!r}")
            for key, value in body.items():
                spec = SECTIONS[section].get(key)
                if spec is None:
                    raise QuantkitError(f"recipe {where}: unknown field {section}.{key}; allowed in {section}: "
                                        f"{', '.join(SECTIONS[section])}")
                if value is not None:
                    values[spec.param] = _checked(spec, value, where)
        return cls(values, header.get("name"), header.get("description"))

    @classmethod
    def load(cls, path: Path) -> Recipe:
        """Read and validate a recipe file."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise QuantkitError(f"recipe {path} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise QuantkitError(f"recipe {path} cannot be read: {exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise QuantkitError(f"recipe {path} is not valid YAML{where}: {problem}") from None
        if data is None:
            raise QuantkitError(f"recipe {path} is empty")
        return cls.from_dict(data, str(path))

    def summary(self) -> str:
        """One line naming the pipeline: transform, method, weights, activations, allocation, calibration, layout."""
        v = {spec.param: self.values.get(spec.param, spec.default) for spec in FIELDS}
        weights = f"{v['number_format']} w{v['bits'] or 4}" + {None: "", -1: " per-channel"}.get(v["group_size"], f" g{v['group_size']}")
        if v["block_rows"] not in (None, 1):
            weights += " all rows" if v["block_rows"] == -1 else f" x{v['block_rows']} rows"
        if v["sym"] is not None:
            weights += " sym" if v["sym"] else " asym"
        parts = [v["transform"], v["method"], weights,
                 f"a{v['act_bits']}" if v["act_bits"] else None,
                 f"allocation {v['allocation']}" if v["allocation"] else None,
                 f"calib {v['calib']} {_windows(v['calib'], v['nsamples'], v['seqlen'])}", f"{v['layout']} layout"]
        return " · ".join(p for p in parts if p)

    def to_dict(self) -> dict:
        """Nested sections in the canonical field order, set fields only."""
        data: dict[str, object] = {k: v for k, v in (("name", self.name), ("description", self.description)) if v}
        for spec in FIELDS:
            if spec.param in self.values:
                data.setdefault(spec.section, {})[spec.key] = self.values[spec.param]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=110)

    def save(self, path: Path) -> None:
        """Write the recipe whole or not at all (see :func:`write_text`)."""
        write_text(path, self.to_yaml())


def _windows(source: str, nsamples: int | None, seqlen: int | None) -> str:
    """``nsamples×seqlen`` of a calibration source, its defaults filling what is not set."""
    from quantkit.calib import default_windows

    default_nsamples, default_seqlen = default_windows(source)
    return f"{nsamples or default_nsamples}×{seqlen or default_seqlen}"


def _checked(spec: RecipeField, value: object, where: str) -> object:
    try:
        return spec.check(value)
    except ValueError:
        raise QuantkitError(f"recipe {where}: {spec.name} = {value!r} is not allowed; allowed: "
                            f"{spec.describe_allowed()}") from None


def _flag_value(spec: RecipeField, value: object) -> object:
    try:
        return spec.check(value)
    except ValueError:
        raise OptionError(f"{spec.flag} {value!r} is not allowed; allowed: {spec.describe_allowed()}") from None


def _replaces_dependents(param: str, flag: object, recipe_value: object) -> bool:
    """Whether a flag's value makes the recipe's fields that depend on this one meaningless."""
    if flag is None or flag == recipe_value:
        return False
    if param == "allocation":  # another strategy keeps the target and choices; a plan or none does not
        return flag == OFF or str(flag).endswith(".json")
    return True


def resolve(recipe: Recipe | None, given: dict[str, object], where: str = "") -> dict[str, object]:
    """Every setting: a flag given on the command line (not None) wins over the recipe, which wins over the
    default. A flag that changes the method, the number format, the transform or the allocation to a plan
    also drops the recipe's fields that belong to the old value (its quantizer options, group size, …), and
    ``none`` switches a recipe's transform or allocation off. Checks the one rule that spans fields: a
    fractional or unsupported ``bits`` needs an allocation."""
    unknown = sorted(set(given) - set(BY_PARAM))
    if unknown:
        raise QuantkitError(f"no recipe field for option {', '.join(unknown)}")
    flags = {param: _flag_value(BY_PARAM[param], value) for param, value in given.items() if value is not None}
    from_recipe = dict(recipe.values) if recipe is not None else {}
    for param, dependents in DEPENDENTS.items():
        if _replaces_dependents(param, flags.get(param), from_recipe.get(param)):
            for dependent in dependents:
                from_recipe.pop(dependent, None)
    settings = {spec.param: flags.get(spec.param, from_recipe.get(spec.param, spec.default)) for spec in FIELDS}
    for switch in ("transform", "allocation"):
        if settings[switch] == OFF:
            settings[switch] = None
    bits = settings["bits"]
    if "bits" not in flags and "bits" in from_recipe and settings["allocation"] is None and bits not in SUPPORTED_BITS:
        spec = BY_PARAM["bits"]
        raise QuantkitError(f"recipe {where}: {spec.name} = {bits!r} is not allowed without allocation.strategy; "
                            f"allowed: {', '.join(map(str, SUPPORTED_BITS))}")
    return settings


def recipe_from_settings(settings: dict[str, object], name: str | None = None,
                         description: str | None = None) -> Recipe:
    """The recipe that reproduces ``settings``: the unset ones are left to their defaults, and a section whose
    switch is off (no transform, no allocation, no activation bits) is left out."""
    values = {p: v for p, v in settings.items()
              if v is not None and settings[SECTION_SWITCHES.get(BY_PARAM[p].section, p)] is not None}
    return Recipe({p: BY_PARAM[p].check(v) for p, v in values.items()}, name, description)
