"""LLM.int8 (bitsandbytes) and weight-only W8: stored formulas and runtime modules."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F

from mixtral_quant.quant import MethodName, QuantConfig, get_method

OUT, IN = 64, 256


def _weight() -> torch.Tensor:
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3] = 0.0  # an all-zero row must not divide by zero
    return w


def _int8() -> QuantConfig:
    return QuantConfig.for_method(MethodName.INT8)


def test_scb_is_the_fp16_row_absmax_and_codes_are_rounded_127ths() -> None:
    weight = _weight()
    tensors = get_method(_int8()).quantize(weight).tensors
    w16 = weight.to(torch.float16).float()
    scb = w16.abs().amax(1)
    assert tensors["SCB"].dtype == torch.float32 and torch.equal(tensors["SCB"], scb)
    codes = torch.nan_to_num(torch.round(w16 * (127 / scb)[:, None]))  # bitsandbytes' default kernel
    assert tensors["weight"].dtype == torch.int8 and torch.equal(tensors["weight"].float(), codes)
    assert tensors["weight_format"].dtype == torch.uint8 and tensors["weight_format"].item() == 0
    deq = get_method(_int8()).dequantize(tensors)
    torch.testing.assert_close(deq, codes * scb[:, None] / 127)


def test_int8_tensors_are_what_linear8bitlt_saves() -> None:
    weight = _weight()
    layer = bnb.nn.Linear8bitLt(IN, OUT, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    reference = layer.to("cpu").state_dict()
    method = get_method(_int8())
    tensors = method.quantize(weight).tensors
    assert sorted(tensors) == sorted(reference) == sorted(method.tensor_names())
    for name, tensor in reference.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")  # bnb notes that it casts inputs to fp16
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_module_approximates_the_dequantized_linear(dtype: torch.dtype) -> None:
    method = get_method(_int8())
    tensors = method.quantize(_weight()).tensors
    module = method.make_module(tensors, IN, OUT)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(1))
    x[:, 7] *= 30.0  # an outlier column above the 6.0 threshold, multiplied in fp16
    x = x.to(dtype)
    y = module(x)
    assert y.dtype == dtype
    expected = F.linear(x.float(), method.dequantize(tensors))
    assert (y.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert sorted(module.state_dict()) == sorted(tensors)


def _linear8bitlt(tensors: dict[str, torch.Tensor], threshold: float) -> bnb.nn.Linear8bitLt:
    layer = bnb.nn.Linear8bitLt(IN, OUT, bias=False, has_fp16_weights=False, threshold=threshold, device="meta")
    codes = tensors["weight"]
    layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes,
                                     SCB=tensors["SCB"])  # fmt: skip
    return layer.eval()


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_module_is_linear8bitlt_bit_for_bit(dtype: torch.dtype, threshold: float, rows: int) -> None:
    """Our CPU path and the bitsandbytes.matmul path (the one CUDA takes) give Linear8bitLt's outputs
    bit for bit: batch 1 and 5, outlier columns or none, threshold 6 or 0, every input dtype; the input
    is left as it was."""
    from mixtral_quant.quant.int8_linear import Int8Linear

    tensors = get_method(_int8()).quantize(_weight()).tensors
    ours = Int8Linear(tensors, threshold)
    reference = _linear8bitlt(tensors, threshold)
    gen = torch.Generator().manual_seed(rows)
    for outliers in ([], [7], [0, 100, 255]):
        x = torch.randn(2, rows, IN, generator=gen)
        x[..., outliers] *= 40.0
        x = x.to(dtype)
        before = x.clone()
        expected = reference(x)
        for got in (ours(x), ours.forward_bitsandbytes(x)):
            assert got.dtype == dtype and got.shape == (2, rows, OUT)
            assert torch.equal(got, expected), (outliers, (got.float() - expected.float()).abs().max())
        assert torch.equal(x, before)


def test_w8_exact_formula() -> None:
    weight = _weight()
    method = get_method(QuantConfig.for_method(MethodName.W8))
    tensors = method.quantize(weight).tensors
    scale = tensors["weight_scale"]
    assert scale.dtype == torch.float16 and scale.shape == (OUT,)
    assert tensors["weight"].dtype == torch.int8 and tensors["weight"].shape == (OUT, IN)
    expected_scale = (weight.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float16).tiny).half()
    assert torch.equal(scale, expected_scale)
    codes = torch.clamp(torch.round(weight / scale.float()[:, None]), -127, 127)
    assert torch.equal(tensors["weight"].float(), codes)
    assert torch.equal(method.dequantize(tensors), codes * scale.float()[:, None])
    assert (method.dequantize(tensors) - weight).abs().max() <= scale.float().max() / 2 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8_module_is_the_dequantized_linear(dtype: torch.dtype) -> None:
    method = get_method(QuantConfig.for_method(MethodName.W8))
    tensors = method.quantize(_weight()).tensors
    module = method.make_module(tensors, IN, OUT)
    x = torch.randn(3, 2, IN, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = module(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, F.linear(x, method.dequantize(tensors).to(dtype)))
    assert sorted(module.state_dict()) == sorted(tensors)


def test_int8_quantization_config_matches_transformers() -> None:
    cfg = get_method(_int8()).quantization_config()
    transformers = pytest.importorskip("transformers")
    assert cfg == transformers.BitsAndBytesConfig(load_in_8bit=True).to_dict()
