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

:class:`AWQ` (registered as ``"awq"``) is the method: the driver (mixtral_quant/awq_layer.py) searches and
folds the scales of each layer, then the linears are rounded to nearest in the GPTQ layout. No recipe is
shipped yet: on the embedded model at 4 bits, groups of 128, it lowers round-to-nearest's KL only 5 %
(wiki-test 0.00714 against 0.00749) and not its perplexity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mixtral_quant.quant.base import QuantResult
from mixtral_quant.quant.gptq import grouped_dequantize, rtn_quantize
from mixtral_quant.quant.gptq_method import RTN

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
    s = s.to(groups[0].hessian.device) if groups else s
    for g in groups:
        for w in g.weights:
            e = w.float() - fake_quant(w.float() * s) / s
            total += g.tokens * float(((e @ g.hessian.float()) * e).sum())
    return total


def search_scale(groups: Sequence[ScaleGroup], magnitude: torch.Tensor, fake_quant: FakeQuant,
                 grid: int = ALPHA_GRID, expand: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, float, list[float]]:  # fmt: skip
    """(best scales, their alpha, the error at each alpha of the grid). ``expand`` maps the scales onto
    the linears' input channels when several channels share one (v -> o under grouped-query attention)."""
    def error(s: torch.Tensor) -> float:
        return output_error(groups, expand(s) if expand is not None else s, fake_quant)

    errors = [error(scales_for(magnitude, k / grid)) for k in range(grid)]
    best = min(range(grid), key=errors.__getitem__)
    return scales_for(magnitude, best / grid), best / grid, errors


def channel_rms(hessian: torch.Tensor) -> torch.Tensor:
    """Each input channel's root mean square from a Hessian ``2/n sum x x^T``: the magnitude the search
    raises to ``alpha`` (AWQ uses the mean absolute value; the RMS comes free with the Hessian)."""
    return (hessian.diagonal().float() / 2).clamp(min=0).sqrt()


class AWQ(RTN):
    """AWQ: input scales searched and folded into the model (see :mod:`mixtral_quant.quant.awq_fold`),
    then round-to-nearest; stored in the GPTQ layout, so it loads and exports as any GPTQ artifact.
    ``needs_hessian``: the calibration driver captures the inputs the search scores on."""

    needs_hessian = True

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` rounded onto this method's grid and back, float32."""
        q = rtn_quantize(weight, self.config)
        return grouped_dequantize(q.qint.t(), q.scales, q.zeros, q.g_idx).t()

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        result = super().quantize(weight)
        return QuantResult(result.tensors, {**result.info, "method": "awq"})

    quantize_widened = quantize
