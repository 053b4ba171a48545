"""The forms in which a method offers its stored weights to the exporters, exactly.

:class:`BlockQuant`: integer codes with a scale and a zero per block of inputs, the form that
onnxruntime's MatMulNBits / QMoE and llama.cpp's Q4_0 / Q8_0 take; :class:`Bnb4`: bitsandbytes 4-bit
codes and absmax, the form of onnxruntime's MatMulBnb4.

A method that can say its stored grid this way, exactly, has ``block_form`` (and the cheaper
``block_signature``, read without the codes); see :class:`~mixtral_quant.quant.base.Method`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ROW_BLOCK = 128  # the largest block a row with one scale is cut into (MatMulNBits always needs blocks)


def block_choices(block: int | None, in_features: int) -> frozenset[int | None]:
    """The block sizes that write a grid of one scale per ``block`` inputs (None: per row) exactly.

    A group splits into power-of-two blocks >= 16 that share its scale and zero (QMoE and
    MatMulNBits take such block sizes); a row with one scale also stays one scale per row (None,
    QMoE only), or splits into blocks of up to :data:`MAX_ROW_BLOCK`.
    """
    group = in_features if block is None else block
    limit = MAX_ROW_BLOCK if block is None else group
    sizes: set[int | None] = {b for b in (2**e for e in range(4, limit.bit_length())) if group % b == 0}
    if block is None:
        sizes.add(None)
    return frozenset(sizes)


@dataclass
class BlockQuant:
    """``W[n, k] = (codes[n, k] - zeros[n, k // block]) * scales[n, k // block]``."""

    codes: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float32 [N, G]
    zeros: np.ndarray | None  # uint8 [N, G]; None: the default 2**(bits-1)
    bits: int
    block: int | None  # inputs per scale as stored; None: one group per row (G == 1)

    @property
    def choices(self) -> frozenset[int | None]:
        return block_choices(self.block, self.codes.shape[1])

    def at(self, block: int | None) -> BlockQuant:
        """The same weights in blocks of ``block`` (one of :attr:`choices`), each group's scale and
        zero repeated over the blocks it splits into."""
        if block == self.block:
            return self
        if block not in self.choices or block is None:
            raise ValueError(f"blocks of {block} cannot express a grid of {self.block} (choices {self.choices})")
        rep = (self.block or self.codes.shape[1]) // block
        zeros = None if self.zeros is None else np.repeat(self.zeros, rep, axis=1)
        return BlockQuant(self.codes, np.repeat(self.scales, rep, axis=1), zeros, self.bits, block)


    def widened(self, bits: int) -> BlockQuant:
        """The same weights with ``bits``-bit codes (at least :attr:`bits`), exactly: codes and zeros move
        up by ``2**(bits-1) - 2**(self.bits-1)``, so the default zero stays the default and every code
        and zero stays in range (a 2- or 3-bit grid runs as 4-bit, a 4-bit one as 8-bit)."""
        if bits == self.bits:
            return self
        if bits < self.bits:
            raise ValueError(f"cannot narrow {self.bits}-bit codes to {bits} bits exactly")
        shift = np.uint8(2 ** (bits - 1) - 2 ** (self.bits - 1))
        zeros = None if self.zeros is None else self.zeros + shift
        return BlockQuant(self.codes + shift, self.scales, zeros, bits, self.block)


def runnable_bits(bits: int) -> int:
    """The width onnxruntime's MatMulNBits / QMoE run a ``bits``-bit grid at: 4 or 8 (:meth:`BlockQuant.widened`)."""
    return 4 if bits <= 4 else 8


@dataclass(frozen=True)
class GridSignature:
    """What a linear's :class:`BlockQuant` form allows, read without its codes."""

    bits: int
    choices: frozenset[int | None]  # block sizes that express it exactly (None: one scale per row)
    has_zeros: bool


@dataclass
class Bnb4:
    codes: np.ndarray  # uint8 [N*K/2], as bitsandbytes stores them (row-major [N, K], 2 per byte)
    absmax: np.ndarray  # float32 [N*K/block]
    block: int
    quant_type: int  # MatMulBnb4: 0 FP4, 1 NF4
