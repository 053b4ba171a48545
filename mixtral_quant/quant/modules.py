"""Runtime linear layers shared by methods that have no kernel of their own.

:class:`DequantLinear` keeps the stored tensors as buffers (so ``state_dict()`` has exactly the
on-disk names and ``.to(device)`` moves them) and rebuilds the weight on every call: nothing is
cached, so memory stays at the quantized size, at the price of one dequantization per forward.
``derived`` tensors are forms of the stored ones computed once at load (GPTQ's unpacked zeros, Q4_K's
unpacked sub-block scales), non-persistent buffers that ``state_dict()`` leaves out but the memory count
includes; the dequantizer sees them beside the stored tensors. A stored tensor the module keeps only in
a derived form (GPTQ codes repacked whole per word, or sorted by group) is rebuilt exactly by
``restore``: :meth:`DequantLinear.stored` and ``state_dict()`` still give the bytes on disk. With
``input_order`` the dequantizer's weight has its columns in that order (a GPTQ act-order weight sorted
by group once, at load): the input is permuted to match, one gather of the activations per call
instead of one of the weight's grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mixtral_quant.errors import CheckpointError

Dequantizer = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
Restorer = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


class DequantLinear(nn.Module):
    """Bias-free ``y = x @ W^T`` with ``W = dequantize(buffers)`` computed per call."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        dequantize: Dequantizer,
        in_features: int,
        out_features: int,
        input_order: torch.Tensor | None = None,
        derived: Mapping[str, torch.Tensor] | None = None,
        restore: Restorer | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._dequantize = dequantize
        self._names = list(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self._restore = restore
        self._derived = list(derived or {})
        for name, tensor in (derived or {}).items():
            self.register_buffer(name, tensor, persistent=False)
        self.input_order: torch.Tensor | None
        self.register_buffer("input_order", input_order, persistent=False)

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors, on the module's current device (those kept in a derived form rebuilt)."""
        out = {name: self.get_buffer(name) for name in self._names}
        if self._restore is not None:
            out.update(self._restore(self._inputs()))
        return out

    def _save_to_state_dict(self, destination: dict[str, torch.Tensor], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._restore is not None:
            for name, tensor in self._restore(self._inputs()).items():
                destination[prefix + name] = tensor

    def _inputs(self) -> dict[str, torch.Tensor]:
        return {name: self.get_buffer(name) for name in (*self._names, *self._derived)}

    def weight_float(self) -> torch.Tensor:
        """The dequantized weight, float32 ``[out, in]``, columns in the input's order."""
        w = self._dequantize(self._inputs())
        if self.input_order is None:
            return w
        return w[:, torch.argsort(self.input_order)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_order is not None:
            x = x.index_select(-1, self.input_order)
        return F.linear(x, self._dequantize(self._inputs()).to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored={self._names}"


def require_tensors(tensors: Mapping[str, torch.Tensor], names: list[str], method: str) -> None:
    """CheckpointError naming the missing or unexpected tensors of a ``method`` layer."""
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise CheckpointError(f"{method} layer tensors do not match: missing {missing}, unexpected {unexpected}")


def require_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """CheckpointError when a stored tensor's shape is not the one the layer needs."""
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
