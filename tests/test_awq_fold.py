"""AWQ's scale folding leaves the float model's function unchanged: the embedded model with random
positive scales folded at every point (input norm -> q/k/v, post-attention norm -> router and every
expert's w1/w3, each expert's w3 -> w2, v -> o) gives the same logits and routes every calibration
token to the same experts."""

from __future__ import annotations

import pytest
import torch

from mixtral_quant.calibrate import calibration_tokens
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.errors import ConfigError
from mixtral_quant.loading import load_model
from mixtral_quant.model import MixtralForCausalLM
from mixtral_quant.quant.awq_fold import fold_norm, fold_up_down, fold_value_output
from mixtral_quant.recipe import load_recipe
from mixtral_quant.tokenizer import Tokenizer


def run(model: MixtralForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and, per layer, the router's top-2 experts of every token."""
    picks: list[torch.Tensor] = []
    hooks = [layer.block_sparse_moe.gate.register_forward_hook(
                 lambda _m, _i, out: picks.append(out.topk(2, dim=-1).indices.sort(dim=-1).values))
             for layer in model.model.layers if layer.block_sparse_moe is not None]  # fmt: skip
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, picks


def test_folded_model_computes_the_same_function() -> None:
    model = load_model(DEFAULT_MODEL, dtype=torch.float32)
    cfg = model.cfg
    ids = calibration_tokens(load_recipe("gptq-w4g128", samples=4, seq_len=128), Tokenizer(DEFAULT_MODEL))
    before, routed = run(model, ids)
    gen = torch.Generator().manual_seed(0)

    def scales(n: int) -> torch.Tensor:
        return torch.exp(torch.randn(n, generator=gen))  # about e^-3 .. e^3, as AWQ's searched scales span

    for layer in model.model.layers:
        attn, moe = layer.self_attn, layer.block_sparse_moe
        assert moe is not None
        fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], scales(cfg.hidden_size))
        fold_value_output(attn, scales(cfg.num_key_value_heads * cfg.head_dim))
        experts = list(moe.experts)
        fold_norm(layer.post_attention_layernorm, [moe.gate, *(e.w1 for e in experts), *(e.w3 for e in experts)],
                  scales(cfg.hidden_size))
        for expert in experts:
            fold_up_down(expert, scales(cfg.intermediate_size))
    after, rerouted = run(model, ids)
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()  # measured 1.4e-5 of logits up to 17.6
    assert all(torch.equal(a, b) for a, b in zip(routed, rerouted, strict=True))


def test_scales_must_fit_and_be_positive() -> None:
    model = load_model(DEFAULT_MODEL, dtype=torch.float32)
    layer = model.model.layers[0]
    with pytest.raises(ConfigError, match="vector of"):
        fold_norm(layer.input_layernorm, [layer.self_attn.q_proj], torch.ones(3))
    with pytest.raises(ConfigError, match="positive"):
        fold_value_output(layer.self_attn, torch.zeros(model.cfg.num_key_value_heads * model.cfg.head_dim))
