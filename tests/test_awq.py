"""AWQ's scale search: its error formula against the direct output error, and what the search finds
on inputs with salient channels (the case AWQ is for)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader
from mixtral_quant.loading import load_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.quant import MethodName, QuantConfig, get_method
from mixtral_quant.quant.awq import CLIP_RATIOS, ScaleGroup, clip_ratios, output_error, scales_for, search_scale
from mixtral_quant.quant.gptq import grouped_dequantize, rtn_quantize
from mixtral_quant.quant.gptq_method import dequantize_checkpoint
from mixtral_quant.recipe import load_recipe

CFG = QuantConfig.of(MethodName.RTN, bits=4, group_size=128, sym=False)


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


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights with a few large values per group, as trained LLM weights have (a normal over the root
    of a uniform: heavier tails than a normal)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) / torch.rand(rows, cols, generator=gen).clamp(min=0.05).sqrt()


@pytest.mark.parametrize("sym", [True, False])
def test_clip_ratio_minimises_each_groups_output_error(sym: bool) -> None:
    """Each group's clipping ratio is the one of the grid whose round-to-nearest output error on the
    tokens themselves, ||X_g (w_g - q_g)||^2, is smallest: checked by quantizing the whole weight at
    every ratio and measuring each group's error from the activations (not from the Hessian)."""
    cfg = QuantConfig.of(MethodName.RTN, bits=4, group_size=64, sym=sym)
    w, x = heavy_tailed(48, 192, 5), salient_inputs(400, 192, 6)
    picked = clip_ratios(w, x.T @ x / 400, cfg)
    errors = []
    for r in CLIP_RATIOS:
        q = rtn_quantize(w, cfg, torch.full((48, 3), r))
        e = (w - grouped_dequantize(q.qint.t(), q.scales, q.zeros, q.g_idx).t()).view(48, 3, 64)
        errors.append(torch.stack([((x[:, k * 64 : (k + 1) * 64] @ e[:, k].T) ** 2).sum(0) for k in range(3)], 1))
    err = torch.stack(errors)  # [ratios, O, G]
    index = (picked[None] - torch.tensor(CLIP_RATIOS)[:, None, None]).abs().argmin(0)  # each pick's grid point
    torch.testing.assert_close(err.gather(0, index[None])[0], err.min(0).values, rtol=1e-4, atol=0)
    assert 0.2 < float((picked < 1).float().mean()) < 1.0  # heavy tails: most groups clip, not all
    assert float(err.min(0).values.sum()) < 0.9 * float(err[0].sum())  # clipping cuts RTN's output error


def test_awq_quantize_clips_with_a_hessian_and_rounds_without() -> None:
    """``AWQ.quantize`` stores round-to-nearest with the searched clipping; without a Hessian (an expert
    no token reached) the bytes of plain round-to-nearest, with the reason noted."""
    cfg = QuantConfig.of(MethodName.AWQ, bits=4, group_size=128, sym=True)
    w, x = heavy_tailed(64, 256, 7), salient_inputs(300, 256, 8)
    h = 2 * x.T @ x / 300
    got = get_method(cfg).quantize(w, h)
    want = rtn_quantize(w, cfg, clip_ratios(w, h, cfg))
    want_w = grouped_dequantize(want.qint.t(), want.scales, want.zeros, want.g_idx).t()
    torch.testing.assert_close(dequantize_checkpoint(got.tensors, 4), want_w, rtol=0, atol=0)
    bare = get_method(cfg).quantize(w)
    plain = get_method(QuantConfig.of(MethodName.RTN, bits=4, group_size=128, sym=True)).quantize(w)
    assert bare.info["fallback"] == "no Hessian"
    assert all(torch.equal(bare.tensors[k], plain.tensors[k]) for k in plain.tensors)


def test_awq_artifact_stores_its_folds(tmp_path: Path) -> None:
    """A recipe naming method "awq" quantizes the embedded model with scales folded at every point: the
    stored post-attention norm and router keep their product (the router's logits) up to bf16 rounding
    while each differs from the source; the input norm too changed where alpha > 0; every folding
    point's alpha is in calibration.json; the artifact is GPTQ's layout and loads."""
    recipe = tmp_path / "awq.toml"
    recipe.write_text('name = "awq"\n[quant]\nmethod = "awq"\nbits = 4\ngroup_size = 128\n'
                      '[calibration]\nsamples = 4\nseq_len = 64\n')
    art = quantize_model(DEFAULT_MODEL, load_recipe(recipe), tmp_path / "awq", progress=False)
    src, out = CheckpointReader(DEFAULT_MODEL), CheckpointReader(art)
    cal = json.loads((art / "calibration.json").read_text())
    assert json.loads((art / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    for i in range(4):
        p = f"model.layers.{i}."
        assert len([k for k in cal["awq_alpha"] if k.startswith(p)]) == 3 + 8
        g0, g1 = (r.get(p + "post_attention_layernorm.weight").float() for r in (src, out))
        w0, w1 = (r.get(p + "block_sparse_moe.gate.weight").float() for r in (src, out))
        assert not torch.equal(g0, g1) and not torch.equal(w0, w1)
        torch.testing.assert_close(w1 * g1, w0 * g0, rtol=2e-2, atol=1e-4)
        if cal["awq_alpha"][p + "input_layernorm"] > 0:
            assert not torch.equal(src.get(p + "input_layernorm.weight"), out.get(p + "input_layernorm.weight"))
    assert load_model(art, dtype=torch.float32) is not None
