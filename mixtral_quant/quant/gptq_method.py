"""GPTQ and RTN as :class:`~mixtral_quant.quant.base.Method`: the GPTQ v1 checkpoint layout.

Per linear layer (GPTQModel / AutoGPTQ, format ``gptq``):

- ``qweight`` int32 ``[I*bits/32, O]``: codes packed along the input dim, LSB first;
- ``qzeros`` int32 ``[G, O*bits/32]``: ``zero - 1`` packed along the output dim (v1 convention);
- ``scales`` float16 ``[G, O]``;  ``g_idx`` int32 ``[I]``: the group of each input channel.

Dequantised: ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros_v1[g_idx[i], o] + 1))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from mixtral_quant.errors import ConfigError
from mixtral_quant.quant.base import (
    PACK_RUN,
    ROW_BAND,
    MethodName,
    QuantConfig,
    QuantResult,
    check_weight,
    entry_bool,
    entry_int,
)
from mixtral_quant.quant.block_form import BlockQuant, GridSignature, block_choices
from mixtral_quant.quant.gptq import (
    GPTQOptions,
    HessianNotPositiveDefinite,
    QuantizedWeight,
    gptq_options,
    gptq_quantize_stacked,
    grouped_dequantize,
    rtn_quantize,
    trivial_group_size,
    unusable_hessian,
)
from mixtral_quant.quant.modules import DequantLinear, require_shape, require_tensors
from mixtral_quant.quant.packing import (
    pack_qweight,
    pack_qzeros,
    pack_runtime,
    unpack_qweight,
    unpack_qzeros,
    unpack_runtime,
)

GPTQ_TENSORS = ["qweight", "qzeros", "scales", "g_idx"]


def to_checkpoint(qw: QuantizedWeight, bits: int) -> dict[str, torch.Tensor]:
    """The four stored tensors of a quantized weight, in the gptq v1 layout."""
    return {
        "qweight": pack_qweight(qw.qint.t(), bits),
        "qzeros": pack_qzeros(qw.zeros - 1, bits),
        "scales": qw.scales.to(torch.float16),
        "g_idx": qw.g_idx.to(torch.int32),
    }


def dequantize_checkpoint(tensors: Mapping[str, torch.Tensor], bits: int) -> torch.Tensor:
    """float32 ``[O, I]`` from the gptq v1 tensors."""
    q = unpack_qweight(tensors["qweight"], bits)  # [I, O]
    zeros = unpack_qzeros(tensors["qzeros"], bits).to(torch.float32) + 1.0  # [G, O]
    return grouped_dequantize(q, tensors["scales"], zeros, tensors["g_idx"]).t()


def rtn_checkpoint(weight: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """Round-to-nearest of ``weight [O, I]`` (any float dtype) straight into the gptq v1 tensors,
    ``ROW_BAND`` output rows at a time: rows never mix, so the bytes are those of the whole matrix at
    once, while float32 temporaries stay a band's size (16 MB at 4096 inputs, not 235 MB for w1).
    ``clip [O, G]``: each group's range shrunk by that ratio (see :func:`group_grid`)."""
    out_features, in_features = weight.shape
    bits, groups = cfg.bits, in_features // cfg.group_size_for(in_features)
    tensors = {
        "qweight": torch.empty(in_features * bits // 32, out_features, dtype=torch.int32, device=weight.device),
        "qzeros": torch.empty(groups, out_features * bits // 32, dtype=torch.int32, device=weight.device),
        "scales": torch.empty(groups, out_features, dtype=torch.float16, device=weight.device),
    }
    info: dict[str, Any] = {}
    for start in range(0, out_features, ROW_BAND):  # ROW_BAND and out_features are multiples of 32: whole words
        stop = min(start + ROW_BAND, out_features)
        qw = rtn_quantize(weight[start:stop], cfg, None if clip is None else clip[start:stop])
        band = to_checkpoint(qw, bits)
        tensors["qweight"][:, start:stop] = band["qweight"]
        tensors["qzeros"][:, start * bits // 32 : stop * bits // 32] = band["qzeros"]
        tensors["scales"][:, start:stop] = band["scales"]
        tensors["g_idx"], info = band["g_idx"], qw.info
    return tensors, info


def dequantize_rows(tensors: Mapping[str, torch.Tensor], bits: int, start: int, stop: int) -> torch.Tensor:
    """float32 ``[stop - start, I]``: output rows ``start:stop`` (multiples of 32) of the gptq v1 tensors."""
    band = {
        "qweight": tensors["qweight"][:, start:stop],
        "qzeros": tensors["qzeros"][:, start * bits // 32 : stop * bits // 32],
        "scales": tensors["scales"][:, start:stop],
        "g_idx": tensors["g_idx"],
    }
    return dequantize_checkpoint(band, bits)


def runtime_dequantize(tensors: Mapping[str, torch.Tensor], bits: int, size: int) -> torch.Tensor:
    """float32 ``[O, I]`` of a weight whose groups are runs of ``size`` inputs, with the zeros already
    unpacked (``tensors["zeros"]``, float16 ``[G, O]``): the arithmetic of :func:`grouped_dequantize`.
    The codes are ``tensors["codes"]`` (:func:`pack_runtime` words) when the module keeps them so,
    else the stored ``qweight`` (whole codes per word: the same words)."""
    words = tensors["codes"] if "codes" in tensors else tensors["qweight"]
    q = unpack_runtime(words, bits, tensors["scales"].shape[0] * size)  # [I, O]
    return grouped_dequantize(q, tensors["scales"], tensors["zeros"], None, size).t()


def _restore_qweight(tensors: Mapping[str, torch.Tensor], bits: int, n: int, inverse: torch.Tensor | None
                     ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The stored ``qweight`` from a module's runtime codes (rows put back in input order by ``inverse``)."""
    codes = unpack_runtime(tensors["codes"], bits, n)
    if inverse is not None:
        codes = codes.index_select(0, inverse)
    return {"qweight": pack_qweight(codes, bits)}


class GPTQLayout:
    """Storage, loading and runtime shared by the methods that write the GPTQ layout.

    ``quantize`` takes the weight in any float dtype (bf16 for Mixtral) and widens it a band of rows
    at a time, so it is also ``quantize_widened``; ``dequantize_rows`` reads back a band, so the
    calibration driver's error check never holds a whole float32 weight either."""

    Options = GPTQOptions
    config_files: tuple[str, ...] = ("quantize_config.json",)
    allowed_bits = frozenset({2, 3, 4, 8})
    native_bits = 4

    @staticmethod
    def stored_bytes(config: QuantConfig, in_features: int, out_features: int) -> int:
        """Bytes a ``[out, in]`` linear stores: qweight and qzeros (int32 words of ``bits``-bit codes),
        fp16 scales per group and output, int32 g_idx per input."""
        groups = in_features // config.group_size_for(in_features)
        bits = config.bits
        return 4 * (in_features * bits // 32 * out_features + groups * (out_features * bits // 32) + in_features) \
            + 2 * groups * out_features

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @staticmethod
    def check_shape(config: QuantConfig, in_features: int, out_features: int) -> None:
        """Groups must divide the input and the packing runs (32 bits of codes) both dimensions."""
        group = config.group_size_for(in_features)
        if in_features % group:
            raise ConfigError(f"group_size {group} does not divide in_features {in_features}: pick a divisor or -1")
        run = PACK_RUN[config.bits]
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size % run:
                raise ConfigError(f"{name} {size} cannot be packed at {config.bits} bits: it must be a multiple "
                                  f"of {run}")

    @staticmethod
    def read_config(entry: Mapping[str, Any]) -> QuantConfig | None:
        """GPTQModel's keys, format ``gptq`` (v1 zeros) only; an RTN artifact reads back as GPTQ (one
        layout, and loading needs no Hessian)."""
        if entry.get("quant_method") != "gptq":
            return None
        if entry.get("format", "gptq") not in ("gptq", None) or entry.get("checkpoint_format", "gptq") != "gptq":
            raise ConfigError(f"GPTQ format {entry.get('format')!r} is not supported; only 'gptq' (v1 zeros) is")
        return QuantConfig.of(
            MethodName.GPTQ,
            bits=entry_int(entry, "bits"),
            group_size=entry_int(entry, "group_size", 128),
            sym=entry_bool(entry, "sym", True),
            act_order=entry_bool(entry, "desc_act", False),
            static_groups=entry_bool(entry, "static_groups", True),
            damp_percent=float(entry.get("damp_percent", 0.01)),
        )

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_checkpoint(tensors, self.config.bits)

    def block_signature(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> GridSignature | None:
        """The block form's width, block sizes and zeros, read without ``qweight``."""
        grid = self._grid(tensors, in_features)
        if grid is None:
            return None
        return GridSignature(self.config.bits, block_choices(grid[0], in_features), grid[2] is not None)

    def block_form(self, tensors: Mapping[str, torch.Tensor], in_features: int) -> BlockQuant | None:
        """The codes, scales and zeros on the stored grid (see :meth:`_grid` for when there is none)."""
        grid = self._grid(tensors, in_features)
        if grid is None:
            return None
        block, scales, zeros = grid
        bits = self.config.bits
        codes = unpack_qweight(tensors["qweight"], bits).t().contiguous().to(torch.uint8).numpy()
        return BlockQuant(codes, scales.numpy(), None if zeros is None else zeros.to(torch.uint8).numpy(), bits, block)

    def _grid(self, tensors: Mapping[str, torch.Tensor], k: int
              ) -> tuple[int | None, torch.Tensor, torch.Tensor | None] | None:  # fmt: skip
        """(block, scales [N, G], zeros [N, G] or None for the default) as stored (block None: one group
        per row), from ``scales``, ``g_idx`` and ``qzeros`` only. None when the grid has no block form:
        act-order groups that are not contiguous runs of K or a v1 zero of 0 wrapped to ``2**bits``."""
        bits = self.config.bits
        groups = tensors["scales"].shape[0]
        if groups == 0 or k % groups:
            return None
        group = k // groups
        if not torch.equal(tensors["g_idx"].long(), torch.arange(k) // group):
            return None
        zeros = unpack_qzeros(tensors["qzeros"], bits).long() + 1  # [G, N], gptq v1 stores zero - 1
        if int(zeros.min()) < 0 or int(zeros.max()) >= 2**bits:
            return None
        scales, zero_t = tensors["scales"].float().t().contiguous(), zeros.t().contiguous()
        default = bool((zero_t == 2 ** (bits - 1)).all())
        return (group if groups > 1 else None), scales, None if default else zero_t

    def dequantize_rows(self, tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        return dequantize_rows(tensors, self.config.bits, start, stop)

    def tensor_names(self) -> list[str]:
        return list(GPTQ_TENSORS)

    def make_module(self, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int) -> nn.Module:
        require_tensors(tensors, GPTQ_TENSORS, "GPTQ")
        bits, groups = self.config.bits, in_features // self.config.group_size_for(in_features)
        require_shape("qweight", tensors["qweight"], (in_features * bits // 32, out_features))
        require_shape("qzeros", tensors["qzeros"], (groups, out_features * bits // 32))
        require_shape("scales", tensors["scales"], (groups, out_features))
        require_shape("g_idx", tensors["g_idx"], (in_features,))
        # the zeros unpacked once, here (float16 holds every code exactly): per call only the codes unpack
        derived = {"zeros": (unpack_qzeros(tensors["qzeros"], bits) + 1).to(torch.float16)}
        size = trivial_group_size(tensors["g_idx"], groups)
        order = None
        if size is None:
            # act-order with dynamic groups: the inputs sorted by group once, here, so that every call
            # broadcasts the grid over whole groups instead of gathering it per input row
            order = torch.argsort(tensors["g_idx"].to(torch.int64), stable=True)
            size = in_features // groups
        dequantize = partial(runtime_dequantize, bits=bits, size=size)
        if bits != 3 and order is None:  # the stored words are the runtime words
            return DequantLinear(tensors, dequantize, in_features, out_features, derived=derived)
        # 3-bit codes straddle words on disk: in memory they are repacked whole, 10 per word (+7 %), so a
        # call unpacks them with one shift as it does 4-bit codes; state_dict() rebuilds the stored qweight
        codes = unpack_qweight(tensors["qweight"], bits)
        inverse = None
        if order is not None:
            codes, inverse = codes.index_select(0, order), torch.argsort(order)
        derived["codes"] = pack_runtime(codes, bits)
        kept = {k: v for k, v in tensors.items() if k != "qweight"}
        return DequantLinear(kept, dequantize, in_features, out_features, input_order=order, derived=derived,
                             restore=partial(_restore_qweight, bits=bits, n=in_features, inverse=inverse))

    def quantization_config(self) -> dict[str, Any]:
        """GPTQModel's quantize_config keys (format ``gptq``, v1 zeros)."""
        cfg, opts = self.config, gptq_options(self.config)
        return {
            "bits": cfg.bits,
            "group_size": cfg.group_size,
            "desc_act": opts.act_order,
            "sym": opts.sym,
            "damp_percent": opts.damp_percent,
            "true_sequential": opts.true_sequential,
            "static_groups": opts.static_groups,
            "quant_method": "gptq",
            "format": "gptq",
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
        }


class RTN(GPTQLayout):
    """Round-to-nearest per group, stored in the GPTQ layout. Needs no calibration."""

    needs_hessian = False

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        check_weight(weight, self.config)
        tensors, info = rtn_checkpoint(weight, self.config)
        return QuantResult(tensors, {"method": "rtn", **info})

    quantize_widened = quantize  # it widens a band at a time already


class GPTQ(GPTQLayout):
    """GPTQ against the layer's input Hessian.

    Falls back to RTN, with the reason in ``info["fallback"]``, when the Hessian is missing
    (an expert that received no calibration tokens), empty, or stays not positive definite
    after the damping increases (AutoGPTQ issue 644 on MoE experts).
    """

    needs_hessian = True

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        return self.quantize_stacked([weight], hessian)[0]

    quantize_widened = quantize  # the sweep's float32 copy is its own, built a band at a time

    def quantize_stacked(self, weights: list[torch.Tensor], hessian: torch.Tensor | None) -> list[QuantResult]:
        """Linears that share one input (and so ``hessian``) as one stacked GPTQ: the codes of
        :meth:`quantize` one by one, with one damped inverse Cholesky and one sweep."""
        for weight in weights:
            check_weight(weight, self.config)
        reason = unusable_hessian(hessian)
        if reason is not None or hessian is None:
            return [self._fallback(w, reason or "no Hessian") for w in weights]
        try:
            qws = gptq_quantize_stacked(weights, hessian, self.config)
        except HessianNotPositiveDefinite as err:
            return [self._fallback(w, str(err)) for w in weights]
        return [QuantResult(to_checkpoint(qw, self.config.bits), {"method": "gptq", **qw.info}) for qw in qws]

    def _fallback(self, weight: torch.Tensor, reason: str) -> QuantResult:
        tensors, rtn_info = rtn_checkpoint(weight, self.config)
        info: dict[str, float | int | str] = {"method": "rtn", "fallback": reason, **rtn_info}
        return QuantResult(tensors, info)
