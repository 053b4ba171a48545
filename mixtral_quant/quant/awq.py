"""AWQ's per-channel scale search (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", 2023, section 3.2), in the form the layer-sequential driver can use:
from the Hessians it captures anyway, not from stored activations.

For the linears that read one folding point (q/k/v after the input norm; the router and every expert's
w1/w3 after the post-attention norm; an expert's w2 after its w3) the input channels are scaled by
``s = m ** alpha`` (``m``: each input channel's root mean square over the calibration tokens, from the
Hessian's diagonal; AWQ takes the mean absolute value), normalised so that ``max(s) * min(s) == 1``,
for ``alpha`` on a grid in [0, 1). Each candidate is scored by the output error of the quantized,
scaled weights on the calibration inputs,

    err(s) = sum over groups k of  n_k * trace(E_k H_k E_k^T),   E_k = W_k - Q(W_k diag(s)) diag(s)^-1,

with ``H_k`` the mean of ``x x^T`` over the tokens group ``k`` sees and ``n_k`` their number. For
Mixtral's experts a group is one expert with the tokens the router sends it, so each expert's error
counts in proportion to its tokens: a rarely used expert cannot pull the shared scale of the
post-attention norm toward itself. ``alpha = 0`` (no scaling) is on the grid, so the scale found never
scores worse than none.

:class:`AWQ` (``awq``) is the method: the driver (mixtral_quant/awq_layer.py) searches and folds the
scales of each layer, then every group's range is clipped (:func:`clip_ratios`, AWQ's ``auto_clip``
scored on the Hessian) and the linears rounded to nearest in the GPTQ layout. :class:`AWQGPTQ`
(``awq-gptq``) folds the same scales, then runs GPTQ. On the embedded model at 4 bits, groups of 128,
AWQ has 0.80x round-to-nearest's KL on wiki-test and on a held-out novel; with GPTQ the scales change
little (README, "AWQ").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mixtral_quant.quant.base import ROW_BAND, QuantConfig, QuantResult
from mixtral_quant.quant.gptq import (
    gptq_options,
    group_grid,
    grouped_dequantize,
    quantize_codes,
    rtn_quantize,
    unusable_hessian,
)
from mixtral_quant.quant.gptq_method import GPTQ, RTN, check_weight, rtn_checkpoint

FakeQuant = Callable[[torch.Tensor], torch.Tensor]  # float [O, I] -> its quantized-and-dequantized float
ALPHA_GRID = 20  # AWQ's n_grid: alpha in 0, 0.05, ..., 0.95
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # AWQ's auto_clip: n_grid 20, max_shrink 0.5: 1 .. 0.55


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


def clip_ratios(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig,
                ratios: Sequence[float] = CLIP_RATIOS) -> torch.Tensor:  # fmt: skip
    """float32 ``[O, G]``: for each output row and group of ``weight [O, I]``, the ratio (of
    ``ratios``) by which to shrink the group's range that minimises the group's output error
    ``e H_k e^T`` (``e`` the group's rounding error, ``H_k`` its inputs' diagonal block of the
    Hessian): AWQ's ``auto_clip``, scored on the Hessian instead of stored activations. Ratio 1
    (no clipping) comes first and wins ties. ``ROW_BAND`` rows are widened at a time."""
    out_features, in_features = weight.shape
    g = cfg.group_size_for(in_features)
    groups = in_features // g
    h = hessian.float().to(weight.device)
    blocks = torch.stack([h[k * g : (k + 1) * g, k * g : (k + 1) * g] for k in range(groups)])  # [G, g, g]
    best_ratio = torch.ones(out_features, groups, device=weight.device)
    for start in range(0, out_features, ROW_BAND):
        w = weight[start : start + ROW_BAND].float().view(-1, groups, g)  # [B, G, g]
        best = torch.full(w.shape[:2], float("inf"), device=weight.device)
        pick = best_ratio[start : start + ROW_BAND]
        for r in ratios:
            scale, zero = group_grid(w, cfg.bits, gptq_options(cfg).sym, r)
            deq = (quantize_codes(w, scale[..., None], zero[..., None], cfg.bits) - zero[..., None]) * scale[..., None]
            e = (w - deq).transpose(0, 1)  # [G, B, g]
            err = (torch.bmm(e, blocks) * e).sum(-1).t()  # [B, G]
            better = err < best
            best = torch.where(better, err, best)
            pick.masked_fill_(better, r)
    return best_ratio


class _ScaleSearch:
    """What the calibration driver looks for to search and fold AWQ's scales (mixtral_quant/awq_layer.py):
    ``fake_quant``, the rounding the search scores scales with (round-to-nearest on the method's grid)."""

    config: QuantConfig

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` rounded onto this method's grid and back, float32."""
        q = rtn_quantize(weight, self.config)
        return grouped_dequantize(q.qint.t(), q.scales, q.zeros, q.g_idx).t()


class AWQGPTQ(_ScaleSearch, GPTQ):
    """AWQ's scales searched and folded as for :class:`AWQ`, then GPTQ on the scaled weights against the
    Hessians of the folded layer's inputs. No clipping search: on the embedded model, clipping GPTQ's
    static grids by :func:`clip_ratios` raised its KL 10 % (wiki-test 0.00242 against 0.00217)."""

    def quantize_stacked(self, weights: list[torch.Tensor], hessian: torch.Tensor | None) -> list[QuantResult]:
        return [QuantResult(r.tensors, {**r.info, "method": "awq-gptq"}) if r.info["method"] == "gptq" else r
                for r in super().quantize_stacked(weights, hessian)]


class AWQ(_ScaleSearch, RTN):
    """AWQ: input scales searched and folded into the model (see :mod:`mixtral_quant.quant.awq_fold`),
    then each group's range clipped by :func:`clip_ratios` and round-to-nearest; stored in the GPTQ
    layout, so it loads and exports as any GPTQ artifact. ``needs_hessian``: the calibration driver
    captures the inputs the searches score on."""

    needs_hessian = True

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        """Round-to-nearest of the (already scaled) ``weight``, each group's range clipped by
        :func:`clip_ratios` on ``hessian``; without a usable one (an expert no token reached) plain
        round-to-nearest, with the reason in ``info["fallback"]``."""
        check_weight(weight, self.config)
        reason = unusable_hessian(hessian)
        if reason is not None or hessian is None:
            tensors, info = rtn_checkpoint(weight, self.config)
            return QuantResult(tensors, {"method": "awq", "fallback": reason or "no Hessian", **info})
        clip = clip_ratios(weight, hessian, self.config)
        tensors, info = rtn_checkpoint(weight, self.config, clip)
        return QuantResult(tensors, {"method": "awq", **info})

    quantize_widened = quantize
