"""Quantization methods, "data in, data out": one float weight in, the stored tensors out.

Every method follows the :class:`Method` protocol (quantize, dequantize, tensor_names,
make_module, quantization_config and reading it back, the widths it stores, its block form for the
exporters) and is found by its name in the registry. Adding a method is one module and one
:func:`register` call: recipes, loading, evaluation and both exporters then take it.

    method = get_method(QuantConfig.of(MethodName.GPTQ, bits=4, group_size=128))
    result = method.quantize(weight, hessian)  # result.tensors: {"qweight": ..., ...}
    layer = method.make_module(result.tensors, in_features, out_features)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mixtral_quant.errors import ConfigError
from mixtral_quant.quant.awq import AWQ, AWQGPTQ
from mixtral_quant.quant.base import Method, MethodName, QuantConfig, QuantResult, method_class, register, registered
from mixtral_quant.quant.gptq import HessianAccumulator, HessianNotPositiveDefinite
from mixtral_quant.quant.gptq_method import GPTQ, RTN
from mixtral_quant.quant.int8 import INT8, W8
from mixtral_quant.quant.nf4 import NF4
from mixtral_quant.quant.q4_k_method import GPTQQ4K
from mixtral_quant.quant.scheme import Scheme, read_rules

register(MethodName.NF4, NF4)
register(MethodName.INT8, INT8)
register(MethodName.W8, W8)
register(MethodName.GPTQ, GPTQ)
register(MethodName.RTN, RTN)
register(MethodName.GPTQ_Q4_K, GPTQQ4K)
register(MethodName.AWQ, AWQ)
register(MethodName.AWQ_GPTQ, AWQGPTQ)


def get_method(config: QuantConfig) -> Method:
    """The method ``config.method`` names, set up with ``config``."""
    return method_class(config.method_name)(config)


def read_quantization_config(entry: Mapping[str, Any]) -> QuantConfig:
    """The settings of the method that wrote a config.json ``quantization_config`` entry (each method
    reads its own); ConfigError when no method claims it or a field is missing or malformed."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"quantization_config must be a table of settings, got {entry!r}")
    try:
        for method in registered().values():
            config = method.read_config(entry)
            if config is not None:
                return config
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"quantization_config has a missing or malformed field ({type(e).__name__}: {e}): "
                          f"{json.dumps(entry)[:200]}") from None
    raise ConfigError(f"quantization_config {dict(entry)!r} names no method this tool can load "
                      "(gptq, bitsandbytes, w8, gguf-q4_k)")


def read_scheme(entry: Mapping[str, Any]) -> Scheme:
    """:func:`read_quantization_config` and the entry's per-module rules (GPTQModel's ``dynamic``), each
    width checked against the method; ConfigError as there."""
    scheme = Scheme(read_quantization_config(entry), read_rules(entry))
    for rule in scheme.rules:
        if not rule.skip:
            try:
                scheme.base.with_fields(**rule.settings)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"quantization_config dynamic rule {rule.pattern.pattern!r}: {e}") from None
    return scheme


__all__ = [
    "HessianAccumulator",
    "HessianNotPositiveDefinite",
    "Method",
    "MethodName",
    "QuantConfig",
    "QuantResult",
    "Scheme",
    "get_method",
    "read_quantization_config",
    "read_scheme",
    "register",
    "registered",
]
