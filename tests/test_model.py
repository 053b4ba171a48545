"""Our model against transformers' MixtralForCausalLM / MistralForCausalLM on the same weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import SMALL_MIXTRAL, save_model

from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.loading import load_model, new_model
from mixtral_quant.model import load_balancing_loss, route

HF = {"mixtral": transformers.MixtralForCausalLM, "mistral": transformers.MistralForCausalLM}


def hf_model(folder: Path, model_type: str) -> torch.nn.Module:
    return HF[model_type].from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


@torch.no_grad()
def test_logits_equal_transformers(small_cfg, tmp_path):
    ours = new_model(small_cfg, seed=1)
    folder = save_model(ours, tmp_path / "m")
    theirs = hf_model(folder, small_cfg.model_type)
    ids = torch.randint(0, small_cfg.vocab_size, (2, 40))  # 40 > sliding window 8
    diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4


@torch.no_grad()
def test_left_padded_logits_equal_transformers(small_cfg, tmp_path):
    ours = new_model(small_cfg, seed=2)
    theirs = hf_model(save_model(ours, tmp_path / "m"), small_cfg.model_type)
    ids = torch.randint(0, small_cfg.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    a = ours(ids, attention_mask=mask).logits
    b = theirs(ids, attention_mask=mask).logits
    assert (a[0] - b[0]).abs().max() <= 1e-4
    assert (a[1, 7:] - b[1, 7:]).abs().max() <= 1e-4


@torch.no_grad()
def test_shipped_tiny_model_equals_transformers():
    ours = load_model(DEFAULT_MODEL)
    theirs = hf_model(DEFAULT_MODEL, "mixtral")
    length = (ours.cfg.sliding_window or 256) + 64  # past the window when the model has one
    ids = torch.randint(0, ours.cfg.vocab_size, (1, length))
    assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-4


@torch.no_grad()
def test_grouped_expert_dispatch_equals_per_token_formula():
    model = new_model(SMALL_MIXTRAL, seed=4)
    moe = model.model.layers[0].block_sparse_moe
    x = torch.randn(3, 11, SMALL_MIXTRAL.hidden_size)
    out, logits = moe(x)
    flat = x.reshape(-1, x.shape[-1])
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        probs = F.softmax(logits[t], dim=-1)
        top = probs.topk(2)
        w = top.values / top.values.sum()
        for k in range(2):
            e = moe.experts[int(top.indices[k])]
            expected[t] += w[k] * (e.w2(F.silu(e.w1(flat[t])) * e.w3(flat[t])))
    assert torch.allclose(out.reshape(-1, x.shape[-1]), expected, atol=1e-6)


def test_routing_weights_sum_to_one():
    w, e = route(torch.randn(10, 8), 2)
    assert torch.allclose(w.sum(-1), torch.ones(10))
    assert e.shape == (10, 2)


@torch.no_grad()
def test_aux_loss_equals_transformers():
    logits = [torch.randn(30, 8), torch.randn(30, 8)]
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    expected = load_balancing_loss_func(tuple(logits), 8, 2)
    assert torch.allclose(load_balancing_loss(logits, 2), expected, atol=1e-6)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, :4] = 0
    expected_masked = load_balancing_loss_func(tuple(logits), 8, 2, mask)
    assert torch.allclose(load_balancing_loss(logits, 2, mask), expected_masked, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs_close_to_fp32(dtype):
    cfg = replace(SMALL_MIXTRAL, initializer_range=0.02)
    model = new_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    ref = model(ids).logits
    half = model.to(dtype)(ids).logits
    assert half.dtype == dtype
    assert (half.float() - ref).abs().max() < 0.05 * ref.abs().max()
