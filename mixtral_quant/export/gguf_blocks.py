"""GGUF's block types written from our grids, code for code, and llama.cpp's q/k row order.

ggml's ``block_q4_0`` is an fp16 scale ``d`` then 16 bytes: byte ``j`` holds code ``j`` in its low
nibble and code ``j + 16`` in its high one; the value is ``d * (q - 8)``. ``block_q8_0`` is ``d`` then
32 int8 codes, value ``d * q`` (ggml-common.h). A grid of ours is the same when its blocks hold 32
inputs (or split into blocks of 32 sharing a scale), its zero is the default ``2**(bits - 1)`` and
its scales are fp16 numbers: then the block's codes are ours, unchanged.
"""

from __future__ import annotations

import numpy as np

from mixtral_quant.quant.block_form import BlockQuant

QK = 32  # inputs per Q4_0 / Q8_0 block
Q4_0_BYTES = 2 + QK // 2
Q8_0_BYTES = 2 + QK


def gguf_grid(form: BlockQuant | None, bits: int) -> BlockQuant | None:
    """``form`` in blocks of 32 when GGUF's ``bits``-bit block type (Q4_0, Q8_0) writes it exactly; else None.
    A narrower symmetric grid (3-bit codes for Q4_0) is written widened, exactly."""
    if form is None or form.bits > bits or form.zeros is not None or QK not in form.choices:
        return None
    form = form.widened(bits)
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


QK_K = 256  # values per K-quant super-block
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2
_EPS = 1e-15  # ggml's GROUP_MAX_EPS


def _nearest(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even."""
    return np.rint(x).astype(np.int32)


def _sum(v: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, as ggml's C loops add them."""
    return np.cumsum(v, axis=1, dtype=np.float32)[:, -1]


def _subblock_scales(x: np.ndarray, nmax: int = 32) -> np.ndarray:
    """ggml's ``make_qx_quants(16, 32, x, L, 1, NULL)`` for every 16-value sub-block of ``x [S, 16]``:
    the scale minimising the x^2-weighted error over 19 trial inverse scales."""
    big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]  # signed value of largest |x|
    live = np.abs(big) >= _EPS
    safe = np.where(live, big, np.float32(1.0))
    w = x * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
        return _sum(w * x * q), _sum(w * q * q)

    sumlx, suml2 = fit(np.float32(-nmax) / safe)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0.0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        sumlx, suml2 = fit(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / safe)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, 1), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(live, scale, 0.0).astype(np.float32)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q6_K as ggml's ``quantize_row_q6_K_ref`` (6-bit values, an int8 scale per 16,
    an fp16 scale per 256): uint8 ``[..., K / 256 * 210]``. gguf-py reads Q6_K but cannot write it."""
    shape = w.shape
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, QK_K)
    blocks = len(x)
    sub = _subblock_scales(x.reshape(-1, 16)).reshape(blocks, 16)
    pick = np.take_along_axis(sub, np.abs(sub).argmax(axis=1)[:, None], axis=1)[:, 0]
    live = np.abs(pick) >= _EPS
    iscale = np.where(live, -128.0 / np.where(live, pick, 1.0), 0.0).astype(np.float32)
    d = np.where(live, 1.0 / np.where(live, iscale, 1.0), 0.0).astype(np.float16)
    scales = np.minimum(127, _nearest(iscale[:, None] * sub)).astype(np.int8)
    dd = d.astype(np.float32)[:, None] * scales.astype(np.float32)  # [B, 16]
    safe = np.where(dd == 0, 1.0, dd)
    q = np.clip(_nearest(x.reshape(blocks, 16, 16) / safe[:, :, None]), -32, 31) + 32
    q = np.where(dd[:, :, None] == 0, 32, q).astype(np.uint8).reshape(blocks, 2, 4, 32)  # halves of 128
    ql = np.stack([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4], axis=2)
    qh = q[:, :, 0] >> 4 | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6
    out = np.concatenate([ql.reshape(blocks, -1), qh.reshape(blocks, -1), scales.view(np.uint8),
                          d.reshape(blocks, 1).view(np.uint8)], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q6_K_BYTES)
