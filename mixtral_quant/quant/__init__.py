"""Quantization methods, "data in, data out": one float weight in, the stored tensors out.

Every method follows the :class:`Method` protocol (quantize, dequantize, tensor_names,
make_module, quantization_config) and is found through :data:`METHODS`, a registry keyed by
:class:`MethodName`. Adding a method is one module and one registry line.

    method = get_method(QuantConfig(MethodName.GPTQ, bits=4, group_size=128))
    result = method.quantize(weight, hessian)  # result.tensors: {"qweight": ..., ...}
    layer = method.make_module(result.tensors, in_features, out_features)
"""

from __future__ import annotations

from collections.abc import Callable

from mixtral_quant.quant.base import Method, MethodName, QuantConfig, QuantResult
from mixtral_quant.quant.gptq import HessianAccumulator, HessianNotPositiveDefinite
from mixtral_quant.quant.gptq_method import GPTQ, RTN
from mixtral_quant.quant.int8 import INT8, W8
from mixtral_quant.quant.nf4 import NF4
from mixtral_quant.quant.q4_k_method import GPTQQ4K

METHODS: dict[MethodName, Callable[[QuantConfig], Method]] = {
    MethodName.NF4: NF4,
    MethodName.INT8: INT8,
    MethodName.W8: W8,
    MethodName.GPTQ: GPTQ,
    MethodName.RTN: RTN,
    MethodName.GPTQ_Q4_K: GPTQQ4K,
}


def get_method(config: QuantConfig) -> Method:
    """The method ``config.method`` names, set up with ``config``."""
    return METHODS[config.method](config)


__all__ = [
    "METHODS",
    "HessianAccumulator",
    "HessianNotPositiveDefinite",
    "Method",
    "MethodName",
    "QuantConfig",
    "QuantResult",
    "get_method",
]
