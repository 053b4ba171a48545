"""GGUF's block types written from our grids, code for code, and llama.cpp's q/k row order.

ggml's ``block_q4_0`` is an fp16 scale ``d`` then 16 bytes: byte ``j`` holds code ``j`` in its low
nibble and code ``j + 16`` in its high one; the value is ``d * (q - 8)``. ``block_q8_0`` is ``d`` then
32 int8 codes, value ``d * q`` (ggml-common.h). A grid of ours is the same when its blocks hold 32
inputs (or split into blocks of 32 sharing a scale), its zero is the default ``2**(bits - 1)`` and
its scales are fp16 numbers: then the block's codes are ours, unchanged.
"""

from __future__ import annotations

import numpy as np

from mixtral_quant.export.common import BlockQuant

QK = 32  # inputs per Q4_0 / Q8_0 block
Q4_0_BYTES = 2 + QK // 2
Q8_0_BYTES = 2 + QK


def gguf_grid(form: BlockQuant | None, bits: int) -> BlockQuant | None:
    """``form`` in blocks of 32 when GGUF's ``bits``-bit block type (Q4_0, Q8_0) writes it exactly; else None."""
    if form is None or form.bits != bits or form.zeros is not None or QK not in form.choices:
        return None
    if not np.array_equal(form.scales.astype(np.float16).astype(np.float32), form.scales):
        return None  # a scale that fp16 cannot hold
    return form.at(QK)


def pack_q4_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 ``[N, K / 32 * 18]``: ``codes`` uint8 ``[N, K]`` in 0..15, ``scales`` ``[N, K / 32]``."""
    n, k = codes.shape
    q = codes.reshape(n, k // QK, 2, QK // 2).astype(np.uint8)
    qs = q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))  # [N, B, 16]
    d = scales.astype(np.float16).reshape(n, k // QK, 1).view(np.uint8)  # [N, B, 2]
    return np.concatenate([d, qs], axis=-1).reshape(n, -1)


def pack_q8_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 ``[N, K / 32 * 34]``: ``codes`` uint8 ``[N, K]`` with zero 128, ``scales`` ``[N, K / 32]``."""
    n, k = codes.shape
    q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8).reshape(n, k // QK, QK)
    d = scales.astype(np.float16).reshape(n, k // QK, 1).view(np.uint8)
    return np.concatenate([d, q], axis=-1).reshape(n, -1)


def pack_exact(form: BlockQuant) -> np.ndarray:
    """A grid of blocks of 32 (from :func:`gguf_grid`) as Q4_0 or Q8_0 bytes."""
    assert form.block == QK and form.zeros is None
    return (pack_q4_0 if form.bits == 4 else pack_q8_0)(form.codes, form.scales)


def rope_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection (or of anything row-aligned with it) from the
    Hugging Face rotary layout (halves) to llama.cpp's (interleaved pairs), as convert_hf_to_gguf.py does."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unrope_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`rope_rows`."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
