"""Sliding-window perplexity: uniform logits, agreement with transformers, layer-sequential == plain."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mixtral_quant.config import PRESETS, MixtralConfig, MoEArgs
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.eval.data import WIKI_TEST, encode, load_dataset
from mixtral_quant.eval.perplexity import (
    forward_windows,
    forward_windows_layerwise,
    model_perplexity,
    plan_windows,
)
from mixtral_quant.model import MixtralForCausalLM

TINY_MODEL = Path(__file__).resolve().parents[1] / "mixtral_quant" / "assets" / "tiny-mixtral"
SMALL = replace(
    PRESETS["tiny"],
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=24,
    moe=MoEArgs(num_local_experts=4, num_experts_per_tok=2),
)


def small_model(cfg: MixtralConfig = SMALL, seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # default nn.Linear init barely moves the embeddings: make layers and head matter
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
        model.lm_head.weight.mul_(4.0)
    return model


def tokens(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def to_transformers(model: MixtralForCausalLM):  # -> transformers.MixtralForCausalLM
    """The same weights in transformers 5's Mixtral (fused experts in memory), eager attention."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.MixtralConfig(**model.cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    ours = {k: v.float() for k, v in model.state_dict().items()}
    state = {}
    for i in range(model.cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        n_experts = model.cfg.num_experts
        w1, w2, w3 = ([ours.pop(f"{pre}block_sparse_moe.experts.{e}.{w}.weight") for e in range(n_experts)]
                      for w in ("w1", "w2", "w3"))  # fmt: skip
        state[pre + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(w1, w3, strict=True)])
        state[pre + "mlp.experts.down_proj"] = torch.stack(w2)
        state[pre + "mlp.gate.weight"] = ours.pop(pre + "block_sparse_moe.gate.weight")
    hf.load_state_dict(state | ours, strict=True)
    return hf


@torch.no_grad()
def hf_guide_perplexity(hf, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of the Hugging Face perplexity guide, counting the labels the shift keeps."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = len(ids)
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        n_valid = int((target[:, 1:] != -100).sum())
        loss = hf(input_ids=input_ids, labels=target).loss
        nll_sum += float(loss) * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def test_windows_score_every_token_once() -> None:
    for n, ctx, stride in [(300, 64, 32), (300, 64, None), (130, 64, 64), (10, 64, 7), (2, 2, 1)]:
        windows = plan_windows(n, ctx, stride)
        scored = [t for w in windows for t in range(w.score_from, w.end)]
        assert all(w.end - w.begin <= ctx and w.score_from > w.begin for w in windows)
        if stride is not None and stride < ctx:
            assert scored == list(range(1, n))  # overlapping windows score every token but BOS once
        else:  # without overlap, each window's first token has no context and is not scored
            assert scored == [t for t in range(1, n) if t % ctx]
    with pytest.raises(MixtralQuantError):
        plan_windows(100, 64, 65)


def test_uniform_logits_give_vocab_size() -> None:
    model = small_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = model_perplexity(model, tokens(200, SMALL.vocab_size), ctx=64, stride=48)
    assert result.ppl == pytest.approx(SMALL.vocab_size, rel=1e-5)
    assert result.tokens_scored == 199 and result.stride == 48


@pytest.mark.parametrize("stride", [16, 64])
def test_matches_transformers_on_random_model(stride: int) -> None:
    model = small_model()
    ids = tokens(200, SMALL.vocab_size)
    ppl, n = hf_guide_perplexity(to_transformers(model), ids, 64, stride)
    ours = model_perplexity(model, ids, ctx=64, stride=stride)
    assert ours.tokens_scored == n
    assert ours.ppl == pytest.approx(ppl, rel=1e-4)


def test_dense_mistral_runs() -> None:
    model = small_model(replace(SMALL, moe=None))
    result = model_perplexity(model, tokens(100, SMALL.vocab_size), ctx=32)
    assert math.isfinite(result.ppl) and result.windows == 4


def test_matches_transformers_on_trained_tiny_model() -> None:
    from mixtral_quant.loading import load_model

    model = load_model(TINY_MODEL)
    ids = load_dataset("wiki-test", TINY_MODEL / "tokenizer.model").tokens[:1100]
    ppl, n = hf_guide_perplexity(to_transformers(model), ids, 512, 256)
    ours = model_perplexity(model, ids, ctx=512, stride=256)
    assert ours.tokens_scored == n == 1099
    assert ours.ppl == pytest.approx(ppl, rel=1e-4)
    assert ours.ppl < 2409.33  # a trained model beats the unigram baseline of calibration/corpora/PROVENANCE.md


@pytest.mark.parametrize("spill", [False, True])
def test_layer_sequential_equals_plain(tmp_path: Path, spill: bool) -> None:
    model = small_model()
    ids = tokens(230, SMALL.vocab_size)
    windows = plan_windows(len(ids), 64, 40)
    plain = list(forward_windows(model, ids, windows, "cpu", router_logits=True))
    from mixtral_quant.eval.perplexity import ModelLayers

    layered = list(
        forward_windows_layerwise(ModelLayers(model), ids, windows, "cpu", True, tmp_path if spill else None)
    )
    for a, b in zip(plain, layered, strict=True):
        assert a.window == b.window
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
        for ra, rb in zip(a.router_logits, b.router_logits, strict=True):
            torch.testing.assert_close(ra, rb, rtol=0, atol=1e-5)
    p = model_perplexity(model, ids, ctx=64, stride=40)
    q = model_perplexity(model, ids, ctx=64, stride=40, layer_sequential=True)
    assert q.ppl == pytest.approx(p.ppl, rel=1e-6) and q.tokens_scored == p.tokens_scored
    assert q.layer_sequential and not p.layer_sequential


def test_wikitext2_without_datasets_library_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MixtralQuantError, match=r"pip install datasets.*--dataset wiki-test"):
        load_dataset("wikitext2")


def test_datasets(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("= Title =\nHello world.\n")
    ds = load_dataset(text)
    assert ds.tokens[0] == 1 and ds.tokens.tolist() == encode("= Title =\nHello world.\n", Path(ds.tokenizer)).tolist()
    assert ds.name == "t.txt" and len(ds.sha256) == 64
    assert WIKI_TEST.is_file()
    with pytest.raises(MixtralQuantError, match="wiki-test"):
        load_dataset("nonsense")
    with pytest.raises(MixtralQuantError):
        load_dataset(tmp_path / "missing.txt")
