"""GPTQ onto llama.cpp's Q4_K grid, stored as the ``block_q4_K`` bytes llama.cpp reads.

Per linear layer: ``q4_k`` uint8 ``[O, I / 256 * 144]``, the rows of a GGUF Q4_K tensor (see
:mod:`mixtral_quant.quant.q4_k`), so ``export gguf --type q4_k`` copies them as they are.

The grid of every super-block (fp16 ``d``/``dmin``, 6-bit scales and minimums per 32 inputs) is fitted
before the sweep, as GPTQ's static groups are, by llama.cpp's own fit with each input weighted by the
Hessian's diagonal (the mean squared activation: what llama-imatrix collects). GPTQ then chooses the
codes on that fixed grid column by column, spreading each rounding error over the columns not yet
quantized. Without a Hessian (an expert the router sent too few tokens) the linear is llama.cpp's
round-to-nearest Q4_K, byte for byte what llama-quantize writes without an importance matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mixtral_quant.errors import ConfigError
from mixtral_quant.quant.base import (
    MethodName,
    QuantConfig,
    QuantResult,
    check_weight,
    entry_bool,
    entry_int,
)
from mixtral_quant.quant.gptq import (
    AffineGrid,
    GPTQOptions,
    HessianNotPositiveDefinite,
    gptq_options,
    gptq_quantize_stacked,
    unusable_hessian,
)
from mixtral_quant.quant.modules import DequantLinear, require_shape, require_tensors
from mixtral_quant.quant.q4_k import Q4_K_BYTES, QK_K, SUB, dequantize_q4_k, pack_q4_k, q4_k_grid, q4_k_header

Q4_K_TENSORS = ["q4_k"]


class GPTQQ4K:
    """GPTQ under llama.cpp's Q4_K constraints; llama.cpp's round-to-nearest Q4_K as its fallback."""

    Options = GPTQOptions
    needs_hessian = True
    config_files: tuple[str, ...] = ()
    allowed_bits = frozenset({4})
    native_bits = 4

    @staticmethod
    def check_config(config: QuantConfig) -> None:
        if config.group_size != SUB:
            raise ConfigError(f"{config.method_name} has one scale per {SUB} inputs: set group_size "
                              f"{SUB}, not {config.group_size}")

    @staticmethod
    def check_shape(config: QuantConfig, in_features: int, out_features: int) -> None:
        if in_features % QK_K:
            raise ConfigError(f"{config.method_name} needs in_features a multiple of {QK_K}, got {in_features}: "
                              "use another method for this model")

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @staticmethod
    def read_config(entry: Mapping[str, Any]) -> QuantConfig | None:
        if entry.get("quant_method") != "mixtral-quant" or entry.get("format") != "gguf-q4_k":
            return None
        return QuantConfig.of(MethodName.GPTQ_Q4_K, bits=4, group_size=entry_int(entry, "group_size", 32),
                           act_order=entry_bool(entry, "desc_act", False),
                           damp_percent=float(entry.get("damp_percent", 0.01)))

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        return self.quantize_stacked([weight], hessian)[0]

    def quantize_stacked(self, weights: list[torch.Tensor], hessian: torch.Tensor | None) -> list[QuantResult]:
        """Linears sharing one input: one grid per linear, one stacked GPTQ sweep."""
        for weight in weights:
            check_weight(weight, self.config)
        reason = unusable_hessian(hessian)
        if reason is not None or hessian is None:
            return [self._fallback(w, reason or "no Hessian") for w in weights]
        importance = hessian.diagonal().float().cpu().numpy()
        grids = [q4_k_grid(w.float().cpu().numpy(), importance) for w in weights]
        offsets = [g.scale_offset() for g in grids]  # [R, I/32] each
        stacked = AffineGrid(torch.from_numpy(np.concatenate([s for s, _ in offsets]).T.copy()),
                             torch.from_numpy(np.concatenate([o for _, o in offsets]).T.copy()))  # fmt: skip
        cfg = self.config.with_fields(static_groups=True)
        try:
            qws = gptq_quantize_stacked(weights, hessian, cfg, stacked)
        except HessianNotPositiveDefinite as err:
            return [self._fallback(w, str(err)) for w in weights]
        out = []
        for grid, qw in zip(grids, qws, strict=True):
            codes = qw.qint.to(torch.uint8).cpu().numpy()
            tensors = {"q4_k": torch.from_numpy(pack_q4_k(grid, codes)).to(qw.qint.device)}
            out.append(QuantResult(tensors, {"method": "gptq-q4_k", **qw.info}))
        return out

    quantize_widened = quantize  # the grid fit and the sweep make their own float32 copies

    def _fallback(self, weight: torch.Tensor, reason: str) -> QuantResult:
        packed = pack_q4_k(q4_k_grid(weight.float().cpu().numpy()))
        return QuantResult({"q4_k": torch.from_numpy(packed).to(weight.device)},
                           {"method": "rtn-q4_k", "fallback": reason})  # fmt: skip

    def gguf_rows(self, tensors: Mapping[str, torch.Tensor]) -> tuple[str, np.ndarray]:
        """The GGML type and the rows of a GGUF tensor of that type: the stored blocks themselves."""
        return "Q4_K", tensors["q4_k"].numpy()

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        blocks = tensors["q4_k"]
        rows, width = blocks.shape
        header = {"d": tensors["d"], "sm": tensors["sm"]} if "sm" in tensors else None
        return dequantize_q4_k(blocks, rows, width // Q4_K_BYTES * QK_K, header)

    def tensor_names(self) -> list[str]:
        return list(Q4_K_TENSORS)

    def make_module(self, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int) -> nn.Module:
        require_tensors(tensors, Q4_K_TENSORS, "Q4_K")
        require_shape("q4_k", tensors["q4_k"], (out_features, in_features // QK_K * Q4_K_BYTES))
        # the grid unpacked once, here (24 bytes per 256 weights): per call only the codes unpack
        return DequantLinear(tensors, self.dequantize, in_features, out_features, derived=q4_k_header(tensors["q4_k"]))

    def quantization_config(self) -> dict[str, Any]:
        """This project's own entry: llama.cpp reads the bytes through ``export gguf``."""
        opts = gptq_options(self.config)
        return {
            "quant_method": "mixtral-quant",
            "format": "gguf-q4_k",
            "bits": 4,
            "group_size": SUB,
            "super_block": QK_K,
            "desc_act": opts.act_order,
            "damp_percent": opts.damp_percent,
            "true_sequential": opts.true_sequential,
        }
