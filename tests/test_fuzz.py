"""Fuzzing the readers of user input: a mutated config.json, index, safetensors header or recipe
fails with the project's error (one line in the CLI) or parses into a well-typed value, never with
a stray TypeError, ZeroDivisionError, OverflowError or RecursionError.

Bounded: about 100 examples per property and no deadline, so the file runs in seconds.
"""

from __future__ import annotations

import json
import math
import struct
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import torch
from conftest import SMALL_MISTRAL, SMALL_MIXTRAL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from mixtral_quant.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader
from mixtral_quant.config import MixtralConfig, read_config_json
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.recipe import RECIPES, Recipe, load_recipe, parse_recipe

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values of every type, small ints near the edges (0, -1) and huge ones, NaN and infinities.
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
)
JSON = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                    max_leaves=6)
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings")


def _expect_project_error(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn's result, or None when it raised the project's error; anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except MixtralQuantError as e:
        assert str(e) and "\n" not in str(e), f"error message is not one line: {e!r}"
        return None


# -- config.json --------------------------------------------------------------------------------
BASES = [SMALL_MIXTRAL.to_hf_dict(), SMALL_MISTRAL.to_hf_dict()]
CONFIG_KEYS = sorted(set(BASES[0]) | {"rope_scaling", "rope_parameters", "dtype", "head_dim"})


def _rope(value: Any) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": value}


@FUZZ
@given(
    base=st.sampled_from(BASES),
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON | st.builds(_rope, JSON), max_size=4),
    dropped=st.sets(st.sampled_from(CONFIG_KEYS), max_size=3),
)
def test_mutated_config_dict(base: dict[str, Any], changes: dict[str, Any], dropped: set[str]) -> None:
    d = {k: v for k, v in {**base, **changes}.items() if k not in dropped}
    cfg = _expect_project_error(MixtralConfig.from_hf_dict, d)
    if cfg is None:
        return
    # Accepted means usable: sizes are positive ints, floats are finite, and it round-trips.
    for name in POSITIVE_INTS:
        value = getattr(cfg, name)
        assert type(value) is int and value > 0, (name, value)
    assert type(cfg.head_dim) is int and cfg.head_dim > 0
    for name in ("rms_norm_eps", "rope_theta"):
        value = getattr(cfg, name)
        assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value), (name, value)
        assert value > 0
    assert cfg.sliding_window is None or (type(cfg.sliding_window) is int and cfg.sliding_window > 0)
    if cfg.moe is not None:
        assert type(cfg.moe.num_local_experts) is int and type(cfg.moe.num_experts_per_tok) is int
    assert MixtralConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@FUZZ
@given(d=st.dictionaries(st.text(max_size=8), JSON, max_size=6) | JSON)
def test_random_config_dict(d: Any) -> None:
    if isinstance(d, dict):
        _expect_project_error(MixtralConfig.from_hf_dict, {"model_type": "mixtral", **d})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_config_json_bytes(scratch: Path, data: bytes) -> None:
    path = scratch / "config.json"
    path.write_bytes(data)
    _expect_project_error(MixtralConfig.load, path)


def test_config_json_deeply_nested(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MixtralQuantError, match=r"config\.json"):
        read_config_json(tmp_path)


# -- safetensors headers ------------------------------------------------------------------------
TENSORS = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.float16)}
GOOD = save(TENSORS, metadata={"format": "pt"})
HEADER_END = 8 + struct.unpack("<Q", GOOD[:8])[0]


def _read_all(folder: Path) -> None:
    """Open the folder and touch every tensor; only the project's error may escape."""
    def run() -> None:
        with CheckpointReader(folder) as reader:
            for name in reader.names:
                reader.shape(name)
                reader.dtype(name)
                reader.get(name)
                assert reader.where[name].resolve().parent == folder.resolve()

    _expect_project_error(run)


def _with_header(header: Any, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + GOOD[HEADER_END:]


def _header_mutation() -> st.SearchStrategy[bytes]:
    good = json.loads(GOOD[8:HEADER_END])
    flips = st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=6)

    def flip(edits: list[tuple[int, int]]) -> bytes:
        b = bytearray(GOOD)
        for at, value in edits:
            b[at] = value
        return bytes(b)

    def field(name: str, key: str, value: Any) -> bytes:
        h = json.loads(json.dumps(good))
        h[name][key] = value
        return _with_header(h)

    return st.one_of(
        flips.map(flip),
        st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n]),
        st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + GOOD[8:]),
        JSON.map(_with_header),
        st.builds(field, st.sampled_from(["a", "b"]), st.sampled_from(["dtype", "shape", "data_offsets"]), JSON),
        st.builds(field, st.sampled_from(["a", "b"]), st.just("data_offsets"),
                  st.lists(st.integers(-5, 2**65), min_size=0, max_size=3)),
        st.builds(field, st.sampled_from(["a", "b"]), st.just("shape"), st.lists(st.integers(-2, 20), max_size=3)),
    )


@FUZZ
@given(data=_header_mutation())
def test_mutated_safetensors(scratch: Path, data: bytes) -> None:
    folder = scratch / "single"
    folder.mkdir(exist_ok=True)
    (folder / SINGLE_FILE).write_bytes(data)
    _read_all(folder)


def test_safetensors_header_deeply_nested(tmp_path: Path) -> None:
    raw = b"[" * 50_000 + b"]" * 50_000
    (tmp_path / SINGLE_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(MixtralQuantError, match="corrupted"):
        CheckpointReader(tmp_path)


# -- index files --------------------------------------------------------------------------------
SHARDS = {
    "model-00001-of-00002.safetensors": {"a": TENSORS["a"]},
    "model-00002-of-00002.safetensors": {"b": TENSORS["b"]},
}
FILE_NAMES = st.sampled_from([*SHARDS, "../outside.safetensors", "/etc/passwd", "sub/../../x", ".", "", "a\x00b",
                              "..\\x", "model-00001-of-00002.safetensors/", "./model-00002-of-00002.safetensors"])


@pytest.fixture(scope="module")
def sharded(scratch: Path) -> Path:
    folder = scratch / "sharded"
    folder.mkdir()
    for name, tensors in SHARDS.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    save_file({"a": TENSORS["a"]}, str(scratch / "outside.safetensors"))
    return folder


@FUZZ
@given(index=st.one_of(
    JSON,
    st.builds(lambda m: {"weight_map": m}, JSON),
    st.builds(lambda m: {"metadata": {}, "weight_map": m},
              st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), FILE_NAMES | JSON, max_size=3)),
))
def test_mutated_index(sharded: Path, index: Any) -> None:
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    _read_all(sharded)


@FUZZ
@given(data=st.binary(max_size=40))
def test_index_bytes(sharded: Path, data: bytes) -> None:
    (sharded / INDEX_FILE).write_bytes(data)
    _read_all(sharded)


# -- recipes ------------------------------------------------------------------------------------
RECIPE_TEXT = (RECIPES / "gptq-w4g128.toml").read_text()
RECIPE = tomllib.loads(RECIPE_TEXT)
# Values a TOML file can hold: no None; NaN and infinities are TOML floats.
TOML_LEAF = st.one_of(st.booleans(), st.integers(-3, 600), st.integers(-(2**63), 2**63 - 1),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                      st.sampled_from(["gptq", "rtn", "nf4", "int8", "w8", "routed", "all-tokens", "router"]))
TOML = st.recursive(TOML_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=2),
                    max_leaves=5)
RECIPE_KEYS = [(section, key) for section, table in RECIPE.items() if isinstance(table, dict) for key in table]
RECIPE_KEYS += [("keep", "components"), ("quant", "lazy_block"), ("quant", "nf4_blocksize"), ("quant", "double_quant")]


def _check_recipe(r: Recipe) -> None:
    """Every setting has its field's type (the method's own Options: a bool is not an int, an int may
    stand for a finite float)."""
    q, c = r.quant, r.calibration
    hints = {"bits": int, "group_size": int} | get_type_hints(type(q.options))
    for key, value in q.flat().items():
        if hints[key] in (int, bool):
            assert type(value) is hints[key], (key, r)
        elif hints[key] is float:
            assert type(value) in (int, float) and math.isfinite(value), (key, r)
    for value in (c.samples, c.seq_len, c.seed):
        assert type(value) is int, r
    assert c.samples >= 1 and c.seq_len >= 2 and isinstance(c.corpus, str)
    assert all(isinstance(k, str) for k in r.keep)
    r.to_dict()
    r.digest()


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(RECIPE_KEYS), TOML, max_size=3),
    tables=st.dictionaries(st.sampled_from(["quant", "calibration", "experts", "keep", "name", "extra"]), TOML,
                           max_size=1),
)
def test_mutated_recipe_dict(changes: dict[tuple[str, str], Any], tables: dict[str, Any]) -> None:
    d = json.loads(json.dumps(RECIPE))
    for (section, key), value in changes.items():
        d.setdefault(section, {})[key] = value
    d.update(tables)
    r = _expect_project_error(parse_recipe, d, "fuzz")
    if r is not None:
        _check_recipe(r)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(RECIPE_TEXT)), st.integers(0, 4), st.text(max_size=3)),
                      min_size=1, max_size=3),
       overrides=st.dictionaries(st.sampled_from(["bits", "group_size", "samples", "seq_len", "seed"]),
                                 st.integers(-2, 600), max_size=2))
def test_mutated_recipe_file(scratch: Path, edits: list[tuple[int, int, str]], overrides: dict[str, int]) -> None:
    text = RECIPE_TEXT
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut :]
    path = scratch / "fuzz.toml"
    path.write_text(text)
    r = _expect_project_error(load_recipe, path, **overrides)
    if r is not None:
        _check_recipe(r)


def test_recipe_deeply_nested(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(MixtralQuantError, match=r"deep\.toml"):
        load_recipe(path)
