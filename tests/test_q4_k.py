"""llama.cpp's Q4_K grid and GPTQ onto it: checked against ggml itself (llama-cpp-python's libggml-base),
gguf-py's dequantizer, and the GPTQ objective measured directly."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from mixtral_quant.errors import ConfigError
from mixtral_quant.quant import HessianAccumulator, MethodName, QuantConfig, get_method, read_quantization_config
from mixtral_quant.quant.q4_k import Q4_K_BYTES, dequantize_q4_k, pack_q4_k, q4_k_grid, quantize_q4_k

Q4_K = gguf.GGMLQuantizationType.Q4_K
CONFIG = QuantConfig.of(MethodName.GPTQ_Q4_K, bits=4, group_size=32, act_order=True)


def ggml_q4_k(w: np.ndarray) -> np.ndarray:
    """ggml's own Q4_K bytes of ``w [R, K]`` (ggml_quantize_chunk, no importance matrix)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]  # fmt: skip
    x = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // 256 * Q4_K_BYTES), dtype=np.uint8)
    size = fn(int(Q4_K), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert size == out.nbytes
    return out


def awkward_weights(seed: int = 0) -> np.ndarray:
    """Rows of very different scales, with the cases the fit treats apart: an all-zero sub-block, a constant
    one, an all-positive one, a lone outlier and a zero super-block."""
    gen = np.random.default_rng(seed)
    w = (gen.standard_normal((24, 512)) * np.exp(2 * gen.standard_normal((24, 1)))).astype(np.float32)
    w[0, :32] = 0
    w[1, 32:64] = 0.25
    w[2, 64:96] = np.abs(w[2, 64:96])
    w[3, 7] = 40.0
    w[4, 256:] = 0
    return w


def test_q4_k_bytes_equal_ggml() -> None:
    """Our reference fit writes ggml's bytes exactly, edge cases included."""
    for seed in range(3):
        w = awkward_weights(seed)
        assert np.array_equal(quantize_q4_k(w), ggml_q4_k(w))


def test_dequantize_equals_gguf_py() -> None:
    """Our torch dequantizer (the runtime's) gives gguf-py's values bit for bit."""
    w = awkward_weights()
    packed = quantize_q4_k(w)
    ours = dequantize_q4_k(torch.from_numpy(packed), *w.shape).numpy()
    assert np.array_equal(ours, gguf.quants.dequantize(packed, Q4_K))
    rel = np.sqrt(((ours - w) ** 2).mean()) / w.std()
    assert 0 < rel < 0.1


def test_runtime_module_equals_gguf_py() -> None:
    """The loaded module keeps the grid unpacked beside the blocks (24 bytes per 256 weights): its weight
    is gguf-py's bit for bit, and state_dict() holds the stored blocks alone."""
    from mixtral_quant.quant import get_method
    from mixtral_quant.quant.base import MethodName, QuantConfig

    w = awkward_weights()
    packed = torch.from_numpy(quantize_q4_k(w))
    method = get_method(QuantConfig.of(MethodName.GPTQ_Q4_K, bits=4, group_size=32))
    module = method.make_module({"q4_k": packed}, w.shape[1], w.shape[0])
    assert np.array_equal(module.weight_float().numpy(), gguf.quants.dequantize(packed.numpy(), Q4_K))
    state = module.state_dict()
    assert list(state) == ["q4_k"] and torch.equal(state["q4_k"], packed)


def correlated_inputs(k: int, n: int = 4096, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scale = torch.exp(torch.randn(k, generator=gen))
    return (torch.randn(n, k, generator=gen) @ mix) * scale


def test_gptq_onto_the_grid_beats_round_to_nearest() -> None:
    """GPTQ's codes lie on the fixed Q4_K grid of each row (every value is ``d*sc*q - dmin*m`` of the stored
    block), and its output error ``||X (W - Q)^T||`` is below llama.cpp's round-to-nearest on the same
    inputs."""
    x = correlated_inputs(512)
    w = torch.from_numpy(awkward_weights(5)[:, :512]).contiguous()
    acc = HessianAccumulator(512)
    acc.add(x)
    method = get_method(CONFIG)
    result = method.quantize(w, acc.hessian)
    assert result.info["method"] == "gptq-q4_k"
    q = method.dequantize(result.tensors)
    rtn = torch.from_numpy(gguf.quants.dequantize(quantize_q4_k(w.numpy()), Q4_K))
    err_gptq = (x @ (w - q).T).norm()
    err_rtn = (x @ (w - rtn).T).norm()
    assert err_gptq < 0.85 * err_rtn, (float(err_gptq), float(err_rtn))
    # the stored grid is the one fitted before the sweep, with the Hessian diagonal as importance
    grid = q4_k_grid(w.numpy(), acc.hessian.diagonal().numpy())
    packed = result.tensors["q4_k"].numpy().reshape(-1, Q4_K_BYTES)
    assert np.array_equal(packed[:, :16], pack_q4_k(grid).reshape(-1, Q4_K_BYTES)[:, :16])


def test_without_a_hessian_it_is_llama_cpp_round_to_nearest() -> None:
    w = torch.from_numpy(awkward_weights(2))
    result = get_method(CONFIG).quantize(w, None)
    assert result.info["fallback"] == "no Hessian"
    assert np.array_equal(result.tensors["q4_k"].numpy(), ggml_q4_k(w.numpy()))


def test_stacked_sweep_equals_one_by_one() -> None:
    """q/k/v share one Hessian: quantized stacked, each gets the bytes it gets alone."""
    x = correlated_inputs(256, 1024, seed=3)
    acc = HessianAccumulator(256)
    acc.add(x)
    gen = torch.Generator().manual_seed(4)
    ws = [torch.randn(r, 256, generator=gen) for r in (64, 32, 32)]
    method = get_method(CONFIG)
    stacked = method.quantize_stacked(ws, acc.hessian)  # type: ignore[attr-defined]
    for w, s in zip(ws, stacked, strict=True):
        assert torch.equal(s.tensors["q4_k"], method.quantize(w, acc.hessian).tensors["q4_k"])


def test_config_round_trip_and_shape_errors() -> None:
    method = get_method(CONFIG)
    assert read_quantization_config(method.quantization_config()) == CONFIG
    with pytest.raises(ConfigError, match="group_size 32"):
        QuantConfig.of(MethodName.GPTQ_Q4_K, bits=4, group_size=128)
    with pytest.raises(ConfigError, match="multiple of 256"):
        method.quantize(torch.randn(64, 128), None)
