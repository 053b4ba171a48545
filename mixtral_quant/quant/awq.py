"""AWQ's per-channel scale search (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", 2023, section 3.2), in the form the layer-sequential driver can use:
from the Hessians it captures anyway, not from stored activations.

For the linears that read one folding point (q/k/v after the input norm; the router and every expert's
w1/w3 after the post-attention norm; an expert's w2 after its w3) the input channels are scaled by
``s = m ** alpha`` (``m``: the mean magnitude of each input channel over the calibration tokens),
normalised so that ``max(s) * min(s) == 1``, for ``alpha`` on a grid in [0, 1). Each candidate is scored
by the output error of the quantized, scaled weights on the calibration inputs,

    err(s) = sum over groups k of  n_k * trace(E_k H_k E_k^T),   E_k = W_k - Q(W_k diag(s)) diag(s)^-1,

with ``H_k`` the mean of ``x x^T`` over the tokens group ``k`` sees and ``n_k`` their number. For
Mixtral's experts a group is one expert with the tokens the router sends it, so each expert's error
counts in proportion to its tokens: a rarely used expert cannot pull the shared scale of the
post-attention norm toward itself. ``alpha = 0`` (no scaling) is on the grid, so the scale found never
scores worse than none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

FakeQuant = Callable[[torch.Tensor], torch.Tensor]  # float [O, I] -> its quantized-and-dequantized float
ALPHA_GRID = 20  # AWQ's n_grid: alpha in 0, 0.05, ..., 0.95


@dataclass
class ScaleGroup:
    """Linears that see the same tokens: their weights ``[O_j, I]``, the mean ``x x^T`` ``[I, I]`` of
    their inputs and how many tokens that mean is over."""

    weights: Sequence[torch.Tensor]
    hessian: torch.Tensor
    tokens: int


def scales_for(magnitude: torch.Tensor, alpha: float) -> torch.Tensor:
    """``magnitude ** alpha`` normalised so that the largest times the smallest is 1 (AWQ's ``s``)."""
    s = magnitude.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def output_error(groups: Sequence[ScaleGroup], s: torch.Tensor, fake_quant: FakeQuant) -> float:
    """The summed squared output error of the groups' linears quantized with input scales ``s``."""
    total = 0.0
    for g in groups:
        for w in g.weights:
            e = w.float() - fake_quant(w.float() * s) / s
            total += g.tokens * float(((e @ g.hessian.float()) * e).sum())
    return total


def search_scale(groups: Sequence[ScaleGroup], magnitude: torch.Tensor, fake_quant: FakeQuant,
                 grid: int = ALPHA_GRID) -> tuple[torch.Tensor, float, list[float]]:  # fmt: skip
    """(best scales, their alpha, the error at each alpha of the grid)."""
    errors = [output_error(groups, scales_for(magnitude, k / grid), fake_quant) for k in range(grid)]
    best = min(range(grid), key=errors.__getitem__)
    return scales_for(magnitude, best / grid), best / grid, errors
