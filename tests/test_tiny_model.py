"""The embedded tiny Mixtral: Mixtral-8x7B's architecture scaled down, stored as the real checkpoints are,
and a REPORT.md whose routing table is the model's (counted again here, not read back)."""

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
def test_report_routing_table_is_the_models() -> None:
    """REPORT.md's tokens per expert (top-2 slots over all of wiki-test, windows of 512) are what the
    shipped model's router does, counted again here; its smallest share is the table's, and every expert
    of every layer gets at least 2 % of the slots (uniform is 12.5 %)."""
    model = load_model(DEFAULT_MODEL)
    assert model.cfg.moe is not None
    report = json.loads((DEFAULT_MODEL / "report.json").read_text())
    ctx = report["ctx"]
    tokens = load_dataset("wiki-test").tokens
    counts = torch.zeros(model.cfg.num_hidden_layers, model.cfg.moe.num_local_experts, dtype=torch.int64)
    for w in range((len(tokens) - 1) // ctx):
        out = model(tokens[w * ctx : (w + 1) * ctx][None], output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            counts[i] += torch.bincount(logits.topk(2).indices.flatten(), minlength=counts.shape[1])
    table = torch.tensor(report["tokens_per_expert"])
    assert (table.sum(1) == 2 * report["router_tokens"]).all() and (counts.sum(1) == table.sum(1)).all()
    # the same up to near-ties in top-2 that another thread count may break the other way
    assert (counts - table).abs().sum() <= 1e-4 * table.sum(), (counts, table)
    assert abs((table.double() / table.sum(1, keepdim=True)).min().item() - report["min_expert_share"]) < 1e-12
    assert (counts / counts.sum(1, keepdim=True)).min() >= 0.02
