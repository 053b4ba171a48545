"""The embedded tiny Mixtral: Mixtral-8x7B's architecture scaled down, stored as the real checkpoints are,
and a model whose router uses every expert (measured here, not read from its report)."""

from __future__ import annotations

import hashlib
import json

import torch

from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader, load_config
from mixtral_quant.eval.data import load_dataset
from mixtral_quant.loading import load_model

TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"  # Mixtral-8x7B's


def test_shipped_model_is_mixtral_scaled_down() -> None:
    cfg = load_config(DEFAULT_MODEL)
    raw = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg.moe is not None and (cfg.moe.num_local_experts, cfg.moe.num_experts_per_tok) == (8, 2)
    assert cfg.n_rep == 4 and cfg.head_dim >= 32 and cfg.num_hidden_layers >= 4 and cfg.hidden_size >= 256
    assert cfg.intermediate_size % 256 == 0 and cfg.intermediate_size >= 2 * cfg.hidden_size
    assert raw["sliding_window"] is None and raw["rope_theta"] == 1e6  # as Mixtral-8x7B's config.json
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 80e6
    with CheckpointReader(DEFAULT_MODEL) as reader:
        assert {reader.dtype(n) for n in reader.names} == {"BF16"}
    assert hashlib.sha256((DEFAULT_MODEL / "tokenizer.model").read_bytes()).hexdigest() == TOKENIZER_SHA256


@torch.no_grad()
def test_shipped_model_routes_tokens_to_every_expert() -> None:
    """On the head of wiki-test every expert of every layer takes at least 1 % of the top-2 slots
    (REPORT.md gives the shares over all of wiki-test, where the bar is 2 %), and the report's table
    adds up to the slots it claims."""
    model = load_model(DEFAULT_MODEL)
    assert model.cfg.moe is not None
    tokens = load_dataset("wiki-test").tokens[: 8 * 512]
    experts = model.cfg.moe.num_local_experts
    counts = torch.zeros(model.cfg.num_hidden_layers, experts, dtype=torch.int64)
    for w in range(8):
        out = model(tokens[w * 512 : (w + 1) * 512][None], output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            counts[i] += torch.bincount(logits.topk(2).indices.flatten(), minlength=experts)
    share = counts / counts.sum(1, keepdim=True)
    assert share.min() >= 0.01, share
    report = json.loads((DEFAULT_MODEL / "report.json").read_text())
    table = torch.tensor(report["tokens_per_expert"])
    assert (table.sum(1) == 2 * report["router_tokens"]).all()
    assert abs((table / table.sum(1, keepdim=True)).min().item() - report["min_expert_share"]) < 1e-9
