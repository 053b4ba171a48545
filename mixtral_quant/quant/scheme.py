"""The quantization of a whole artifact: one method's settings, and the widths of the modules that differ.

A mixed-precision artifact (a ``[mixed]`` recipe) stores each linear at its own width. Its
``quantization_config`` is the method's entry (``bits``: the attention's width) with GPTQModel's
per-module override ``dynamic``: a regular expression over the module's name (``+:`` or no prefix:
the settings apply; ``-:``: the module is not quantized) mapped to the settings that replace the
entry's, e.g. ``{"+:^model\\.layers\\.0\\.block_sparse_moe\\.experts\\.3\\.w1$": {"bits": 2}}``. The
first rule that matches (``re.match``) decides, as in GPTQModel's ``dynamic_get``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mixtral_quant.errors import ConfigError
from mixtral_quant.quant.base import Method, QuantConfig, method_class

OVERRIDABLE = ("bits", "group_size")  # the settings a rule may replace


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    skip: bool  # "-:": the module stays float
    settings: Mapping[str, Any]


@dataclass
class Scheme:
    """The base settings and the per-module rules of one artifact."""

    base: QuantConfig
    rules: tuple[Rule, ...] = ()
    _configs: dict[int, QuantConfig | None] = field(default_factory=dict, repr=False)  # rule index -> settings
    _methods: dict[QuantConfig, Method] = field(default_factory=dict, repr=False)

    @property
    def mixed(self) -> bool:
        return bool(self.rules)

    def config_for(self, module: str) -> QuantConfig | None:
        """The settings of the linear ``module`` (a full name, ``model.layers.0.self_attn.q_proj``);
        None when a rule leaves it float. Each rule's settings are built once."""
        for k, rule in enumerate(self.rules):
            if rule.pattern.match(module):
                if k not in self._configs:
                    self._configs[k] = None if rule.skip else self.base.with_fields(**rule.settings)
                return self._configs[k]
        return self.base

    def method_for(self, module: str) -> Method | None:
        """The method set up for ``module`` (one instance per distinct setting)."""
        config = self.config_for(module)
        if config is None:
            return None
        if config not in self._methods:
            self._methods[config] = method_class(config.method_name)(config)
        return self._methods[config]


def read_rules(entry: Mapping[str, Any]) -> tuple[Rule, ...]:
    """GPTQModel's ``dynamic`` of a quantization_config entry, checked (ConfigError)."""
    dynamic = entry.get("dynamic") or {}
    if not isinstance(dynamic, Mapping):
        raise ConfigError(f"quantization_config dynamic must be a table of rules, got {dynamic!r}")
    rules = []
    for key, settings in dynamic.items():
        skip = key.startswith("-:")
        pattern = key[2:] if key.startswith(("+:", "-:")) else key
        try:
            compiled = re.compile(pattern)  # once: a Mixtral-8x7B artifact may hold hundreds of rules
        except re.error as e:
            raise ConfigError(f"quantization_config dynamic rule {key!r} is not a regular expression ({e})") from None
        if not isinstance(settings, Mapping) or set(settings) - set(OVERRIDABLE):
            raise ConfigError(f"quantization_config dynamic rule {key!r}: only {', '.join(OVERRIDABLE)} may "
                              f"change per module, got {settings!r}")  # fmt: skip
        rules.append(Rule(compiled, skip, dict(settings)))
    return tuple(rules)


def dynamic_entry(base: QuantConfig, widths: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """``dynamic`` rules, one per module whose width differs from ``base.bits``, exact names."""
    return {f"+:^{re.escape(name)}$": {"bits": bits} for name, bits in sorted(widths.items()) if bits != base.bits}
