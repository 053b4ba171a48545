"""AWQ's scale search: its error formula against the direct output error, and what the search finds
on inputs with salient channels (the case AWQ is for)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader
from mixtral_quant.loading import load_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.quant import MethodName, QuantConfig
from mixtral_quant.quant.awq import ScaleGroup, output_error, scales_for, search_scale
from mixtral_quant.quant.gptq import grouped_dequantize, rtn_quantize
from mixtral_quant.recipe import load_recipe

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
