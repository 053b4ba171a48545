"""Calibration recipes: one TOML file per pipeline in calibration/recipes/.

A recipe declares the method and its settings, the calibration data, how experts get their
statistics, and which components stay 16-bit. Unknown keys and impossible values are errors.

\b
    name = "gptq-w4g128"
    [quant]        method, bits, group_size and the method's own settings (its Options: GPTQ's sym, act_order,
                   static_groups, damp_percent, ...; NF4's nf4_blocksize, double_quant; int8's int8_threshold)
    [calibration]  corpus ("wiki-train", "sotu" or a .txt path), samples, seq_len, seed
    [experts]      policy ("routed" | "all-tokens"), min_token_share, fallback ("rtn" | "all-tokens")
    [keep]         components = ["router", "embeddings", "norms"]   (lm_head counts as embeddings)
    [mixed]        budget_bits (stored bits per expert parameter, scales and zeros included), choices
                   (candidate widths, default [2, 3, 4, 8]), attention_bits (default: [quant] bits);
                   GPTQ, RTN and AWQ: a width per expert linear from its measured error and its
                   expert's share of the tokens (mixtral_quant/mixed.py)
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, get_type_hints

import torch

from .errors import ConfigError
from .paths import BOUNDS as BOUNDS
from .paths import CALIBRATION as CALIBRATION
from .paths import CORPORA, RECIPES, shipped_recipes
from .quant import QuantConfig, get_method, registered
from .quant.base import options_class


class ExpertPolicy(str, Enum):
    ROUTED = "routed"  # each expert's Hessian from the tokens the router sends it
    ALL_TOKENS = "all-tokens"  # every calibration token through every expert (output still routed)


class Fallback(str, Enum):
    RTN = "rtn"  # an expert with too few tokens is rounded to nearest
    ALL_TOKENS = "all-tokens"  # ... or gets its Hessian from every calibration token


QUANTIZABLE = ("attention", "experts")
KEEPABLE = ("router", "embeddings", "norms", "attention", "experts")


@dataclass(frozen=True)
class CalibrationData:
    corpus: str = "wiki-train"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise ConfigError(
                f"calibration needs samples >= 1 and seq_len >= 2, got samples {self.samples}, seq_len {self.seq_len}"
            )

    def path(self) -> Path:
        p = CORPORA / f"{self.corpus}.txt"
        return p if p.is_file() else Path(self.corpus)


@dataclass(frozen=True)
class ExpertCalibration:
    policy: ExpertPolicy = ExpertPolicy.ROUTED
    min_token_share: float = 0.005  # GPTQModel's default cut-off: under 0.5 % of tokens
    fallback: Fallback = Fallback.RTN


MIXED_METHODS = ("gptq", "rtn", "awq", "awq-gptq")  # methods whose widths a [mixed] section may vary


@dataclass(frozen=True)
class MixedPrecision:
    """A width per expert linear under a size budget: ``budget_bits`` stored bits per expert parameter
    (codes, scales, zeros and group indices), chosen among ``choices``; attention at ``attention_bits``
    (None: the recipe's ``bits``)."""

    budget_bits: float
    choices: tuple[int, ...] = (2, 3, 4, 8)
    attention_bits: int | None = None

    def __post_init__(self) -> None:
        if not self.budget_bits > 0:
            raise ConfigError(f"[mixed] budget_bits must be positive, got {self.budget_bits}")
        if not self.choices or len(set(self.choices)) != len(self.choices):
            raise ConfigError(f"[mixed] choices must be different widths, got {list(self.choices)}")


@dataclass(frozen=True)
class Recipe:
    name: str
    quant: QuantConfig
    calibration: CalibrationData = field(default_factory=CalibrationData)
    experts: ExpertCalibration = field(default_factory=ExpertCalibration)
    keep: tuple[str, ...] = ("router", "embeddings", "norms")
    description: str = ""
    mixed: MixedPrecision | None = None

    @property
    def attention_bits(self) -> int:
        """The width of the attention projections."""
        if self.mixed is not None and self.mixed.attention_bits is not None:
            return self.mixed.attention_bits
        return self.quant.bits

    @property
    def needs_calibration(self) -> bool:
        """Whether the method declares it needs each linear's input Hessian (a full calibration set)."""
        return get_method(self.quant).needs_hessian

    def quantizes(self, component: str) -> bool:
        return component in QUANTIZABLE and component not in self.keep

    def to_dict(self) -> dict[str, Any]:
        q = {"method": self.quant.method_name}
        for key, value in self.quant.flat().items():
            q[key] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        mixed = {} if self.mixed is None else {"mixed": {"budget_bits": self.mixed.budget_bits,
                                                         "choices": list(self.mixed.choices),
                                                         "attention_bits": self.attention_bits}}
        return mixed | {
            "name": self.name,
            "description": self.description,
            "quant": q,
            "calibration": asdict(self.calibration),
            "experts": {k: v.value if isinstance(v, Enum) else v for k, v in asdict(self.experts).items()},
            "keep": {"components": list(self.keep)},
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _take(section: Any, allowed: set[str], where: str, of: type | None = None) -> dict[str, Any]:
    """A recipe table with only allowed keys and, when ``of`` is a dataclass, values of its fields' types."""
    if not isinstance(section, dict):
        raise ConfigError(f"[{where}] must be a table, got {section!r}")
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [{where}]; allowed: {sorted(allowed)}")
    if of is not None:
        _check_types(section, get_type_hints(of), where)
    return section


def _check_types(section: dict[str, Any], hints: dict[str, Any], where: str) -> None:
    """TOML values must have the field's type: an int may stand for a float, a bool is not an int."""
    for key, value in section.items():
        want = hints.get(key)
        if want is bool or want is int:
            ok = type(value) is want
        elif want is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        elif want is str or (isinstance(want, type) and issubclass(want, Enum)):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a finite number"}.get(want, "a string")
            raise ConfigError(f"{key} in [{where}] must be {kind}, got {value!r}")


def parse_recipe(d: dict[str, Any], name: str) -> Recipe:
    _take(d, {"name", "description", "quant", "calibration", "experts", "keep", "mixed"}, "recipe")
    for key in ("name", "description"):
        if not isinstance(d.get(key, ""), str):
            raise ConfigError(f"recipe {name}: {key} must be a string, got {d[key]!r}")
    section = d.get("quant", {})
    method = section.get("method") if isinstance(section, dict) else None
    if method is None:
        raise ConfigError(f"recipe {name} has no [quant] method")
    if not isinstance(method, str) or method not in registered():
        raise ConfigError(f"unknown method {method!r} in recipe {name}; use one of {list(registered())}")
    hints = get_type_hints(options_class(method))  # the method's own settings; a TOML scalar each, or not a key
    allowed = {"method", "bits", "group_size"} | {k for k, t in hints.items() if t in (bool, int, float, str)}
    q = dict(_take(section, allowed, "quant"))
    _check_types(q, get_type_hints(QuantConfig) | hints, "quant")
    del q["method"]
    try:
        quant = QuantConfig.for_method(method, **q)
        cal_fields = {f.name for f in fields(CalibrationData)}
        cal = CalibrationData(**_take(d.get("calibration", {}), cal_fields, "calibration", CalibrationData))
        ex_fields = {f.name for f in fields(ExpertCalibration)}
        ex = dict(_take(d.get("experts", {}), ex_fields, "experts", ExpertCalibration))
        if "policy" in ex:
            ex["policy"] = ExpertPolicy(ex["policy"])
        if "fallback" in ex:
            ex["fallback"] = Fallback(ex["fallback"])
        experts = ExpertCalibration(**ex)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"recipe {name}: {e}") from None
    components = _take(d.get("keep", {}), {"components"}, "keep").get("components", ["router", "embeddings", "norms"])
    if not isinstance(components, list) or not all(isinstance(c, str) for c in components):
        raise ConfigError(f"recipe {name}: [keep] components must be a list of names, got {components!r}")
    keep = tuple(components)
    bad = set(keep) - set(KEEPABLE)
    if bad:
        raise ConfigError(f"recipe {name}: cannot keep {sorted(bad)}; components are {list(KEEPABLE)}")
    if not 0 <= experts.min_token_share < 1:
        raise ConfigError(f"recipe {name}: min_token_share must be in [0, 1)")
    mixed = _mixed(d["mixed"], quant, name) if "mixed" in d else None
    return Recipe(str(d.get("name", name)), quant, cal, experts, keep, str(d.get("description", "")), mixed)


def _mixed(section: Any, quant: QuantConfig, name: str) -> MixedPrecision:
    """The [mixed] table: every width one the method stores with the recipe's other settings."""
    t = dict(_take(section, {"budget_bits", "choices", "attention_bits"}, "mixed", MixedPrecision))
    if "budget_bits" not in t:
        raise ConfigError(f"recipe {name}: [mixed] needs budget_bits (stored bits per expert parameter)")
    if quant.method_name not in MIXED_METHODS:
        raise ConfigError(f"recipe {name}: [mixed] works on {', '.join(MIXED_METHODS)} recipes, "
                          f"not {quant.method_name}")
    choices = t.get("choices", list(MixedPrecision.choices))
    if not isinstance(choices, list) or not all(type(b) is int for b in choices):
        raise ConfigError(f"recipe {name}: [mixed] choices must be a list of integer widths, got {choices!r}")
    attention = t.get("attention_bits")
    if attention is not None and type(attention) is not int:
        raise ConfigError(f"recipe {name}: [mixed] attention_bits must be an integer, got {attention!r}")
    for bits in {*choices, *([attention] if attention is not None else [])}:
        quant.with_fields(bits=bits)  # ConfigError naming the widths the method stores
    return MixedPrecision(float(t["budget_bits"]), tuple(sorted(choices)), attention)


def load_recipe(name_or_file: str | Path, **overrides: Any) -> Recipe:
    """A shipped recipe by name (calibration/recipes/NAME.toml) or a TOML file; flags override fields."""
    p = Path(name_or_file)
    if not p.is_file():
        p = RECIPES / f"{name_or_file}.toml"
    if not p.is_file():
        raise ConfigError(f"no recipe {name_or_file!r}: use a file or one of {', '.join(shipped_recipes())}")
    try:
        d = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {p} is not valid TOML ({e})") from None
    except RecursionError:
        raise ConfigError(f"recipe {p} is not a recipe (its TOML is nested too deeply)") from None
    recipe = parse_recipe(d, p.stem)
    quant_over = {k: v for k, v in overrides.items() if v is not None and k in {"bits", "group_size"}}
    cal_over = {k: v for k, v in overrides.items() if v is not None and k in {"samples", "seq_len", "seed", "corpus"}}
    if quant_over:
        try:
            recipe = replace(recipe, quant=recipe.quant.with_fields(**quant_over))
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
    if cal_over:
        recipe = replace(recipe, calibration=replace(recipe.calibration, **cal_over))
    return recipe
