"""NF4 through bitsandbytes: stored keys as Linear4bit saves them, exact round trip, runtime module."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from mixtral_quant.errors import CheckpointError
from mixtral_quant.quant import MethodName, QuantConfig, get_method

OUT, IN = 64, 256


def _weight(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)


def _bnb_linear4bit_state_dict(weight: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    """What a real bitsandbytes Linear4bit saves for this weight (quantized on .to())."""
    layer = bnb.nn.Linear4bit(IN, OUT, bias=False, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4", module=layer
    )
    return layer.to("cpu").state_dict()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_are_what_linear4bit_saves(double_quant: bool, dtype: torch.dtype) -> None:
    weight = _weight(dtype)
    method = get_method(QuantConfig.of(MethodName.NF4, double_quant=double_quant))
    tensors = method.quantize(weight).tensors
    reference = _bnb_linear4bit_state_dict(weight, double_quant)
    assert sorted(tensors) == sorted(reference) == sorted(method.tensor_names())
    for name, tensor in reference.items():
        assert tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensors[name], tensor), name


def test_serialized_state_names_the_format() -> None:
    tensors = get_method(QuantConfig.of(MethodName.NF4)).quantize(_weight(torch.bfloat16)).tensors
    assert tensors["weight"].dtype == torch.uint8 and tuple(tensors["weight"].shape) == (OUT * IN // 2, 1)
    assert tuple(tensors["weight.quant_map"].shape) == (16,)
    assert tuple(tensors["weight.nested_quant_map"].shape) == (256,)
    blob = bytes(tensors["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    assert '"quant_type": "nf4"' in blob and '"blocksize": 64' in blob and '"dtype": "bfloat16"' in blob


@pytest.mark.parametrize("blocksize", [64, 128])
def test_round_trip_equals_bitsandbytes_dequantize(blocksize: int) -> None:
    weight = _weight()
    method = get_method(QuantConfig.of(MethodName.NF4, nf4_blocksize=blocksize))
    result = method.quantize(weight)
    codes, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    expected = bnbf.dequantize_4bit(codes, state)
    deq = method.dequantize(result.tensors)
    assert deq.dtype == torch.float32 and deq.shape == (OUT, IN)
    assert torch.equal(deq, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_output_is_x_times_dequantized_weight(dtype: torch.dtype) -> None:
    method = get_method(QuantConfig.of(MethodName.NF4))
    tensors = method.quantize(_weight(dtype)).tensors
    module = method.make_module(tensors, IN, OUT)
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = module(x)
    assert y.dtype == dtype and y.shape == (2, 5, OUT)
    expected = x.float() @ method.dequantize(tensors).t()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)
    assert sorted(module.state_dict()) == sorted(tensors)


def test_module_rejects_wrong_shape_and_missing_keys() -> None:
    method = get_method(QuantConfig.of(MethodName.NF4))
    tensors = method.quantize(_weight()).tensors
    with pytest.raises(CheckpointError, match="expected"):
        method.make_module(tensors, OUT, IN)
    with pytest.raises(CheckpointError, match="missing"):
        method.make_module({k: v for k, v in tensors.items() if k != "weight.absmax"}, IN, OUT)


def test_nf4_quantization_config_matches_transformers() -> None:
    cfg = get_method(QuantConfig.of(MethodName.NF4)).quantization_config()
    transformers = pytest.importorskip("transformers")
    expected = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ).to_dict()
    assert cfg == expected


@pytest.mark.parametrize("double_quant", [True, False])
def test_bands_give_the_bytes_of_one_bitsandbytes_call(double_quant: bool) -> None:
    """quantize_widened of a bf16 weight taller than a band (two bands and a short one) stores what
    one ``quantize_4bit`` of the whole float32 weight gives, and a band read back equals those rows of
    the whole dequantized weight."""
    from mixtral_quant.quant.base import ROW_BAND as BAND

    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(2 * BAND + 64, 128, generator=g) * 0.05).to(torch.bfloat16)
    method = get_method(QuantConfig.of(MethodName.NF4, double_quant=double_quant))
    tensors = method.quantize_widened(weight).tensors  # type: ignore[attr-defined]
    codes, state = bnbf.quantize_4bit(weight.float(), blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    reference = {"weight": codes} | {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    assert sorted(tensors) == sorted(reference)
    for name, tensor in reference.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
    whole = method.dequantize(tensors)
    for start, stop in ((0, 3), (BAND - 5, 2 * BAND + 64)):
        assert torch.equal(method.dequantize_rows(tensors, start, stop), whole[start:stop])  # type: ignore[attr-defined]
