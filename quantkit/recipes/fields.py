"""The fields of a recipe: where each sits in the YAML file, which ``quantize`` option it mirrors, what it allows."""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantkit import defaults
from quantkit.actquant import ACT_BITS, OBSERVERS, STATIC_FORMATS
from quantkit.actquant import GRANULARITIES as ACT_GRANULARITIES
from quantkit.allocation.options import SCORES, STRATEGIES
from quantkit.allocation.units import GRANULARITIES
from quantkit.head import HEAD_FORMATS
from quantkit.kvcache import KV_GRANULARITIES
from quantkit.quantizers import QUANTIZERS
from quantkit.schemes import CHECKPOINT_LAYOUTS, SUPPORTED_BITS, SUPPORTED_FORMATS, UNQUANTIZED_DTYPES
from quantkit.transforms import SEPARATOR, TRANSFORMS


@dataclass(frozen=True)
class RecipeField:
    """One setting: ``section.key`` in a recipe, the ``--param`` option on the command line."""

    section: str
    key: str
    param: str
    kind: str  # "int", "float", "bool", "str" or "int_list"
    allowed: tuple = ()  # the only values a "str" (or "int") field takes; empty: any
    minimum: float | None = None
    default: object = None  # the value when neither the recipe nor the command line sets it
    maximum: float | None = None
    also: tuple = ()  # values allowed besides the range (group size -1, "none" for a section switch)
    infinite: bool = False  # a "float" field that also takes inf
    suffix: str = ""  # a "str" field also takes a file name with this suffix (an allocation plan)
    joined: str = ""  # a "str" field also takes several allowed values joined by this (composed transforms)
    note: str = ""  # what else is allowed, for the error message
    option: str = ""  # the command-line flag, when it is not ``--param``

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def flag(self) -> str:
        return self.option or "--" + self.param.replace("_", "-")

    def describe_allowed(self) -> str:
        """What this field accepts, in words."""
        if self.allowed:
            text = ", ".join(map(str, self.allowed))
            text += f", or a {self.suffix} file" if self.suffix else ""
            text += f", or several joined by {self.joined}" if self.joined else ""
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "int_list":
            text = "a list of integers"
        else:
            noun = {"int": "an integer", "float": "a finite number", "str": "a string"}[self.kind]
            text = noun + (f" ≥ {_shown(self.minimum)}" if self.minimum is not None else "")
            text += f" and ≤ {_shown(self.maximum)}" if self.maximum is not None else ""
        return text + (f" ({self.note})" if self.note else "")

    def check(self, value: object) -> object:
        """``value`` normalised (whole numbers as ints), or ValueError when this field does not allow it."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if self.kind == "int_list":
            if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
                raise ValueError
            return [int(v) for v in value]
        if self.kind == "str":
            if not isinstance(value, str) or not value.strip():
                raise ValueError
            if value in self.also:
                return value
            parts = value.split(self.joined) if self.joined else [value]
            if self.allowed and any(part not in self.allowed for part in parts) and not (
                    self.suffix and value.endswith(self.suffix)):
                raise ValueError
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError
        if math.isinf(value) and not self.infinite:
            raise ValueError
        if self.kind == "int" and not _is_int(value):
            raise ValueError
        if value in self.also:
            return int(value)
        if (self.allowed and value not in self.allowed) or (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum):
            raise ValueError
        return int(value) if _is_int(value) else value


def _shown(value: float) -> str:
    return str(int(value)) if _is_int(value) else f"{value:g}"


def _is_int(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value) and value == int(value))


OFF = "none"  # the value that switches off a recipe's transform or allocation from the command line
FIELDS: tuple[RecipeField, ...] = (
    RecipeField("quantizer", "method", "method", "str", allowed=tuple(QUANTIZERS), default=defaults.METHOD),
    RecipeField("quantizer", "act_order", "act_order", "bool"),
    RecipeField("quantizer", "static_groups", "static_groups", "bool"),
    RecipeField("quantizer", "g_idx", "g_idx", "bool"),
    RecipeField("quantizer", "true_sequential", "true_sequential", "bool", default=defaults.TRUE_SEQUENTIAL),
    RecipeField("quantizer", "damp", "damp", "float", minimum=0.0),
    RecipeField("quantizer", "mse", "mse", "bool"),
    RecipeField("quantizer", "outlier_threshold", "outlier_threshold", "float", minimum=0.0, infinite=True,
                note="inf keeps no outliers"),
    RecipeField("quantizer", "simplified_outliers", "simplified_outliers", "bool"),
    RecipeField("quantizer", "stat_bits", "stat_bits", "int", minimum=1),
    RecipeField("quantizer", "stat_group_size", "stat_group_size", "int", minimum=1),
    RecipeField("weights", "bits", "bits", "float", minimum=1.0,
           note=f"{', '.join(map(str, SUPPORTED_BITS))}; with allocation, the average bits per weight, e.g. 3.5"),
    RecipeField("weights", "format", "number_format", "str", allowed=SUPPORTED_FORMATS, default=defaults.NUMBER_FORMAT,
                note="gptq and compressed-tensors are checkpoint layouts: --layout, export.layout", option="--format"),
    RecipeField("weights", "group_size", "group_size", "int", minimum=1, also=(-1,),
           note="or -1 for one group per output channel"),
    RecipeField("weights", "block_rows", "block_rows", "int", minimum=1, also=(-1,),
                note="fp8: output rows sharing a scale, or -1 for all (per tensor with group_size -1)"),
    RecipeField("weights", "sym", "sym", "bool"),
    RecipeField("activations", "bits", "act_bits", "int", allowed=ACT_BITS),
    RecipeField("activations", "format", "act_format", "str", allowed=SUPPORTED_FORMATS),
    RecipeField("activations", "group_size", "act_group_size", "int", minimum=1, also=(-1,),
                note="or -1 for one scale per token"),
    RecipeField("activations", "static", "act_static", "bool", note="calibrated static scales instead of per token"),
    RecipeField("activations", "granularity", "act_granularity", "str", allowed=ACT_GRANULARITIES),
    RecipeField("activations", "observer", "act_observer", "str", allowed=OBSERVERS),
    RecipeField("activations", "percentile", "act_percentile", "float", minimum=0.0, maximum=100.0),
    RecipeField("weights", "head", "quantize_head", "str", allowed=HEAD_FORMATS,
                note="the output head, round-to-nearest; default: kept in float"),
    RecipeField("kv_cache", "format", "kv_format", "str", allowed=STATIC_FORMATS, note="8-bit keys and values"),
    RecipeField("kv_cache", "granularity", "kv_granularity", "str", allowed=KV_GRANULARITIES),
    RecipeField("calibration", "source", "calib", "str", default=defaults.CALIBRATION,
           note="c4, wikitext2, synthetic, self, chat:FILE, or a local file or directory"),
    RecipeField("calibration", "nsamples", "nsamples", "int", minimum=1),  # default: the source's
    RecipeField("calibration", "seqlen", "seqlen", "int", minimum=2),
    RecipeField("calibration", "seed", "seed", "int", minimum=0, maximum=2**32 - 1, default=defaults.SEED),
    RecipeField("calibration", "data_dir", "data_dir", "str"),
    RecipeField("calibration", "forward_dtype", "forward_dtype", "str", allowed=defaults.FORWARD_DTYPES,
                default=defaults.FORWARD_DTYPE),
    RecipeField("calibration", "expert_min_tokens", "expert_min_tokens", "int", minimum=0,
                default=defaults.EXPERT_MIN_TOKENS, note="a routed expert given fewer tokens is starved"),
    RecipeField("transform", "name", "transform", "str", allowed=tuple(TRANSFORMS), also=(OFF,), joined=SEPARATOR,
                note="none: no transform, over a recipe's"),
    RecipeField("transform", "budget", "transform_budget", "str", allowed=("cpu", "paper"), default="cpu"),
    RecipeField("transform", "nsamples", "transform_nsamples", "int", minimum=1),
    RecipeField("transform", "seqlen", "transform_seqlen", "int", minimum=1),
    RecipeField("transform", "epochs", "transform_epochs", "int", minimum=1),
    RecipeField("transform", "batch_size", "transform_batch_size", "int", minimum=1),
    RecipeField("transform", "alpha", "transform_alpha", "float", minimum=0.0, maximum=1.0,
                note="SmoothQuant's migration strength"),
    RecipeField("allocation", "strategy", "allocation", "str", allowed=STRATEGIES, suffix=".json", also=(OFF,),
                note="none: one width everywhere, over a recipe's"),
    RecipeField("allocation", "bit_choices", "bit_choices", "int_list"),
    RecipeField("allocation", "score", "score", "str", allowed=SCORES),
    RecipeField("allocation", "granularity", "granularity", "str", allowed=GRANULARITIES),
    RecipeField("allocation", "search_generations", "search_generations", "int", minimum=0),
    RecipeField("allocation", "search_offspring", "search_offspring", "int", minimum=1),
    RecipeField("export", "layout", "layout", "str", allowed=CHECKPOINT_LAYOUTS, default=defaults.LAYOUT),
    RecipeField("export", "dtype", "dtype", "str", allowed=UNQUANTIZED_DTYPES, default=defaults.DTYPE),
)
BY_PARAM: dict[str, RecipeField] = {f.param: f for f in FIELDS}
SECTIONS: dict[str, dict[str, RecipeField]] = {}
for _f in FIELDS:
    SECTIONS.setdefault(_f.section, {})[_f.key] = _f

QUANTIZER_OPTIONS = ("damp", "act_order", "static_groups", "g_idx", "mse", "outlier_threshold", "simplified_outliers",
                     "stat_bits", "stat_group_size")
TRANSFORM_BUDGET_OPTIONS = ("transform_nsamples", "transform_seqlen", "transform_epochs", "transform_batch_size")
TRANSFORM_OPTIONS = ("transform_budget", *TRANSFORM_BUDGET_OPTIONS, "transform_alpha")
ALLOCATION_OPTIONS = ("bit_choices", "score", "granularity", "search_generations", "search_offspring")
# A flag that changes one of these replaces the recipe's fields that only make sense with the recipe's value.
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "method": QUANTIZER_OPTIONS,
    "number_format": ("bits", "group_size", "block_rows", "sym"),
    "transform": TRANSFORM_OPTIONS,
    "allocation": ("bits", *ALLOCATION_OPTIONS),
}
