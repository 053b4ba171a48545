"""What every quantization method shares: its name, its settings, its output, its protocol, the registry.

A method is "data in, data out": it takes one float weight ``[out, in]`` (and, for GPTQ, the
layer's input Hessian ``[in, in]``) and returns the tensors stored for that linear layer on disk,
named relative to the module prefix. It knows nothing about files, models or calibration loops.
A method is known by the name it is registered under (:func:`register`; the built-in ones in
``mixtral_quant.quant``, one line each): recipes, settings and loading find it there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Protocol

import torch
from torch import nn

from mixtral_quant.errors import ConfigError, MixtralQuantError


class MethodName(str, Enum):
    NF4 = "nf4"  # bitsandbytes NF4 (QLoRA), blockwise absmax, optional double quantization
    INT8 = "int8"  # bitsandbytes LLM.int8(): int8 rows, absmax per output row, outlier matmul
    W8 = "w8"  # weight-only symmetric int8, one scale per output channel
    GPTQ = "gptq"  # GPTQ (Frantar et al. 2022), stored in the GPTQ v1 checkpoint layout
    RTN = "rtn"  # round-to-nearest in the GPTQ layout: GPTQ's baseline and its fallback
    GPTQ_Q4_K = "gptq-q4_k"  # GPTQ onto llama.cpp's Q4_K grid, stored as its block_q4_K bytes
    AWQ = "awq"  # AWQ (Lin et al. 2023): scales folded into the model, clipped round-to-nearest, GPTQ layout
    AWQ_GPTQ = "awq-gptq"  # AWQ's scales, then GPTQ, GPTQ layout


_REGISTRY: dict[str, type[Method]] = {}


def name_of(method: MethodName | str) -> str:
    """The registered name of a method given as a MethodName or by name."""
    return method.value if isinstance(method, MethodName) else str(method)


def register(name: MethodName | str, method: type[Method]) -> None:
    """Make ``method`` the method called ``name`` (a recipe's ``[quant] method``, ``QuantConfig.method``)."""
    _REGISTRY[name_of(name)] = method


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; ConfigError naming the registered ones when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def registered() -> dict[str, type[Method]]:
    """Every registered method by name, in registration order."""
    return dict(_REGISTRY)


GROUP_QUANTUM = 32  # group sizes are multiples of this (whole 3-bit packing runs)
# Codes per packing run (see packing.LAYOUTS): the packed dimension must be a multiple.
PACK_RUN = {2: 16, 3: 32, 4: 8, 8: 4}
ROW_BAND = 1024  # rows widened to float32 at a time by banded quantize, dequantize, error check (x 32)


@dataclass(frozen=True)
class NoOptions:
    """The settings of a method that has none beyond its width and group size."""


@dataclass(frozen=True)
class QuantConfig:
    """One quantization method and its settings; validated on construction (ConfigError).

    Every method has a width and a group size; what else it reads is its own settings dataclass,
    ``options``, an instance of the method's ``Options`` (None: the method's defaults). Build one from
    flat fields, as a recipe's ``[quant]`` table gives them, with :meth:`of`.
    """

    method: MethodName | str  # a MethodName for the built-in methods, the registered name otherwise
    bits: int = 4
    group_size: int = 128  # -1: one group spanning the whole input row
    options: Any = None  # the method's Options instance

    def __post_init__(self) -> None:
        method = method_class(self.method_name)
        if self.method_name in MethodName._value2member_map_:
            object.__setattr__(self, "method", MethodName(self.method_name))
        options = options_class(self.method_name)
        if self.options is None:
            object.__setattr__(self, "options", options())
        elif type(self.options) is not options:
            raise ConfigError(f"{self.method_name} takes {options.__name__} settings, "
                              f"not {type(self.options).__name__}")  # fmt: skip
        if self.bits not in method.allowed_bits:
            raise ConfigError(f"{self.method_name} cannot store {self.bits}-bit weights: bits must be one of "
                              f"{sorted(method.allowed_bits)}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % GROUP_QUANTUM):
            raise ConfigError(
                f"group_size {self.group_size} is invalid: use -1 or a positive multiple of {GROUP_QUANTUM}"
            )
        check = getattr(method, "check_config", None)
        if check is not None:
            check(self)

    @property
    def method_name(self) -> str:
        """The name the method is registered under (``"gptq"``, ...)."""
        return name_of(self.method)

    @classmethod
    def of(cls, method: MethodName | str, **fields: Any) -> QuantConfig:
        """A config from flat fields: ``bits``, ``group_size`` and the names of the method's own settings
        (ConfigError for a name the method does not have)."""
        names = option_names(method)
        unknown = sorted(set(fields) - names - {"bits", "group_size"})
        if unknown:
            raise ConfigError(f"{name_of(method)} has no setting {', '.join(unknown)}: its settings are "
                              f"{', '.join(['bits', 'group_size', *sorted(names)])}")  # fmt: skip
        options = options_class(method)(**{k: v for k, v in fields.items() if k in names})
        common = {k: v for k, v in fields.items() if k in ("bits", "group_size")}
        return cls(method, options=options, **common)

    @classmethod
    def for_method(cls, method: MethodName | str, **fields: Any) -> QuantConfig:
        """:meth:`of` with the method's native bit width (8 for int8/w8, 4 otherwise) unless given."""
        fields.setdefault("bits", method_class(name_of(method)).native_bits)
        return cls.of(method, **fields)

    def flat(self) -> dict[str, Any]:
        """``bits``, ``group_size`` and the method's own settings, by name (the inverse of :meth:`of`)."""
        return {"bits": self.bits, "group_size": self.group_size, **asdict(self.options)}

    def with_fields(self, **fields: Any) -> QuantConfig:
        """This config with some flat fields replaced."""
        return QuantConfig.of(self.method, **(self.flat() | fields))

    def group_size_for(self, in_features: int) -> int:
        """The effective group size for a layer (``in_features`` when group_size is -1)."""
        return in_features if self.group_size == -1 else self.group_size

    def validate_shape(self, in_features: int, out_features: int) -> None:
        """ConfigError when a ``[out_features, in_features]`` weight cannot be stored this way."""
        if in_features <= 0 or out_features <= 0:
            raise ConfigError(f"cannot quantize a weight of shape [{out_features}, {in_features}]")
        check = getattr(method_class(self.method_name), "check_shape", None)
        if check is not None:
            check(self, in_features, out_features)


def options_class(method: MethodName | str) -> type:
    """A method's settings dataclass (its ``Options``; :class:`NoOptions` when it declares none)."""
    options: type = getattr(method_class(name_of(method)), "Options", NoOptions)
    return options


def option_names(method: MethodName | str) -> set[str]:
    """The names of a method's own settings (its Options' fields)."""
    return {f.name for f in fields(options_class(method))}


@dataclass
class QuantResult:
    """One quantized linear layer: stored tensors (names relative to the module prefix) and notes."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, float | int | str] = field(default_factory=dict)


class Method(Protocol):
    """A quantization method: quantize, dequantize, and rebuild a runtime linear layer.

    Two optional methods keep the calibration driver's working set to a band of rows: a method that
    has ``quantize_widened(weight, hessian)`` (the result of ``quantize(weight.float(), hessian)``
    without a whole float32 copy) is given the weight as stored, and one that has
    ``dequantize_rows(tensors, start, stop)`` (rows of :meth:`dequantize`) has its error measured a
    band at a time.

    A class attribute ``Options``, the method's settings dataclass, says what a recipe's ``[quant]`` table
    may set beside ``bits`` and ``group_size``, each field with its default, checked when it is made
    (a method without one has :class:`NoOptions`).

    Two optional static methods refine :class:`QuantConfig`'s checks: ``check_config(config)`` and
    ``check_shape(config, in_features, out_features)`` raise ConfigError for settings or weight shapes
    the method cannot store.

    A method whose stored grid is integer codes times a scale less an integer zero per block of inputs
    says so with ``block_form(tensors, in_features)`` (a :class:`~mixtral_quant.quant.block_form.BlockQuant`
    equal to :meth:`dequantize`, or None for a linear whose grid has no such form) and
    ``block_signature(tensors, in_features)`` (its width and block sizes, read without the codes): the
    exporters then write its codes as they are (MatMulNBits, QMoE, GGUF Q4_0/Q8_0). Two more forms are
    optional in the same way: ``bnb4_form(tensors)`` (bitsandbytes 4-bit codes and absmax, for
    MatMulBnb4) and ``gguf_rows(tensors)`` (a GGML type name and the rows of a GGUF tensor of that type,
    for a method that stores llama.cpp's blocks itself)."""

    config: QuantConfig
    needs_hessian: bool
    allowed_bits: frozenset[int]  # the widths it can store
    native_bits: int  # the width a recipe gets when it names none
    # Files beside config.json that repeat its quantization_config (GPTQModel reads quantize_config.json).
    config_files: tuple[str, ...]

    def __init__(self, config: QuantConfig) -> None: ...

    @staticmethod
    def read_config(entry: Mapping[str, Any]) -> QuantConfig | None:
        """The settings a config.json ``quantization_config`` entry this method writes describes; None
        when the entry is another method's. Malformed fields raise KeyError, TypeError or ValueError."""
        ...

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        """``weight`` float ``[out, in]``; ``hessian`` float32 ``[in, in]`` (None unless needs_hessian)."""
        ...

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weight the stored tensors represent, float32 ``[out, in]``, on their device."""
        ...

    def tensor_names(self) -> list[str]:
        """The names :meth:`quantize` stores, for strict loading."""
        ...

    def make_module(self, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int) -> nn.Module:
        """A bias-free linear layer running on the stored tensors: ``x[..., in] -> x.dtype [..., out]``."""
        ...

    def quantization_config(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json for a model stored this way."""
        ...


def entry_int(entry: Mapping[str, Any], key: str, default: int | None = None) -> int:
    """An integer field of a quantization_config entry (ValueError unless an int, bool excluded)."""
    v = entry[key] if default is None else entry.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{key} must be an integer, got {v!r}")
    return v


def entry_bool(entry: Mapping[str, Any], key: str, default: bool) -> bool:
    """A true/false field of a quantization_config entry (ValueError unless a bool)."""
    v = entry.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


def check_weight(weight: torch.Tensor, config: QuantConfig) -> tuple[int, int]:
    """(out_features, in_features) of a 2-D finite float weight this config can store."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ConfigError(f"expected a 2-D float weight [out, in], got {weight.dtype} {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    config.validate_shape(in_features, out_features)
    # A finite sum means every element is finite (NaN and inf propagate); 20x cheaper than isfinite().all()
    # on a large weight. A sum that overflows is settled element by element.
    if not bool(weight.sum(dtype=torch.float32).isfinite()) and not bool(torch.isfinite(weight).all()):
        raise MixtralQuantError(f"weight [{out_features}, {in_features}] holds NaN or inf: check the checkpoint")
    return out_features, in_features
