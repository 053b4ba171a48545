"""Checkpoint I/O: save -> load is bit-exact (single file and shards), Hub names both ways."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from conftest import SMALL_MISTRAL, SMALL_MIXTRAL, save_model
from safetensors.torch import save_file

from mixtral_quant.checkpoint import INDEX_FILE, CheckpointReader
from mixtral_quant.config import PRESETS, MixtralConfig
from mixtral_quant.loading import load_model, new_model


def test_save_load_is_bit_exact(small_cfg, tmp_path):
    model = new_model(small_cfg, seed=7, dtype=torch.bfloat16)
    folder = save_model(model, tmp_path / "m")
    loaded = load_model(folder, dtype=torch.bfloat16)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_sharded_write_has_index_and_loads_identically(tmp_path):
    model = new_model(SMALL_MIXTRAL, seed=8)
    folder = save_model(model, tmp_path / "m", max_shard_bytes=100_000)
    index = json.loads((folder / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((folder / f).is_file() for f in files)
    with CheckpointReader(folder) as r:
        assert set(r.names) == set(model.state_dict())
    loaded = load_model(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_transformers_save_pretrained_loads_in_ours(tmp_path):
    pairs = ((SMALL_MIXTRAL, transformers.MixtralForCausalLM), (SMALL_MISTRAL, transformers.MistralForCausalLM))
    for cfg, cls in pairs:
        ours = new_model(cfg, seed=9)
        folder = save_model(ours, tmp_path / cfg.model_type)
        theirs = cls.from_pretrained(folder, dtype=torch.float32)
        theirs.save_pretrained(tmp_path / f"hf-{cfg.model_type}")  # transformers 5 writes rope_parameters
        back = load_model(tmp_path / f"hf-{cfg.model_type}")
        ids = torch.randint(0, cfg.vocab_size, (1, 12))
        with torch.no_grad():
            assert torch.equal(back(ids).logits, ours(ids).logits)


def test_config_round_trip_and_presets(tmp_path):
    for name, cfg in PRESETS.items():
        cfg.save(tmp_path / f"{name}.json")
        assert MixtralConfig.load(tmp_path / f"{name}.json") == cfg
    assert PRESETS["mistral-7b"].moe is None and PRESETS["mistral-7b"].sliding_window == 4096
    mixtral = PRESETS["mixtral-8x7b"]
    assert (mixtral.hidden_size, mixtral.intermediate_size, mixtral.num_experts) == (4096, 14336, 8)


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line in /proc/self/status")


def test_get_leaves_no_mapped_pages_behind(tmp_path):
    """Reading every tensor of a 64 MiB file keeps none of its pages in the resident set: a layer by
    layer job holds the tensors it keeps, not every layer read so far."""
    tensors = {f"t{i}": torch.randn(2 << 20) for i in range(8)}
    tensors["half"] = torch.randn(3, 5).to(torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    size_kib = (tmp_path / "model.safetensors").stat().st_size // 1024
    with CheckpointReader(tmp_path) as reader:
        before = _rss_file_kib()
        for name in reader.names:
            got = reader.get(name)
            assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name])
            del got
        after = _rss_file_kib()
    assert size_kib > 60 * 1024
    assert after - before < 0.1 * size_kib
