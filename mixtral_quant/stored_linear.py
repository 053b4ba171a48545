"""The one rule every reader of a checkpoint uses to tell a quantized linear from a float one.

A linear is stored quantized when a tensor only a quantized linear of the artifact's method has is
present (its first stored name other than plain ``weight``: GPTQ ``qweight``, NF4 ``weight.absmax``,
LLM.int8 ``SCB``, w8 ``weight_scale``); then every name the method stores must be there. Model
loading, layer-by-layer evaluation and both exporters read linears through :func:`quantized_tensors`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixtral_quant.checkpoint import CheckpointReader
from mixtral_quant.errors import CheckpointError
from mixtral_quant.quant.base import Method


def marker(method: Method) -> str:
    """A stored name that only a quantized linear of this method has (not plain 'weight')."""
    return next(n for n in method.tensor_names() if n != "weight")


def quantized_tensors(
    reader: CheckpointReader,
    method: Method | None,
    prefix: str,
    get: Callable[[str], torch.Tensor] | None = None,
    skip: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor] | None:
    """The stored tensors (less ``skip``) of the linear ``prefix`` by their names relative to it, or
    None when it is stored as a float weight; CheckpointError when one of the method's names is missing.
    ``get`` reads a tensor by its full name (default ``reader.get``)."""
    if method is None or f"{prefix}.{marker(method)}" not in reader.where:
        return None
    read = get or reader.get
    tensors = {}
    for suffix in method.tensor_names():
        full = f"{prefix}.{suffix}"
        if suffix in skip:
            continue
        if full not in reader.where:
            raise CheckpointError(f"quantized {prefix} is missing {full} in {reader.folder}")
        tensors[suffix] = read(full)
    return tensors
