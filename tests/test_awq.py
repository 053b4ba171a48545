"""AWQ's scale search: its error formula against the direct output error, and what the search finds
on inputs with salient channels (the case AWQ is for)."""

from __future__ import annotations

import torch

from mixtral_quant.quant import MethodName, QuantConfig
from mixtral_quant.quant.awq import ScaleGroup, output_error, scales_for, search_scale
from mixtral_quant.quant.gptq import grouped_dequantize, rtn_quantize

CFG = QuantConfig(MethodName.RTN, bits=4, group_size=128, sym=False)


def rtn(w: torch.Tensor) -> torch.Tensor:
    q = rtn_quantize(w, CFG)
    return grouped_dequantize(q.qint.t(), q.scales, q.zeros, q.g_idx).t()


def salient_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Activations whose first 1 % of channels are 30x larger, as LLM activations have outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=gen)
    x[:, : width // 100 + 1] *= 30
    return x


def test_error_from_the_hessian_is_the_output_error() -> None:
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(64, 256, generator=gen), torch.randn(32, 256, generator=gen)
    xa, xb = salient_inputs(300, 256, 1), salient_inputs(100, 256, 2)
    s = scales_for(xa.abs().mean(0), 0.5)
    groups = [ScaleGroup([w1, w2], xa.T @ xa / 300, 300), ScaleGroup([w1], xb.T @ xb / 100, 100)]
    direct = 0.0
    for ws, x in (([w1, w2], xa), ([w1], xb)):
        for w in ws:
            direct += float(((x @ w.T - (x / s) @ rtn(w * s).T) ** 2).sum())
    assert abs(output_error(groups, s, rtn) - direct) <= 1e-4 * direct


def test_scales_are_normalised_and_alpha_zero_is_none() -> None:
    m = torch.tensor([0.01, 1.0, 5.0, 200.0])
    s = scales_for(m, 0.7)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0)) and torch.equal(scales_for(m, 0.0), torch.ones(4))
    assert torch.allclose(s[1:] / s[:-1], (m[1:] / m[:-1]) ** 0.7)


def test_search_protects_salient_channels() -> None:
    """With 1 % of input channels 30x larger, the search scales them up and cuts the output error of
    round-to-nearest by more than half against no scaling (alpha 0, the grid's first point)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(128, 512, generator=gen)
    x = salient_inputs(512, 512, 4)
    groups = [ScaleGroup([w], x.T @ x / 512, 512)]
    s, alpha, errors = search_scale(groups, x.abs().mean(0), rtn)
    assert alpha > 0 and errors[round(alpha * 20)] == min(errors) < 0.5 * errors[0]
    assert float(s[:6].min()) > float(s[6:].max())  # the salient channels got the largest scales
