"""GPTQ maths: the input Hessian, the column sweep with lazy block updates, and round-to-nearest.

Follows IST-DASLab ``gptq.py`` (Frantar et al., "GPTQ", 2022) and its descendants
(AutoGPTQ, GPTQModel, llm-compressor ``quantize_weight``). Shapes: ``O`` output features,
``I`` input features, ``G`` groups (``I / group_size``), ``T`` calibration tokens.

Two choices beyond the reference, both so the stored checkpoint is exact:

- scales are rounded to float16 before any code is chosen (the checkpoint stores fp16 scales),
  so ``scales * (q - zero)`` from the returned tensors is bit-for-bit the stored weight;
- asymmetric grids keep their zero point >= 1: the ``gptq`` v1 checkpoint stores ``zero - 1``
  and every kernel adds 1 back without wrapping, so a zero of 0 cannot be stored. A group whose
  minimum would round to zero 0 gets zero 1 and a scale stretched to keep its maximum.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mixtral_quant.errors import ConfigError, MixtralQuantError
from mixtral_quant.quant.base import ROW_BAND, QuantConfig

MAX_DAMP_RETRIES = 4  # damping grows x10 per retry: 0.01 -> 100 times the mean diagonal at most
_MIN_SCALE = float(torch.finfo(torch.float16).tiny)  # smallest normal fp16


@dataclass(frozen=True)
class GPTQOptions:
    """The settings of the GPTQ-layout methods (GPTQ, RTN, AWQ, Q4_K), named as GPTQModel's quantize_config
    names them: ``act_order`` is ``desc_act``; with ``static_groups`` the groups' scales and zeros are fixed
    from the unquantized weights before the column sweep, so ``g_idx`` stays ``i // group_size`` even with
    act-order. ``damp_percent`` is the fraction of the mean Hessian diagonal added to it; with
    ``damp_auto_increase`` a failed Cholesky multiplies it by 10, up to ``MAX_DAMP_RETRIES`` times."""

    sym: bool = True
    act_order: bool = False
    static_groups: bool = True
    damp_percent: float = 0.01
    damp_auto_increase: bool = True
    lazy_block: int = 128
    true_sequential: bool = True  # recorded in quantization_config; the driver's ordering

    def __post_init__(self) -> None:
        if not 0.0 < self.damp_percent < 1.0:
            raise ConfigError(f"damp_percent {self.damp_percent} is invalid: it must lie in (0, 1)")
        if self.lazy_block <= 0:
            raise ConfigError(f"lazy_block {self.lazy_block} is invalid: it must be positive")


def gptq_options(cfg: QuantConfig) -> GPTQOptions:
    """The GPTQ settings of a GPTQ-layout method's config."""
    assert isinstance(cfg.options, GPTQOptions), cfg
    return cfg.options


class HessianNotPositiveDefinite(MixtralQuantError):
    """Cholesky of the damped Hessian failed at every damping tried."""


def unusable_hessian(hessian: torch.Tensor | None) -> str | None:
    """Why GPTQ cannot use ``hessian`` before trying it (the reason its fallback records), or None."""
    if hessian is None:
        return "no Hessian"
    if not bool(hessian.diagonal().any()):
        return "empty Hessian (no nonzero input seen)"
    return None


class HessianAccumulator:
    """Running ``H = 2/n * sum_t x_t x_t^T`` over calibration tokens, in float32.

    ``n`` counts tokens (rows of ``x``), so experts that see different token counts get Hessians
    on the same scale. The running-mean update (``H *= n/(n+m)`` before adding) follows the
    reference and keeps the entries from growing with the token count.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x [..., I]`` (any float dtype; flattened to ``[T, I]``)."""
        if x.shape[-1] != self.in_features:
            raise MixtralQuantError(f"Hessian input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.reshape(-1, self.in_features).to(device=self.hessian.device, dtype=torch.float32)
        tokens = x.shape[0]
        if tokens == 0:
            return
        total = self.count + tokens
        self.hessian.mul_(self.count / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.count = total


class QuantizedWeight(NamedTuple):
    """Integer codes and grid of one weight: ``W[o, i] ~ scales[g, o] * (qint[o, i] - zeros[g, o])``
    with ``g = g_idx[i]``."""

    qint: torch.Tensor  # int32 [O, I], in [0, 2**bits)
    scales: torch.Tensor  # float32 [G, O], fp16-representable
    zeros: torch.Tensor  # int32 [G, O], the true zero point
    g_idx: torch.Tensor  # int32 [I]
    info: dict[str, float | int | str]


def group_grid(w: torch.Tensor, bits: int, sym: bool, clip: torch.Tensor | float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Scale and zero (both float32 ``[...]``) of the min/max grid over the last dim of ``w``.

    The reference ``Quantizer.find_params``: the range always includes 0; symmetric grids have
    zero ``(maxq + 1) / 2``; an all-zero row gets range [-1, 1]. ``clip`` (``[...]`` or a number
    in (0, 1]) shrinks each min and max before the grid is made: the values outside it are clipped
    by the codes' range (AWQ's clipping search picks it).
    """
    maxq = 2**bits - 1
    xmin = w.amin(-1).clamp(max=0.0)
    xmax = w.amax(-1).clamp(min=0.0)
    if clip is not None:
        xmin, xmax = xmin * clip, xmax * clip
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
        low = zero < 1  # not storable in gptq v1: move the zero to 1 and stretch the scale
        scale = torch.where(low, xmax / (maxq - 1), scale)
        zero = torch.where(low, 1.0, zero)
    scale = scale.clamp(min=_MIN_SCALE).to(torch.float16).to(torch.float32)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as float32 (scale/zero broadcast)."""
    return (w / scale).round_().add_(zero).clamp_(0, 2**bits - 1)  # in place after the division


def trivial_group_size(g_idx: torch.Tensor, groups: int) -> int | None:
    """The group size when ``g_idx`` is ``i // size`` (no act-order, or act-order with static groups)."""
    n_in = g_idx.shape[0]
    if n_in % groups:
        return None
    size = n_in // groups
    trivial = torch.arange(n_in, device=g_idx.device, dtype=torch.int64) // size
    return size if torch.equal(g_idx.to(torch.int64), trivial) else None


def grouped_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None,
                       size: int | None = None) -> torch.Tensor:
    """float32 ``scales[g] * (codes - zeros[g])`` with ``g = g_idx[i]``: codes ``[I, O]``, grid ``[G, O]``.

    With a trivial ``g_idx`` the grid is broadcast over each group's rows instead of gathered per
    row: the same values for a fraction of the memory traffic. A caller that knows the groups are runs of
    ``size`` inputs passes it (and no ``g_idx``) to skip the check."""
    n_in, n_out = codes.shape
    s, z = scales.to(torch.float32), zeros.to(torch.float32)
    q = codes.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # one buffer, worked in place
    if size is None and g_idx is not None:
        size = trivial_group_size(g_idx, s.shape[0])
    if size is not None:
        return q.view(-1, size, n_out).sub_(z[:, None, :]).mul_(s[:, None, :]).view(n_in, n_out)
    assert g_idx is not None
    idx = g_idx.long()
    return q.sub_(z[idx]).mul_(s[idx])


def dequantize_gptq(qint: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """float32 ``[O, I]`` weight from codes ``[O, I]``, scales/zeros ``[G, O]`` and ``g_idx [I]``."""
    return grouped_dequantize(qint.t(), scales, zeros, g_idx).t()


def rtn_quantize(weight: torch.Tensor, cfg: QuantConfig, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest on the min/max grid of each group (shrunk by ``clip [O, G]`` when given);
    same outputs as :func:`gptq_quantize`."""
    out_features, in_features = weight.shape
    group = cfg.group_size_for(in_features)
    w = weight.to(torch.float32)
    grouped = w.reshape(out_features, in_features // group, group)  # [O, G, g]
    scale, zero = group_grid(grouped, cfg.bits, gptq_options(cfg).sym, clip)  # [O, G]
    q = quantize_codes(grouped, scale[..., None], zero[..., None], cfg.bits)
    g_idx = torch.arange(in_features, device=w.device, dtype=torch.int32) // group
    result = QuantizedWeight(
        q.reshape(out_features, in_features).to(torch.int32),
        scale.t().contiguous(),
        zero.t().contiguous().to(torch.int32),
        g_idx,
        {},
    )
    return result


def invert_lower_(m: torch.Tensor, leaf: int = 512) -> None:
    """``m <- m^-1`` in place for a lower-triangular ``m``, by halves: ``[[A, 0], [C, D]]^-1`` is
    ``[[A^-1, 0], [-D^-1 C A^-1, D^-1]]``. The corner comes from two triangular solves against the
    factor as it is, then ``A`` and ``D`` are inverted where they lie (LAPACK's trtri's n^3/3 flops,
    in BLAS-3 calls that torch has on CPU and CUDA). ``m`` is column-major (a transposed contiguous
    buffer, the layout torch's solvers work in); the temporaries are two of a quarter of its size."""
    n = m.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=m.dtype, device=m.device)
        m.copy_(torch.linalg.solve_triangular(m, eye, upper=False))
        return
    k = n // 2
    a, c, d = m[:k, :k], m[k:, :k], m[k:, k:]
    corner = torch.linalg.solve_triangular(d, c, upper=False)  # D^-1 C
    c.copy_(torch.linalg.solve_triangular(a, corner, upper=False, left=False).neg_())
    del corner
    invert_lower_(a, leaf)
    invert_lower_(d, leaf)


class InverseFactor:
    """The upper Cholesky factor ``U`` of ``(H + damp I)^-1`` held as ``J L^-1 J``: ``L^-1`` in one
    ``[I, I]`` buffer and ``J`` (order reversal) applied to the blocks read, so no flipped copy of
    the whole matrix is ever made."""

    def __init__(self, lower_inv: torch.Tensor) -> None:
        self.lower_inv = lower_inv
        self.n = lower_inv.shape[0]

    def rows(self, i1: int, i2: int) -> torch.Tensor:
        """``U[i1:i2, i1:]``, a contiguous copy."""
        n = self.n
        return self.lower_inv[n - i2 : n - i1, : n - i1].flip(0, 1).contiguous()


def _all_finite(t: torch.Tensor) -> bool:
    """Every element finite, without an elementwise temporary (max and min propagate NaN)."""
    return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))


def _damped_inverse_cholesky(h: torch.Tensor, perm: torch.Tensor, cfg: QuantConfig
                             ) -> tuple[InverseFactor, float, int]:  # fmt: skip
    """The inverse Cholesky factor of ``(H + damp I)`` with rows and columns in the order ``perm``
    (``U^T U = (P H P^T + damp I)^-1``), the damp percent used, and the retries taken.

    With ``J`` the order-reversing permutation and ``J H J = L L^T``: ``H^-1 = (J L^-1 J)^T (J L^-1 J)``
    and ``J L^-1 J`` is upper-triangular with a positive diagonal, so it is that factor. One Cholesky and
    one triangular inverse: half the flops of the reference's Cholesky, ``cholesky_inverse`` and second
    Cholesky (at w2's 14336 inputs, 18 s instead of 37 s on 2 cores). Memory besides ``h``: one
    ``[I, I]`` buffer (the reordered, damped copy, factored and inverted in place) and two of a quarter."""
    n = h.shape[0]
    # the mean of the reordered diagonal, summed as torch sums a matrix diagonal (a strided vector: a
    # contiguous one is summed in another order, and the last bit of the damping would follow it)
    diag = torch.empty(n, 2, dtype=h.dtype, device=h.device)[:, 0]
    diag.copy_(h.diagonal().index_select(0, perm))
    mean_diag = float(diag.mean())
    opts = gptq_options(cfg)
    percent = opts.damp_percent
    retries = MAX_DAMP_RETRIES if opts.damp_auto_increase else 0
    rev = perm.flip(0)
    for attempt in range(retries + 1):
        # J P H P^T J in a column-major buffer, a band of rows at a time; factored and inverted in place
        work = torch.empty_like(h).t()
        for r in range(0, n, 1024):
            work[r : r + 1024] = h.index_select(0, rev[r : r + 1024]).index_select(1, rev)
        work.diagonal().add_(percent * mean_diag)
        _, info = torch.linalg.cholesky_ex(work, out=(work, torch.empty((), dtype=torch.int32, device=h.device)))
        if int(info) == 0:
            invert_lower_(work)
            if _all_finite(work) and bool((work.diagonal() > 0).all()):
                return InverseFactor(work), percent, attempt
        del work
        percent *= 10.0
    raise HessianNotPositiveDefinite(
        f"GPTQ Hessian is not positive definite even with damp_percent {percent / 10:g}: "
        "use more calibration tokens, raise damp_percent, or fall back to RTN"
    )


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig) -> QuantizedWeight:
    """GPTQ of ``weight [O, I]`` against ``hessian [I, I]`` (see :class:`HessianAccumulator`).

    The sweep works on ``W^T [I, O]``: the column being quantized is a contiguous row and the error
    spreads over whole rows, about four times faster than column slices of ``W`` on a CPU at
    Mixtral-8x7B's shapes. Rows of ``W`` never mix (every update is a row-wise axpy or a product
    whose reduction runs over the inputs), so linears that share an input can be quantized as one
    stacked matrix with the same codes (:func:`gptq_quantize_stacked`).

    info: ``damp_percent`` (final), ``damp_retries``, ``dead_columns``, ``gptq_loss`` (the
    reference's summed ``(w - q)^2 / d^2 / 2``). The output error of every linear is measured once, by
    the calibration driver.
    """
    return gptq_quantize_stacked([weight], hessian, cfg)[0]


class AffineGrid(NamedTuple):
    """A fixed grid given by the caller, float32 ``[G, O]`` each (groups of ``cfg.group_size`` inputs in
    input order): code ``q`` of a group stands for ``scale * q - offset`` and is chosen as
    ``clamp(round((w + offset) / scale), 0, maxq)`` (0 where the scale is 0); llama.cpp's K-quants."""

    scale: torch.Tensor
    offset: torch.Tensor


def gptq_quantize_stacked(weights: list[torch.Tensor], hessian: torch.Tensor, cfg: QuantConfig,
                          grid: AffineGrid | None = None) -> list[QuantizedWeight]:  # fmt: skip
    """GPTQ of linears that share one input (q/k/v; an expert's w1/w3) as one matrix: one damped
    inverse Cholesky and one sweep, split back into one :class:`QuantizedWeight` per linear.

    With ``grid`` (over the stacked rows) the sweep quantizes onto it as onto static groups, and the
    results' ``zeros`` hold its offsets (float32)."""
    in_features, opts = weights[0].shape[1], gptq_options(cfg)
    for weight in weights:
        if weight.dim() != 2 or weight.shape[1] != in_features or hessian.shape != (in_features, in_features):
            raise MixtralQuantError(
                f"Hessian shape {tuple(hessian.shape)} does not match weight {list(weight.shape)}"
            )
    rows = [w.shape[0] for w in weights]
    starts = list(itertools.accumulate(rows, initial=0))[:-1]  # of each linear's rows in the stack
    out_features = sum(rows)
    group, bits, device = cfg.group_size_for(in_features), cfg.bits, weights[0].device
    h = hessian.to(device=device, dtype=torch.float32)  # the caller's, unless moved
    if not _all_finite(h):
        raise MixtralQuantError("GPTQ Hessian holds NaN or inf: check the calibration inputs")

    dead = h.diagonal() == 0  # inputs never active: weight irrelevant, keep H invertible
    fix = bool(dead.any())
    if fix:  # H[j, j] = 1 for the sweep; put back below, so the caller's Hessian ends as it was
        h.diagonal()[dead] = 1.0
    try:
        perm = torch.arange(in_features, device=device)
        if opts.act_order:  # columns with the largest Hessian diagonal first
            perm = torch.argsort(h.diagonal(), descending=True)
        hinv, damp, retries = _damped_inverse_cholesky(h, perm, cfg)
    finally:
        if fix:
            h.diagonal()[dead] = 0.0

    n_groups = in_features // group
    static = opts.static_groups or grid is not None
    if grid is None:
        scales = torch.zeros(n_groups, out_features, device=device)
        zeros = torch.zeros(n_groups, out_features, device=device)
    else:  # division by an infinite scale gives code 0 where the scale is 0
        scales, zeros = grid.scale.to(device), grid.offset.to(device)
        divisor = torch.where(scales == 0, torch.inf, scales)
    # W^T [I, O] in sweep order (float32, a copy; dead inputs zeroed), and the static grids of the
    # un-permuted rows, both built a band at a time from the weights as stored
    wt = torch.empty(in_features, out_features, dtype=torch.float32, device=device)
    for weight, start in zip(weights, starts, strict=True):
        for r in range(0, in_features, ROW_BAND):
            wt[r : r + ROW_BAND, start : start + weight.shape[0]] = weight.index_select(1, perm[r : r + ROW_BAND]).t()
        if opts.static_groups and grid is None:  # grids fixed before the sweep, on un-permuted columns
            for r in range(0, weight.shape[0], ROW_BAND):
                wide = weight[r : r + ROW_BAND].to(torch.float32, copy=True)  # never a view of the caller's
                wide[:, dead] = 0.0
                fitted = group_grid(wide.reshape(wide.shape[0], n_groups, group), bits, opts.sym)
                scales[:, start + r : start + r + wide.shape[0]] = fitted[0].t()
                zeros[:, start + r : start + r + wide.shape[0]] = fitted[1].t()
    if fix:
        wt[dead[perm]] = 0.0
    static_group_of = (perm // group).tolist()  # group of the column at each sweep position

    qt = torch.zeros(wt.shape, dtype=torch.uint8, device=device)  # codes, [I, O] (at most 8 bits)
    loss = torch.zeros(out_features, dtype=torch.float64, device=device)  # per row of W
    for i1 in range(0, in_features, opts.lazy_block):
        i2 = min(i1 + opts.lazy_block, in_features)
        w1 = wt[i1:i2].clone()
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        band = hinv.rows(i1, i2)  # U[i1:i2, i1:]
        hinv1 = band[:, : i2 - i1]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                g = static_group_of[col]
            else:
                g = col // group
                if col % group == 0:  # the reference: grid from W as of this block's start
                    scales[g], zeros[g] = group_grid(wt[col : col + group].t(), bits, opts.sym)
            wcol = w1[i]
            if grid is None:
                q = quantize_codes(wcol, scales[g], zeros[g], bits)
                err = (wcol - scales[g] * (q - zeros[g])) / hinv1[i, i]
            else:
                q = (wcol + zeros[g]).div_(divisor[g]).round_().clamp_(0, 2**bits - 1)
                err = (wcol - (scales[g] * q - zeros[g])) / hinv1[i, i]
            q1[i] = q
            w1[i:].addr_(hinv1[i, i:], err, alpha=-1.0)  # spread the error over later columns
            err1[i] = err
        qt[i1:i2] = q1
        loss += err1.square().sum(0).double() / 2  # the reference's (w - q)^2 / d^2 / 2
        wt[i2:].addmm_(band[:, i2 - i1 :].t(), err1, alpha=-1.0)  # lazy update of the columns after the block
    del wt, hinv

    invperm = torch.argsort(perm)
    # act-order without static groups forms groups in permuted order: input i sits at position invperm[i]
    g_idx = torch.arange(in_features, device=device) // group if static or not opts.act_order else invperm // group
    codes = qt.index_select(0, invperm) if opts.act_order else qt  # [I, O], inputs in order
    del qt
    out = []
    for weight, start in zip(weights, starts, strict=True):
        part = slice(start, start + weight.shape[0])
        qint = codes[:, part].t().to(torch.int32).contiguous()  # [O, I]
        part_zeros = zeros[:, part] if grid is not None else zeros[:, part].to(torch.int32)
        result = QuantizedWeight(qint, scales[:, part].contiguous(), part_zeros, g_idx.to(torch.int32), {})
        result.info.update(
            damp_percent=damp,
            damp_retries=retries,
            dead_columns=int(dead.sum()),
            gptq_loss=float(loss[part].sum()),  # informational: its last bits follow the stacking
        )
        out.append(result)
    return out
