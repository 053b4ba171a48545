"""NF4 (QLoRA 4-bit NormalFloat) through bitsandbytes, stored as transformers stores Linear4bit.

Quantization is ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``: one absmax per
block of ``nf4_blocksize`` weights, the absmax values themselves quantized to 8 bits in blocks
of 256 when ``double_quant`` is on. The stored tensors are ``QuantState.as_dict(packed=True)``
under ``weight.`` plus the packed codes as ``weight`` (what ``Linear4bit._save_to_state_dict``
writes), so a transformers-loadable checkpoint needs no renaming. The quantization state keeps
the weight's own dtype (fp16, bf16 or fp32), as transformers does when it quantizes a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

from mixtral_quant.errors import CheckpointError, ConfigError
from mixtral_quant.quant.base import ROW_BAND, MethodName, QuantConfig, QuantResult, check_weight
from mixtral_quant.quant.block_form import Bnb4
from mixtral_quant.quant.modules import require_tensors

_STATE_KEYS = ["weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"]
_NESTED_KEYS = ["weight.nested_absmax", "weight.nested_quant_map"]
_BNB_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


NF4_BLOCKSIZES = frozenset({32, 64, 128, 256, 512, 1024, 2048, 4096})
DEFAULT_INT8_THRESHOLD = 6.0  # BitsAndBytesConfig's llm_int8_threshold default


@dataclass(frozen=True)
class NF4Options:
    """NF4's settings: bitsandbytes' block size, double quantization of the absmax, and the compute dtype
    written as ``bnb_4bit_compute_dtype`` (not a recipe key)."""

    nf4_blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.nf4_blocksize not in NF4_BLOCKSIZES:
            raise ConfigError(f"nf4_blocksize {self.nf4_blocksize} is invalid: use one of {sorted(NF4_BLOCKSIZES)}")
        if self.compute_dtype not in _BNB_DTYPES:
            raise ConfigError(f"compute_dtype {self.compute_dtype} is invalid: use float16, bfloat16 or float32")


def bitsandbytes_config(load_in_4bit: bool, nf4: NF4Options | None = None,
                        int8_threshold: float = DEFAULT_INT8_THRESHOLD) -> dict[str, Any]:  # fmt: skip
    """transformers ``BitsAndBytesConfig(...).to_dict()`` for NF4 (4-bit, ``nf4`` its settings) or LLM.int8
    (8-bit)."""
    nf4 = nf4 or NF4Options()
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": not load_in_4bit,
        "_load_in_4bit": load_in_4bit,
        "llm_int8_threshold": int8_threshold,
        "llm_int8_skip_modules": None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4" if load_in_4bit else "fp4",
        "bnb_4bit_use_double_quant": nf4.double_quant if load_in_4bit else False,
        "bnb_4bit_compute_dtype": _dtype_name(nf4.compute_dtype if load_in_4bit else torch.float32),
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": load_in_4bit,
        "load_in_8bit": not load_in_4bit,
    }


class NF4:
    """bitsandbytes NF4; runtime module is ``bnb.nn.Linear4bit`` (CPU and CUDA kernels)."""

    Options = NF4Options
    needs_hessian = False
    config_files: tuple[str, ...] = ()
    allowed_bits = frozenset({4})
    native_bits = 4

    def __init__(self, config: QuantConfig) -> None:
        assert isinstance(config.options, NF4Options), config
        self.config, self.options = config, config.options

    @staticmethod
    def read_config(entry: Mapping[str, Any]) -> QuantConfig | None:
        """transformers' ``BitsAndBytesConfig`` with ``load_in_4bit`` (NF4 only, not FP4)."""
        if entry.get("quant_method") != "bitsandbytes" or not entry.get("load_in_4bit"):
            return None
        if entry.get("bnb_4bit_quant_type", "nf4") != "nf4":
            raise ConfigError(f"bitsandbytes 4-bit type {entry.get('bnb_4bit_quant_type')!r} is not supported")
        return QuantConfig.of(MethodName.NF4, bits=4,
                              double_quant=bool(entry.get("bnb_4bit_use_double_quant", False)))  # fmt: skip

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        check_weight(weight, self.config)
        return self._quantize(weight, weight.dtype if weight.dtype in _BNB_DTYPES else torch.float32)

    def quantize_widened(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        """``quantize(weight.float())`` without the whole float32 copy: the calibration driver's call."""
        check_weight(weight, self.config)
        return self._quantize(weight, torch.float32)

    def _quantize(self, weight: torch.Tensor, dtype: torch.dtype) -> QuantResult:
        """bitsandbytes' ``quantize_4bit`` of ``weight`` as ``dtype``, ``ROW_BAND`` rows at a time when
        the blocks fit whole in a row: a block's codes and absmax depend on its own values only, so the
        bands give the codes and absmax of one call; the absmax are then double-quantized together as
        ``quantize_4bit`` does (offset their mean, 8-bit blocks of 256)."""
        cfg, (rows, cols) = self.options, weight.shape
        band = ROW_BAND if cols % cfg.nf4_blocksize == 0 else rows
        parts = [torch.ops.bitsandbytes.quantize_4bit.default(weight[r : r + band].to(dtype).contiguous(),
                                                              cfg.nf4_blocksize, "nf4", torch.uint8)
                 for r in range(0, rows, band)]  # fmt: skip
        codes = torch.cat([c for c, _ in parts]) if len(parts) > 1 else parts[0][0]
        absmax = torch.cat([a for _, a in parts]) if len(parts) > 1 else parts[0][1]
        del parts
        common = {"shape": weight.shape, "dtype": dtype, "blocksize": cfg.nf4_blocksize,
                  "code": bnbf.get_4bit_type("nf4", device=weight.device), "quant_type": "nf4"}
        if cfg.double_quant:
            offset = absmax.mean()
            qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
            state = bnbf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)
        else:
            state = bnbf.QuantState(absmax=absmax, **common)
        # clone: quant maps may be shared with bitsandbytes' caches, and safetensors refuses shared storage
        tensors = {"weight": codes} | {f"weight.{k}": v.clone() for k, v in state.as_dict(packed=True).items()}
        return QuantResult(tensors, {"method": "nf4"})

    def bnb4_form(self, tensors: Mapping[str, torch.Tensor]) -> Bnb4:
        """The stored codes and the float absmax (double quantization undone): MatMulBnb4's inputs."""
        state = bnbf.QuantState.from_dict({k: v for k, v in tensors.items() if k != "weight"},
                                          device=torch.device("cpu"))  # fmt: skip
        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        quant_type = {"nf4": 1, "fp4": 0}[state.quant_type]
        return Bnb4(tensors["weight"].reshape(-1).numpy(), absmax.float().numpy(), int(state.blocksize), quant_type)

    def quant_state(self, tensors: Mapping[str, torch.Tensor]) -> bnbf.QuantState:
        """The bitsandbytes QuantState rebuilt from the stored tensors."""
        stats = {k: v for k, v in tensors.items() if k != "weight"}
        return bnbf.QuantState.from_dict(stats, device=tensors["weight"].device)

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return bnbf.dequantize_4bit(tensors["weight"], self.quant_state(tensors)).to(torch.float32)

    def dequantize_rows(self, tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        """float32 rows ``start:stop`` of :meth:`dequantize` (the same arithmetic, on those blocks only)."""
        state = self.quant_state(tensors)
        assert state.shape is not None
        cols = state.shape[1]
        absmax = state.absmax
        if state.nested:  # as dequantize_4bit: the 8-bit absmax back to float32, plus the offset
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
            absmax = absmax.float()
        if (start * cols) % state.blocksize or (stop * cols) % state.blocksize:
            return self.dequantize(tensors)[start:stop]
        lo, hi = start * cols // state.blocksize, stop * cols // state.blocksize
        band = bnbf.QuantState(absmax=absmax[lo:hi], shape=torch.Size((stop - start, cols)), dtype=state.dtype,
                               blocksize=state.blocksize, code=state.code, quant_type="nf4")  # fmt: skip
        codes = tensors["weight"][start * cols // 2 : stop * cols // 2]
        return bnbf.dequantize_4bit(codes, band).to(torch.float32)

    def tensor_names(self) -> list[str]:
        nested = _NESTED_KEYS if self.options.double_quant else []
        return ["weight", *_STATE_KEYS, *nested]

    def make_module(self, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int) -> nn.Module:
        """``Linear4bit`` computing in the input's dtype (fp32/bf16; fp16 as given)."""
        require_tensors(tensors, self.tensor_names(), "NF4")
        module = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=False,
            compute_dtype=None,
            compress_statistics=self.options.double_quant,
            quant_type="nf4",
            device="meta",
        )
        codes = tensors["weight"]
        shape = tuple(self.quant_state(tensors).shape or ())
        if shape != (out_features, in_features):
            raise CheckpointError(f"NF4 weight holds shape {shape}, expected {(out_features, in_features)}")
        stats = {k: v for k, v in tensors.items() if k != "weight"}
        module.weight = bnb.nn.Params4bit.from_prequantized(
            data=codes, quantized_stats=stats, requires_grad=False, device=codes.device, module=module
        )
        return module

    def quantization_config(self) -> dict[str, Any]:
        return bitsandbytes_config(load_in_4bit=True, nf4=self.options)
