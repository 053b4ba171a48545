"""Baseline-vs-variant comparison: identity gives zero, a perturbed copy matches direct formulas."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mixtral_quant.config import PRESETS, MixtralConfig, MoEArgs
from mixtral_quant.eval.compare import Comparison, compare
from mixtral_quant.eval.perplexity import plan_windows, window_outputs
from mixtral_quant.model import MixtralForCausalLM

SMALL = replace(
    PRESETS["tiny"],
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=24,
    moe=MoEArgs(num_local_experts=4, num_experts_per_tok=2),
)
IDS = torch.randint(0, SMALL.vocab_size, (150,), generator=torch.Generator().manual_seed(3))
WINDOWS = plan_windows(len(IDS), 48, 32)


def small_model(cfg: MixtralConfig = SMALL) -> MixtralForCausalLM:
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def perturbed(model: MixtralForCausalLM, scale: float = 0.05) -> MixtralForCausalLM:
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return other


def run(base: MixtralForCausalLM, var: MixtralForCausalLM, layer_sequential: bool = False) -> Comparison:
    moe = base.cfg.moe
    b, v = (window_outputs(m, IDS, WINDOWS, "cpu", layer_sequential, router_logits=True) for m in (base, var))
    return compare(b, v, top_k=moe.num_experts_per_tok if moe else None)


@torch.no_grad()
def direct(base: MixtralForCausalLM, var: MixtralForCausalLM) -> tuple[float, float, list[float], int]:
    """KL, top-1 change and router agreement computed straight from the two models' outputs."""
    kl, changed, n = 0.0, 0, 0
    agree = [0] * base.cfg.num_hidden_layers
    for w in WINDOWS:
        ids = IDS[w.begin : w.end][None]
        ob, ov = base(ids, output_router_logits=True), var(ids, output_router_logits=True)
        rows = slice(w.score_from - 1 - w.begin, w.end - 1 - w.begin)
        logp, logq = F.log_softmax(ob.logits[0, rows], -1), F.log_softmax(ov.logits[0, rows], -1)
        kl += float(F.kl_div(logq, logp, log_target=True, reduction="sum"))  # sum p (log p - log q)
        changed += int((logp.argmax(-1) != logq.argmax(-1)).sum())
        n += logp.shape[0]
        for layer, (rb, rv) in enumerate(zip(ob.router_logits, ov.router_logits, strict=True)):
            for tb, tv in zip(rb[rows], rv[rows], strict=True):
                agree[layer] += set(tb.topk(2).indices.tolist()) == set(tv.topk(2).indices.tolist())
    return kl / n, changed / n, [a / n for a in agree], n


def test_model_against_itself() -> None:
    model = small_model()
    result = run(model, model)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-7)
    assert result.top1_changed == 0.0
    assert result.router_agreement == [1.0, 1.0]
    assert result.tokens == sum(w.n_scored for w in WINDOWS)


def test_perturbed_copy_matches_direct_formula() -> None:
    base = small_model()
    var = perturbed(base)
    result = run(base, var)
    kl, changed, agree, n = direct(base, var)
    assert result.kl_mean > 1e-4
    assert result.kl_mean == pytest.approx(kl, rel=1e-5)
    assert result.top1_changed == pytest.approx(changed)
    assert result.router_agreement == pytest.approx(agree)
    assert result.tokens == n
    assert result.router_agreement is not None and min(result.router_agreement) < 1.0  # the noise moves routing
    assert run(base, perturbed(base, 0.2)).kl_mean > result.kl_mean


def test_layer_sequential_comparison_equals_plain() -> None:
    base = small_model()
    var = perturbed(base)
    plain, layered = run(base, var), run(base, var, layer_sequential=True)
    assert layered.kl_mean == pytest.approx(plain.kl_mean, rel=1e-5)
    assert layered.top1_changed == plain.top1_changed
    assert layered.router_agreement == plain.router_agreement


def test_dense_model_has_no_router_agreement() -> None:
    base = small_model(replace(SMALL, moe=None))
    result = run(base, perturbed(base))
    assert result.router_agreement is None and result.min_router_agreement is None
    assert result.kl_mean > 0
