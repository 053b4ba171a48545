"""Shared fixtures: small random Mixtral/Mistral configs and folders written by our checkpoint writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral_quant.checkpoint import iter_state, write_checkpoint
from mixtral_quant.config import MixtralConfig
from mixtral_quant.loading import new_model
from mixtral_quant.model import MixtralForCausalLM

SMALL_MIXTRAL = MixtralConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=8,
    rope_theta=10000.0,
    max_position_embeddings=256,
    initializer_range=0.1,
)
SMALL_MISTRAL = MixtralConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    sliding_window=8,
    rope_theta=10000.0,
    max_position_embeddings=256,
    initializer_range=0.1,
    moe=None,
)


def save_model(model: MixtralForCausalLM, folder: Path, max_shard_bytes: int = 5 * 1024**3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.cfg.save(folder / "config.json")
    write_checkpoint(iter_state(model), folder, max_shard_bytes=max_shard_bytes)
    return folder


@pytest.fixture(params=["mixtral", "mistral"])
def small_cfg(request: pytest.FixtureRequest) -> MixtralConfig:
    return SMALL_MIXTRAL if request.param == "mixtral" else SMALL_MISTRAL


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    return save_model(new_model(SMALL_MIXTRAL, seed=3), tmp_path / "small")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
