"""KV-cache decode equals full prefill; a left-padded batch equals its rows run alone."""

from __future__ import annotations

import pytest
import torch

from mixtral_quant.cache import KVCache
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.loading import new_model


@torch.no_grad()
def test_decode_equals_prefill(small_cfg):
    model = new_model(small_cfg, seed=1)
    ids = torch.randint(0, small_cfg.vocab_size, (2, 30))  # crosses the sliding window
    full = model(ids).logits
    cache = KVCache(small_cfg, 2, 30)
    steps = [model(ids[:, :10], cache=cache).logits]
    for t in range(10, 30):
        steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone(small_cfg):
    model = new_model(small_cfg, seed=2)
    a = torch.randint(0, small_cfg.vocab_size, (20,))
    b = torch.randint(0, small_cfg.vocab_size, (13,))
    pad = 20 - 13
    ids = torch.stack([a, torch.cat([torch.zeros(pad, dtype=torch.long), b])])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :pad] = 0
    cache = KVCache(small_cfg, 2, 26)
    batch = model(ids, attention_mask=mask, cache=cache).logits
    assert torch.allclose(batch[0], model(a[None]).logits[0], atol=1e-5)
    assert torch.allclose(batch[1, pad:], model(b[None]).logits[0], atol=1e-5)
    # decode 6 more tokens for both rows through the cache
    nxt = torch.randint(0, small_cfg.vocab_size, (2, 6))
    for t in range(6):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(nxt[:, t : t + 1], attention_mask=mask, cache=cache).logits
        ra = model(torch.cat([a, nxt[0, : t + 1]])[None]).logits[0, -1]
        rb = model(torch.cat([b, nxt[1, : t + 1]])[None]).logits[0, -1]
        assert torch.allclose(step[0, -1], ra, atol=1e-5)
        assert torch.allclose(step[1, -1], rb, atol=1e-5)


def test_cache_overflow_is_a_clear_error(small_cfg):
    model = new_model(small_cfg)
    cache = KVCache(small_cfg, 1, 4)
    with pytest.raises(MixtralQuantError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
