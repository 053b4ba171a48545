"""The runtime module of LLM.int8() artifacts: bitsandbytes' arithmetic, with less work per call on the CPU.

:class:`Int8Linear` holds what ``Linear8bitLt`` saves (``weight`` int8 ``[out, in]``, ``SCB`` float32
``[out]``, ``weight_format``) under the same names. On CUDA it calls ``bitsandbytes.matmul`` with the
state ``Linear8bitLt`` would build (bitsandbytes' CUDA kernels). On the CPU, bitsandbytes runs its
LLM.int8 matmul as a chain of PyTorch ops behind an autograd function and registered custom ops, about
350 us of bookkeeping per call at the tiny model's shapes; :func:`int8_matmul` runs the same ops in the
same order (fp16 activations quantized per row, input columns holding a value at or above the
threshold taken out and multiplied in the input's dtype, the int8 product through bitsandbytes' own
``int8_linear_matmul``: ``torch._int_mm`` where the CPU has AVX-512), so its outputs are bitsandbytes'
bit for bit (tested) at a quarter of the cost.
"""

from __future__ import annotations

from collections.abc import Mapping

import bitsandbytes as bnb
import torch
from bitsandbytes.autograd._functions import MatmulLtState
from torch import nn

_DEQUANT_BOTH = 6.200124e-05  # 1 / 127**2, bitsandbytes' int8_mm_dequant constant
_DEQUANT_ONE = 7.874015718698502e-3  # 1 / 127, bitsandbytes' int8_vectorwise_dequant constant


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x [..., in]`` times the LLM.int8 weight ``codes [out, in]`` (row absmax ``scb``), in ``x``'s dtype:
    bitsandbytes' ``MatMul8bitLt`` forward (inference, CPU), op for op. ``x`` is not modified."""
    shape = x.shape
    a = x.reshape(-1, shape[-1])
    a16 = a.to(torch.float16, copy=True)
    outlier_cols = None
    if threshold > 0.0:
        outliers = a16.abs() >= threshold
        if outliers.any():
            outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
            a16[outliers] = 0
    row_stats = torch.max(a16.abs(), dim=1).values.float()
    ca = torch.round(a16 * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    if a.shape[0] > 1 and outlier_cols is not None:
        ca[:, outlier_cols] = 0
    product = torch.ops.bitsandbytes.int8_linear_matmul.default(ca, codes)
    out = (product * (row_stats.unsqueeze(-1) * scb.reshape(-1).unsqueeze(0)) * _DEQUANT_BOTH).to(x.dtype)
    if outlier_cols is not None:
        sub_a = a[:, outlier_cols].contiguous()
        sub_b = (codes[:, outlier_cols].contiguous() * scb.view(-1, 1) * _DEQUANT_ONE).to(x.dtype).t()
        out = out.addmm(sub_a, sub_b)
    return out.reshape(*shape[:-1], codes.shape[0])


class Int8Linear(nn.Module):
    """Bias-free LLM.int8 linear; ``state_dict()`` is ``Linear8bitLt``'s."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], threshold: float) -> None:
        super().__init__()
        self.out_features, self.in_features = tensors["weight"].shape
        self.threshold = threshold
        self.weight: torch.Tensor
        self.SCB: torch.Tensor
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return int8_matmul(x, self.weight, self.SCB, self.threshold)
        return self.forward_bitsandbytes(x)

    def forward_bitsandbytes(self, x: torch.Tensor) -> torch.Tensor:
        """Through ``bitsandbytes.matmul`` with the state ``Linear8bitLt`` builds (its CUDA kernels)."""
        state = MatmulLtState()
        state.threshold = self.threshold
        state.has_fp16_weights = False
        state.is_training = False
        state.CB, state.SCB = self.weight, self.SCB
        return bnb.matmul(x, self.weight, state=state, threshold=self.threshold)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"
