"""Bit packing: exact round trips, and the GPTQ word layout checked against a plain loop."""

from __future__ import annotations

import pytest
import torch

from mixtral_quant.errors import ConfigError
from mixtral_quant.quant.packing import (
    pack_qweight,
    pack_qzeros,
    pack_rows,
    pack_runtime,
    pack_uint4_low_first,
    unpack_qweight,
    unpack_qzeros,
    unpack_runtime,
    unpack_uint4_low_first,
)

BITS = [2, 3, 4, 8]


def _codes(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32)
    codes[0, 0], codes[-1, -1] = 0, 2**bits - 1  # both ends of the range, always
    return codes


def _autogptq_pack_loop(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's reference ``pack`` loop (qlinear_cuda_old), over rows of ``codes`` [n, m]."""
    w = codes.to(torch.int64)
    n, m = w.shape
    out = torch.zeros(n * bits // 32, m, dtype=torch.int64)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= w[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                out[row] |= w[j] << (3 * (j - i))
            i += 10
            out[row] |= w[i] << 30
            row += 1
            out[row] |= (w[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= w[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= w[i] << 31
            row += 1
            out[row] |= (w[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= w[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    out &= 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(32, 1), (64, 7), (256, 96), (96, 33)])
def test_qweight_round_trip(bits: int, shape: tuple[int, int]) -> None:
    codes = _codes(*shape, bits=bits, seed=bits * 1000 + shape[0] + shape[1])
    packed = pack_qweight(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0] * bits // 32, shape[1])
    assert torch.equal(unpack_qweight(packed, bits), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(32, 1), (64, 7), (256, 96), (30, 5), (1, 3)])
def test_runtime_words_round_trip(bits: int, shape: tuple[int, int]) -> None:
    """The in-memory form: whole codes per word (10 of 3 bits), exact for any row count, each code at
    bit ``bits * k`` of its word (checked by a plain loop); for 2, 4 and 8 bits the stored words."""
    codes = _codes(*shape, bits=bits, seed=shape[0] + bits)
    words = pack_runtime(codes, bits)
    c = 32 // bits
    assert words.shape == (-(-shape[0] // c), shape[1])
    assert torch.equal(unpack_runtime(words, bits, shape[0]), codes)
    for i in range(0, shape[0], max(1, shape[0] // 7)):
        word = int(words[i // c, shape[1] - 1]) & 0xFFFFFFFF
        assert (word >> (bits * (i % c))) & (2**bits - 1) == int(codes[i, -1])
    if bits != 3 and shape[0] % c == 0:
        assert torch.equal(words, pack_rows(codes, bits))


@pytest.mark.parametrize("bits", BITS)
def test_qweight_matches_autogptq_layout(bits: int) -> None:
    codes = _codes(64, 5, bits, seed=bits)
    assert torch.equal(pack_qweight(codes, bits), _autogptq_pack_loop(codes, bits))


def test_four_bit_word_holds_eight_rows_least_significant_first() -> None:
    codes = torch.arange(8, dtype=torch.int32).reshape(8, 1)
    assert pack_qweight(codes, 4).item() == 0x76543210


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (8, 256), (5, 96)])
def test_qzeros_round_trip(bits: int, shape: tuple[int, int]) -> None:
    codes = _codes(*shape, bits=bits, seed=bits + shape[0] * shape[1])
    packed = pack_qzeros(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], shape[1] * bits // 32)
    assert torch.equal(unpack_qzeros(packed, bits), codes)
    assert torch.equal(packed, _autogptq_pack_loop(codes.t(), bits).t())


@pytest.mark.parametrize("bits", [5, 16])
def test_unsupported_width_is_a_config_error(bits: int) -> None:
    with pytest.raises(ConfigError, match=f"{bits}-bit"):
        pack_qweight(torch.zeros(32, 1, dtype=torch.int32), bits)


def test_rows_not_a_whole_run_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        pack_qweight(torch.zeros(40, 2, dtype=torch.int32), 3)


@pytest.mark.parametrize("shape", [(2,), (4, 6), (3, 2, 128)])
def test_uint4_low_nibble_first_round_trip(shape: tuple[int, ...]) -> None:
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(len(shape)))
    packed = pack_uint4_low_first(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_uint4_low_first(packed), codes.to(torch.uint8))


def test_uint4_low_nibble_holds_the_even_element() -> None:
    packed = pack_uint4_low_first(torch.tensor([0x3, 0xA]))
    assert packed.tolist() == [0xA3]
