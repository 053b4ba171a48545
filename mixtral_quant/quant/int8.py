"""8-bit weights: bitsandbytes LLM.int8() (INT8) and weight-only per-channel int8 (W8).

INT8 (Dettmers et al., "LLM.int8()", 2022) stores what ``Linear8bitLt`` saves: ``weight`` int8
``[out, in]`` from ``int8_vectorwise_quant`` on the fp16 weight, ``SCB`` float32 ``[out]`` (the
row absmax; ``W = weight * SCB / 127``) and ``weight_format`` uint8 scalar 0 ("row"). At run
time activations are quantized to int8 per row, except input columns holding a value above
``int8_threshold``, which are multiplied in fp16 (the outlier decomposition).

W8 is weight-only: ``weight`` int8 ``[out, in]`` in [-127, 127] and ``weight_scale`` float16
``[out]`` with ``W = weight * weight_scale``; the matmul runs in the input's dtype. Codes are
chosen against the fp16-rounded scale, so the stored tensors are exactly the quantized weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import bitsandbytes.functional as bnbf
import torch
from torch import nn

from mixtral_quant.errors import ConfigError
from mixtral_quant.quant.base import MethodName, QuantConfig, QuantResult, check_weight
from mixtral_quant.quant.block_form import BlockQuant, GridSignature, block_choices
from mixtral_quant.quant.int8_linear import Int8Linear
from mixtral_quant.quant.modules import DequantLinear, require_shape, require_tensors
from mixtral_quant.quant.nf4 import DEFAULT_INT8_THRESHOLD, bitsandbytes_config

INT8_TENSORS = ["weight", "SCB", "weight_format"]
W8_TENSORS = ["weight", "weight_scale"]
ROW_FORMAT = 0  # bitsandbytes LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]
_MIN_SCALE = float(torch.finfo(torch.float16).tiny)


def row_form(codes: torch.Tensor, scale: torch.Tensor) -> BlockQuant:
    """int8 codes with one scale per row as the block form's unsigned codes, zero 128."""
    return BlockQuant((codes.to(torch.int16) + 128).to(torch.uint8).numpy(), scale[:, None].numpy(), None, 8, None)


@dataclass(frozen=True)
class Int8Options:
    """LLM.int8's one setting: the activation magnitude from which an input column is an outlier."""

    int8_threshold: float = DEFAULT_INT8_THRESHOLD

    def __post_init__(self) -> None:
        if not self.int8_threshold >= 0.0:
            raise ConfigError(f"int8_threshold {self.int8_threshold} is invalid: it must be >= 0")


class INT8:
    """bitsandbytes LLM.int8(); runtime module :class:`Int8Linear` (``Linear8bitLt``'s arithmetic and state)."""

    needs_hessian = False
    config_files: tuple[str, ...] = ()
    allowed_bits = frozenset({8})
    Options = Int8Options
    native_bits = 8

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @staticmethod
    def read_config(entry: Mapping[str, Any]) -> QuantConfig | None:
        """transformers' ``BitsAndBytesConfig`` with ``load_in_8bit``."""
        if entry.get("quant_method") != "bitsandbytes" or entry.get("load_in_4bit") or not entry.get("load_in_8bit"):
            return None
        return QuantConfig.for_method(MethodName.INT8)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        check_weight(weight, self.config)
        codes, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        codes[scb == 0] = 0  # all-zero rows: bitsandbytes computes 0 * inf there
        tensors = {
            "weight": codes,
            "SCB": scb,
            "weight_format": torch.tensor(ROW_FORMAT, dtype=torch.uint8, device=codes.device),
        }
        return QuantResult(tensors, {"method": "int8"})

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].to(torch.float32) * (tensors["SCB"].to(torch.float32)[:, None] / 127.0)

    def block_signature(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> GridSignature:
        return GridSignature(8, block_choices(None, in_features), False)

    def block_form(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> BlockQuant:
        """Codes + 128 (the default zero of 8 bits), one scale ``SCB / 127`` per row."""
        return row_form(tensors["weight"], tensors["SCB"].float() / 127.0)

    def tensor_names(self) -> list[str]:
        return list(INT8_TENSORS)

    def make_module(self, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int) -> nn.Module:
        require_tensors(tensors, INT8_TENSORS, "INT8")
        require_shape("weight", tensors["weight"], (out_features, in_features))
        require_shape("SCB", tensors["SCB"], (out_features,))
        threshold = self.config.options.int8_threshold
        return Int8Linear({name: tensors[name] for name in INT8_TENSORS}, threshold).eval()

    def quantization_config(self) -> dict[str, Any]:
        return bitsandbytes_config(load_in_4bit=False, int8_threshold=self.config.options.int8_threshold)


class W8:
    """Weight-only symmetric int8 with one fp16 scale per output channel."""

    needs_hessian = False
    config_files: tuple[str, ...] = ()
    allowed_bits = frozenset({8})
    native_bits = 8

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @staticmethod
    def read_config(entry: Mapping[str, Any]) -> QuantConfig | None:
        if entry.get("quant_method") != "mixtral-quant" or entry.get("format") != "w8":
            return None
        return QuantConfig.for_method(MethodName.W8)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        check_weight(weight, self.config)
        w = weight.to(torch.float32)
        scale = (w.abs().amax(1) / 127.0).clamp(min=_MIN_SCALE).to(torch.float16)
        codes = torch.clamp(torch.round(w / scale.to(torch.float32)[:, None]), -127, 127).to(torch.int8)
        tensors = {"weight": codes, "weight_scale": scale}
        return QuantResult(tensors, {"method": "w8"})

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].to(torch.float32) * tensors["weight_scale"].to(torch.float32)[:, None]

    def block_signature(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> GridSignature:
        return GridSignature(8, block_choices(None, in_features), False)

    def block_form(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> BlockQuant:
        """Codes + 128 (the default zero of 8 bits), one scale ``weight_scale`` per row."""
        return row_form(tensors["weight"], tensors["weight_scale"].float())

    def tensor_names(self) -> list[str]:
        return list(W8_TENSORS)

    def make_module(self, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int) -> nn.Module:
        require_tensors(tensors, W8_TENSORS, "W8")
        require_shape("weight", tensors["weight"], (out_features, in_features))
        require_shape("weight_scale", tensors["weight_scale"], (out_features,))
        return DequantLinear(tensors, self.dequantize, in_features, out_features)

    def quantization_config(self) -> dict[str, Any]:
        """This project's own entry: no transformers quantizer reads this layout."""
        return {
            "quant_method": "mixtral-quant",
            "format": "w8",
            "bits": 8,
            "sym": True,
            "granularity": "per_output_channel",
            "scale_dtype": "float16",
        }
