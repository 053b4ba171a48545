"""Bit packing, apart from quantization: integer codes in, packed words out, and back.

The GPTQ checkpoint layout (AutoGPTQ / GPTQModel ``pack``) is, for every bit width, one
little-endian bit stream: code ``k`` of a packed run occupies stream bits
``bits*k .. bits*k + bits - 1``, and the stream is cut into 32-bit words. For 2, 4 and 8 bits
a word holds ``32 / bits`` whole codes; for 3 bits 32 codes fill 3 words and codes 10 and 21
straddle a word boundary. A :class:`WordLayout` per bit width (the ``LAYOUTS`` table) lists,
for each word of a run, which codes land in it and at what shift; packing and unpacking walk
that short table with whole-tensor operations, never a loop over rows.

- ``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the input dimension.
- ``qzeros`` int32 ``[groups, out * bits / 32]``: codes packed along the output dimension.
- ``pack_runtime``: the in-memory form of a loaded layer, whole codes per word (``32 // bits``, and 10
  codes of 3 bits, two bits spare), so that a call unpacks every width with one broadcast shift.
- ``pack_uint4_low_first``: two 4-bit codes per uint8 along the last dimension, low nibble
  first (onnxruntime MatMulNBits / QMoE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixtral_quant.errors import ConfigError

WORD_BITS = 32
_WORD_MASK = (1 << WORD_BITS) - 1


@dataclass(frozen=True)
class WordLayout:
    """How a run of ``codes_per_run`` codes of ``bits`` bits fills ``words_per_run`` words.

    ``terms[w]`` lists ``(code index, shift)`` for word ``w``: the code contributes
    ``code << shift`` (``code >> -shift`` when the shift is negative, for a code that began in
    the previous word).
    """

    bits: int
    codes_per_run: int
    words_per_run: int
    terms: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1


def _make_layout(bits: int) -> WordLayout:
    run_bits = bits * WORD_BITS // math.gcd(bits, WORD_BITS)  # lcm(bits, 32)
    codes, words = run_bits // bits, run_bits // WORD_BITS
    terms = []
    for w in range(words):
        lo, hi = w * WORD_BITS, (w + 1) * WORD_BITS
        terms.append(tuple((k, bits * k - lo) for k in range(codes) if bits * k < hi and bits * k + bits > lo))
    return WordLayout(bits, codes, words, tuple(terms))


LAYOUTS: dict[int, WordLayout] = {bits: _make_layout(bits) for bits in (2, 3, 4, 8)}


def layout_for(bits: int) -> WordLayout:
    """The packing layout of ``bits``-bit codes; ConfigError for a width GPTQ cannot store."""
    if bits not in LAYOUTS:
        raise ConfigError(f"cannot pack {bits}-bit codes: supported widths are {sorted(LAYOUTS)}")
    return LAYOUTS[bits]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << WORD_BITS), words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[n, m]`` (each in ``[0, 2**bits)``) along dim 0 -> int32 ``[n*bits/32, m]``."""
    layout = layout_for(bits)
    n, m = codes.shape
    if n % layout.codes_per_run:
        raise ConfigError(f"cannot pack {n} rows of {bits}-bit codes: need a multiple of {layout.codes_per_run}")
    runs = codes.reshape(n // layout.codes_per_run, layout.codes_per_run, m)
    out = torch.empty(runs.shape[0], layout.words_per_run, m, dtype=torch.int32, device=codes.device)
    for w, terms in enumerate(layout.terms):
        word = torch.zeros(runs.shape[0], m, dtype=torch.int64, device=codes.device)
        for k, shift in terms:
            code = runs[:, k].to(torch.int64) & layout.mask
            word |= code << shift if shift >= 0 else code >> -shift
        out[:, w] = _to_int32(word & _WORD_MASK)
    return out.reshape(-1, m)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_rows`: int32 ``[n*bits/32, m]`` -> int32 codes ``[n, m]``.

    int32 throughout: the codes that lie whole in a word come out of one broadcast shift of that word
    (an arithmetic shift; the mask drops the sign bits), and a code that straddles two words (3 bits:
    codes 10 and 21 of a run) is joined from its two parts."""
    layout = layout_for(bits)
    r, m = words.shape
    if r % layout.words_per_run:
        raise ConfigError(f"cannot unpack {r} rows of {bits}-bit words: need a multiple of {layout.words_per_run}")
    if layout.words_per_run == 1:  # whole codes per word: one broadcast shift, no copy
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=words.device)[None, :, None]
        return ((words.to(torch.int32)[:, None, :] >> shifts) & layout.mask).reshape(-1, m)
    runs = words.to(torch.int32).reshape(r // layout.words_per_run, layout.words_per_run, m)
    out = torch.empty(runs.shape[0], layout.codes_per_run, m, dtype=torch.int32, device=words.device)
    for w, terms in enumerate(layout.terms):
        whole = [(k, s) for k, s in terms if 0 <= s <= WORD_BITS - bits]
        first = whole[0][0]
        shifts = torch.tensor([s for _, s in whole], dtype=torch.int32, device=words.device)[None, :, None]
        out[:, first : first + len(whole)] = (runs[:, w, None] >> shifts) & layout.mask
        for k, s in terms:
            if s > WORD_BITS - bits:  # low bits at the top of this word, the rest at the bottom of the next
                low = WORD_BITS - s
                out[:, k] = ((runs[:, w] >> s) & ((1 << low) - 1)) | ((runs[:, w + 1] << low) & layout.mask)
    return out.reshape(-1, m)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qweight``: codes ``[in, out]`` -> int32 ``[in*bits/32, out]`` (packed along ``in``)."""
    return pack_rows(codes, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[in, out]`` from a GPTQ ``qweight`` int32 ``[in*bits/32, out]``."""
    return unpack_rows(qweight, bits)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qzeros``: codes ``[groups, out]`` -> int32 ``[groups, out*bits/32]`` (packed along ``out``)."""
    return pack_rows(zeros.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[groups, out]`` from a GPTQ ``qzeros`` int32 ``[groups, out*bits/32]``."""
    return unpack_rows(qzeros.t(), bits).t().contiguous()


def runtime_codes_per_word(bits: int) -> int:
    """Codes per int32 word of :func:`pack_runtime`: ``32 // bits`` whole codes (10 at 3 bits)."""
    layout_for(bits)
    return WORD_BITS // bits


def pack_runtime(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[n, m]`` -> int32 ``[ceil(n / c), m]``, ``c`` whole codes per word, code ``k`` of a word at
    bit ``bits * k`` (rows past ``n`` are zero codes). For 2, 4 and 8 bits this is :func:`pack_rows`."""
    c = runtime_codes_per_word(bits)
    n, m = codes.shape
    padded = torch.zeros(-(-n // c) * c, m, dtype=torch.int32, device=codes.device)
    padded[:n] = codes
    runs = padded.view(-1, c, m)
    word = torch.zeros(runs.shape[0], m, dtype=torch.int64, device=codes.device)
    for k in range(c):
        word |= (runs[:, k].to(torch.int64) & ((1 << bits) - 1)) << (bits * k)
    return _to_int32(word)


def unpack_runtime(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes ``[n, m]`` (int32) of :func:`pack_runtime`'s words: one broadcast shift."""
    c = runtime_codes_per_word(bits)
    shifts = torch.arange(0, bits * c, bits, dtype=torch.int32, device=words.device)[None, :, None]
    return ((words[:, None, :] >> shifts).bitwise_and_((1 << bits) - 1)).view(-1, words.shape[1])[:n]


def pack_uint4_low_first(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., k]`` (k even) -> uint8 ``[..., k/2]``, element ``2j`` in the low nibble."""
    if codes.shape[-1] % 2:
        raise ConfigError(f"cannot pack {codes.shape[-1]} 4-bit codes into bytes: need an even count")
    c = codes.to(torch.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_uint4_low_first(packed: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`pack_uint4_low_first`: uint8 ``[..., k/2]`` -> uint8 codes ``[..., k]``."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
