"""llama.cpp's Q4_K grid: fit, codes, bytes and their dequantization (ggml-quants.c, ggml-common.h).

A super-block holds 256 inputs of one row as 8 sub-blocks of 32; the value of code ``q`` (0..15) in
sub-block ``j`` is ``d * sc[j] * q - dmin * m[j]``: ``d`` and ``dmin`` fp16 per super-block, ``sc``
and ``m`` 6-bit integers per sub-block. ``block_q4_K`` is 144 bytes: ``d``, ``dmin``, the 12 bytes of
the packed 6-bit scales and minimums, then 128 bytes of codes (4.5 bits per weight, as Q4_0).

:func:`q4_k_grid` is ``quantize_row_q4_K_ref`` (llama-quantize without an importance matrix): per
sub-block the weighted least-squares scale and minimum of ``make_qkx2_quants`` over 21 trial scales,
then both rounded to 6 bits against the super-block's largest. Given an ``importance`` per input
(GPTQ passes its Hessian diagonal: the mean squared activation, what llama-imatrix collects), the
fit weighs each input by it, as ggml's ``quantize_row_q4_K_impl`` weighs by the importance matrix.
The fit runs in float32 with sums taken left to right, as ggml's C loops take them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

QK_K = 256  # inputs per super-block
SUB = 32  # inputs per sub-block
Q4_K_BYTES = 2 + 2 + 12 + QK_K // 2  # 144


class Q4KGrid(NamedTuple):
    """The grid of a ``[R, K]`` weight: ``d``/``dmin`` float32 ``[R, K/256]`` (fp16 values), ``sc``/``m``
    uint8 ``[R, K/256, 8]``; ``codes`` uint8 ``[R, K]``: the fit's own codes (where ``d * sc`` is 0 the
    reference keeps them, so they are part of the bytes)."""

    d: np.ndarray
    dmin: np.ndarray
    sc: np.ndarray
    m: np.ndarray
    codes: np.ndarray

    def scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[R, K/32]`` each: a sub-block's value is ``scale * q - offset``."""
        r = self.sc.shape[0]
        scale = (self.d[:, :, None] * self.sc.astype(np.float32)).reshape(r, -1)
        offset = (self.dmin[:, :, None] * self.m.astype(np.float32)).reshape(r, -1)
        return scale, offset


def _nearest(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even."""
    return np.rint(x).astype(np.int32)


def _sum(v: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, as ggml's C loops add them."""
    return np.cumsum(v, axis=1, dtype=np.float32)[:, -1]


def _fit_subblocks(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                   nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """ggml's ``make_qkx2_quants`` on every row of ``x [S, 32]`` with weights ``w``: (scale [S],
    minimum [S] (positive: the value is ``scale * q - minimum``), codes uint8 [S, 32])."""
    f32 = np.float32
    lo = np.minimum(x.min(axis=1), f32(0))
    hi = x.max(axis=1)
    flat = hi == lo
    sum_w, sum_x = _sum(w), _sum(w * x)

    def codes(iscale: np.ndarray, low: np.ndarray) -> np.ndarray:
        return np.clip(_nearest(iscale[:, None] * (x - low[:, None])), 0, nmax).astype(f32)

    def error(scale: np.ndarray, low: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = scale[:, None] * q + low[:, None] - x
        return _sum(w * (diff * diff))

    # the reference's trials shift by, and divide the span from, the best minimum found so far
    low = lo
    iscale = f32(nmax) / np.where(flat, f32(1), hi - low)
    scale = f32(1) / iscale
    best_q = codes(iscale, low)
    best = error(scale, low, best_q)
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), hi - low)
        q = codes(iscale, low)
        wq = w * q
        sum_l, sum_l2, sum_xl = _sum(wq), _sum(wq * q), _sum(wq * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        live = det > 0
        safe = np.where(live, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(pos, f32(0), this_min)
        err = error(this_scale, this_min, q)
        better = live & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
        best_q = np.where(better[:, None], q, best_q)
    scale = np.where(flat, f32(0), scale).astype(f32)
    best_q = np.where(flat[:, None], f32(0), best_q)
    return scale, (-low).astype(f32), best_q.astype(np.uint8)


def q4_k_grid(w: np.ndarray, importance: np.ndarray | None = None) -> Q4KGrid:
    """The Q4_K grid of ``w [R, K]`` (K a multiple of 256): ``quantize_row_q4_K_ref`` without
    ``importance``; with it (float ``[K]``, >= 0), each input weighted by it in the fit."""
    r, k = w.shape
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, QK_K)  # [B, 256]
    sub = x.reshape(-1, SUB)  # [S, 32]
    if importance is None:
        av_x = np.sqrt(_sum(sub * sub) / np.float32(SUB))
        weights = av_x[:, None] + np.abs(sub)
    else:
        sigma2 = np.float32(2) * _sum(x * x) / np.float32(QK_K)  # per super-block
        imp = np.broadcast_to(np.asarray(importance, dtype=np.float32).reshape(1, -1, SUB),
                              (r, k // SUB, SUB)).reshape(-1, SUB)  # fmt: skip
        weights = imp * np.sqrt(np.repeat(sigma2, QK_K // SUB)[:, None] + sub * sub)
    scales, mins, fit_codes = _fit_subblocks(sub, weights.astype(np.float32))
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    # the reference's running maxima start at +0 (a block of zeros has minimums of -0: dmin stays +0)
    max_scale, max_min = (np.maximum(v.max(axis=1), np.float32(0)) + np.float32(0) for v in (scales, mins))
    inv_scale = np.where(max_scale > 0, np.float32(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(np.float32)
    inv_min = np.where(max_min > 0, np.float32(63) / np.where(max_min > 0, max_min, 1), 0).astype(np.float32)
    sc = np.minimum(63, _nearest(inv_scale[:, None] * scales)).astype(np.uint8)
    m = np.minimum(63, _nearest(inv_min[:, None] * mins)).astype(np.uint8)
    d = (max_scale / np.float32(63)).astype(np.float16).astype(np.float32)
    dmin = (max_min / np.float32(63)).astype(np.float16).astype(np.float32)
    blocks = k // QK_K
    grid = Q4KGrid(d.reshape(r, blocks), dmin.reshape(r, blocks), sc.reshape(r, blocks, 8), m.reshape(r, blocks, 8),
                   fit_codes.reshape(r, k))  # fmt: skip
    scale, offset = grid.scale_offset()
    return grid._replace(codes=q4_k_codes(w, scale, offset, grid.codes))


def q4_k_codes(w: np.ndarray, scale: np.ndarray, offset: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """uint8 ``[R, K]``: ``clamp(round((w + offset) / scale), 0, 15)`` per sub-block; ``fallback``'s
    codes where the scale is 0 (as the reference keeps its fit's)."""
    r, k = w.shape
    x = np.asarray(w, dtype=np.float32).reshape(r, -1, SUB)
    s, o = scale[:, :, None], offset[:, :, None]
    q = np.clip(_nearest((x + o) / np.where(s == 0, np.float32(1), s)), 0, 15).astype(np.uint8)
    return np.where(s == 0, fallback.reshape(r, -1, SUB), q).reshape(r, k)


def pack_q4_k(grid: Q4KGrid, codes: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[R, K / 256 * 144]``: ``block_q4_K`` of the grid and ``codes`` (default its own)."""
    q = grid.codes if codes is None else codes
    r, k = q.shape
    b = k // QK_K
    sc, m = grid.sc.reshape(-1, 8), grid.m.reshape(-1, 8)
    scales = np.empty((r * b, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    codes4 = q.reshape(r * b, 4, 2, SUB)  # per 64 inputs: low nibbles the first 32, high the next
    qs = (codes4[:, :, 0] | (codes4[:, :, 1] << 4)).reshape(r * b, QK_K // 2)
    d = grid.d.reshape(-1, 1).astype(np.float16).view(np.uint8)
    dmin = grid.dmin.reshape(-1, 1).astype(np.float16).view(np.uint8)
    return np.concatenate([d, dmin, scales, qs], axis=1).reshape(r, b * Q4_K_BYTES)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q4_K as llama-quantize writes it without an importance matrix."""
    shape = w.shape
    flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, shape[-1])
    return pack_q4_k(q4_k_grid(flat)).reshape(*shape[:-1], shape[-1] // QK_K * Q4_K_BYTES)


def q4_k_header(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The grid of ``block_q4_K`` bytes ``[rows, cols / 256 * 144]``, unpacked: ``d`` float32 ``[N, 2]``
    (``d``, ``dmin`` of each of the N super-blocks) and ``sm`` uint8 ``[N, 16]`` (the 8 scales, then
    the 8 minimums). 24 bytes per 256 weights: a runtime module keeps them beside the blocks so that
    a call unpacks only the codes."""
    b = blocks.reshape(-1, Q4_K_BYTES)
    d = b[:, 0:4].contiguous().view(torch.float16).float()  # [N, 2]
    s = b[:, 4:16].to(torch.int32)
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 15) | ((lo_sc >> 6) << 4)], dim=1)  # [N, 8]
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=1)
    return {"d": d, "sm": torch.cat([sc, m], dim=1).to(torch.uint8)}


def dequantize_q4_k(blocks: torch.Tensor, rows: int, cols: int, header: dict[str, torch.Tensor] | None = None
                    ) -> torch.Tensor:  # fmt: skip
    """float32 ``[rows, cols]`` from uint8 ``block_q4_K`` bytes ``[rows, cols / 256 * 144]`` (any device):
    ``(d * sc) * q - dmin * m``, as ggml's ``dequantize_row_q4_K`` computes it. ``header``: the blocks'
    :func:`q4_k_header`, when the caller keeps it."""
    h = q4_k_header(blocks) if header is None else header
    d, sm = h["d"], h["sm"]
    scale = d[:, 0:1] * sm[:, 0:8]  # [N, 8] float32: an fp16 times a 6-bit integer, exact
    low = d[:, 1:2] * sm[:, 8:16]
    qs = blocks.reshape(-1, Q4_K_BYTES)[:, 16:].view(-1, 4, 1, SUB)  # per 64 inputs: low nibbles, then high
    q = torch.cat((qs & 15, qs >> 4), dim=2).view(-1, 8, SUB)  # [N, 8, 32] uint8
    return (q * scale[:, :, None]).sub_(low[:, :, None]).view(rows, cols)
