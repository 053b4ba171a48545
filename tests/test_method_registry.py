"""A quantization method added from outside the package: one class and one ``register`` call, and
quantize, load, layer-by-layer evaluation, the ONNX export and the GGUF export take it with no other
edit. The toy method is 2-bit round-to-nearest with one float16 scale and minimum per output row and
one code per byte: a layout no built-in method has."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader
from mixtral_quant.errors import ConfigError
from mixtral_quant.eval.runner import evaluate
from mixtral_quant.export import Target, export_onnx
from mixtral_quant.export.gguf import GGUFOptions, GGUFType, export_gguf
from mixtral_quant.export.ort_runner import OnnxDecoder
from mixtral_quant.loading import load_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.quant import QuantConfig, QuantResult, register, registered
from mixtral_quant.quant.base import _REGISTRY
from mixtral_quant.quant.modules import DequantLinear
from mixtral_quant.recipe import load_recipe

NAME = "toy-row-w2"


@dataclass(frozen=True)
class RowTwoBitOptions:
    """The toy's own setting (a recipe key; the test recipe sets it to another value than the default)."""

    min_scale: float = 1e-3


class RowTwoBit:
    """``W[o, i] = codes[o, i] * row_scale[o] + row_min[o]``, codes in 0..3 (uint8), fp16 scale and minimum."""

    Options = RowTwoBitOptions
    needs_hessian = False
    config_files: tuple[str, ...] = ()
    allowed_bits = frozenset({2})
    native_bits = 2

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    @staticmethod
    def read_config(entry: Mapping[str, Any]) -> QuantConfig | None:
        return QuantConfig.for_method(NAME) if entry.get("quant_method") == NAME else None

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantResult:
        w = weight.float()
        low = w.amin(1).half()
        scale = ((w.amax(1) - low.float()) / 3).clamp(min=self.config.options.min_scale).half()
        codes = torch.round((w - low.float()[:, None]) / scale.float()[:, None]).clamp(0, 3).to(torch.uint8)
        return QuantResult({"codes": codes, "row_scale": scale, "row_min": low}, {"method": NAME})

    def dequantize(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["codes"].float() * tensors["row_scale"].float()[:, None] + tensors["row_min"].float()[:, None]

    def tensor_names(self) -> list[str]:
        return ["codes", "row_scale", "row_min"]

    def make_module(self, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int) -> nn.Module:
        return DequantLinear(tensors, self.dequantize, in_features, out_features)

    def quantization_config(self) -> dict[str, Any]:
        return {"quant_method": NAME, "bits": 2}


@pytest.fixture(scope="module")
def toy() -> Iterator[str]:
    register(NAME, RowTwoBit)  # the one call that adds the method
    yield NAME
    del _REGISTRY[NAME]


@pytest.fixture(scope="module")
def artifact(toy: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = tmp_path_factory.mktemp("recipe") / "toy.toml"
    recipe.write_text(f'name = "toy"\n[quant]\nmethod = "{toy}"\nmin_scale = 1e-6\n[calibration]\nsamples = 4\n'
                      'seq_len = 64\n')
    return quantize_model(DEFAULT_MODEL, load_recipe(recipe), tmp_path_factory.mktemp("q") / "toy", progress=False)


def rows_by_formula(w: np.ndarray) -> np.ndarray:
    """The toy grid computed directly in numpy from the float weight (float16 scale and minimum)."""
    low = w.min(1).astype(np.float16)
    scale = np.maximum((w.max(1) - low.astype(np.float32)) / 3, 1e-6).astype(np.float16)
    codes = np.clip(np.round((w - low.astype(np.float32)[:, None]) / scale.astype(np.float32)[:, None]), 0, 3)
    return codes * scale.astype(np.float32)[:, None] + low.astype(np.float32)[:, None]


def test_recipe_and_registry_know_the_method(toy: str) -> None:
    assert registered()[toy] is RowTwoBit
    assert QuantConfig.for_method(toy).bits == 2 and QuantConfig.for_method(toy).method_name == toy
    with pytest.raises(ConfigError, match="cannot store 4-bit"):
        QuantConfig(toy, bits=4)
    assert QuantConfig.of(toy, bits=2, min_scale=1e-6).options == RowTwoBitOptions(1e-6)
    with pytest.raises(ConfigError, match="toy-row-w2 has no setting sym"):
        QuantConfig.of(toy, bits=2, sym=True)


def test_quantize_and_load(artifact: Path) -> None:
    """Every expert and attention linear is stored in the toy layout, and the loaded model computes
    with the weights the formula gives from the float model's."""
    recorded = json.loads((artifact / "calibration.json").read_text())["recipe"]["quant"]
    assert recorded == {"method": NAME, "bits": 2, "group_size": 128, "min_scale": 1e-6}  # its own settings only
    reader = CheckpointReader(artifact)
    names = [n for n in reader.where if n.endswith(".codes")]
    assert len(names) == 4 * (4 + 3 * 8)  # q/k/v/o and each expert's w1/w3/w2 in each of 4 layers
    float_model = load_model(DEFAULT_MODEL, dtype=torch.float32, device=torch.device("cpu"))
    model = load_model(artifact, dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28723, 415, 4216]])
    with torch.no_grad():
        for name in names:
            prefix = name.removesuffix(".codes")
            w = float_model.get_submodule(prefix).weight.float().numpy()
            x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
            np.testing.assert_allclose(model.get_submodule(prefix)(x).numpy(), x.numpy() @ rows_by_formula(w).T,
                                       rtol=1e-5, atol=1e-5)
        for name in names:  # the float model with the formula's weights gives the loaded model's logits
            lin = float_model.get_submodule(name.removesuffix(".codes"))
            lin.weight.copy_(torch.from_numpy(rows_by_formula(lin.weight.float().numpy())))
        np.testing.assert_allclose(model(ids).logits.numpy(), float_model(ids).logits.numpy(), atol=1e-4)


def test_evaluated_whole_and_layer_by_layer_alike(artifact: Path) -> None:
    kwargs: dict[str, Any] = {"dataset": "wiki-test", "ctx": 128, "max_tokens": 384, "progress": False}
    whole = evaluate([artifact], DEFAULT_MODEL, **kwargs).variant("toy")
    layered = evaluate([artifact], DEFAULT_MODEL, layer_sequential=True, **kwargs).variant("toy")
    assert layered.perplexity.ppl == pytest.approx(whole.perplexity.ppl, rel=1e-6)
    assert whole.comparison is not None and whole.comparison.kl_mean > 0
    reader = CheckpointReader(artifact)  # the experts' stored bits, from the file: codes, scales, minimums
    stored = [reader.get(n) for n in reader.where if ".experts." in n]
    params = sum(t.numel() for t in stored if t.dtype == torch.uint8)
    assert whole.memory.bits_per_parameter["experts"] == pytest.approx(
        sum(t.numel() * t.element_size() * 8 for t in stored) / params, rel=1e-6)


def test_exported_to_onnx_and_gguf(artifact: Path, tmp_path: Path) -> None:
    """Neither exporter knows the layout: both take the dequantized weights (ONNX float MatMul/MoE,
    exact; GGUF re-quantized to Q8_0, and the record says so)."""
    onnx_dir = export_onnx(artifact, tmp_path / "onnx", Target.ORT, progress=False)
    mappings = json.loads((onnx_dir / "export.json").read_text())["mappings"]
    assert "MoE (dequantized float)" in mappings["experts"] and "MatMul (dequantized float)" in mappings["attention"]
    decoder = OnnxDecoder(onnx_dir, threads=1)
    ids = np.array([[1, 415, 2936, 9060, 285, 1142]], np.int64)
    logits, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
    model = load_model(artifact, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4
    result = export_gguf(artifact, tmp_path / "toy.gguf", GGUFOptions(GGUFType.Q8_0), progress=False)
    assert result.record["mappings"]["experts"] == ["Q8_0 (re-quantized)"]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(result.path).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
