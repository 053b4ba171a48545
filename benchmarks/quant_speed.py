"""Section 2, quantization speed on Mixtral-8x7B's expert shapes (random weights and activations).

GPTQ: ours (``mixtral_quant.quant`` GPTQ method) against GPTQModel's ``GPTQ`` on the same weight and
the same calibration activations; seconds and relative output error ``|XW^T - XQ^T|^2 / |XW^T|^2``.
NF4 and int8: our method's ``quantize()`` against the bare bitsandbytes call it wraps; the ratio is
the overhead (ours also dequantizes once to record the weight error).
"""

from __future__ import annotations

import time
from typing import Any

import bitsandbytes.functional as bnbf
import torch
from torch import nn

from benchmarks.table import Figure, Row, Status, median_seconds
from mixtral_quant.quant import HessianAccumulator, MethodName, QuantConfig, get_method

SECTION = "quant speed"
HIDDEN, INTER = 4096, 14336  # Mixtral-8x7B
GPTQMODEL_INSTALL = "pip install --no-deps -r scripts/gptqmodel-requirements.txt"


def _out_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    ref = x @ w.t()
    return float(((x @ q.float().t() - ref) ** 2).sum() / (ref**2).sum())


def _ours_gptq(w: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    acc = HessianAccumulator(w.shape[1])
    acc.add(x)
    method = get_method(QuantConfig(MethodName.GPTQ, bits=4, group_size=128, sym=True, act_order=False))
    result = method.quantize(w, acc.hessian)
    seconds = time.perf_counter() - start
    return seconds, _out_error(x, w, method.dequantize(result.tensors))


def _gptqmodel_gptq(w: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    start = time.perf_counter()
    g = GPTQ(linear, QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.01))
    g.quantizer.configure(perchannel=True)  # what GPTQModel's GPTQProcessor sets
    g.fallback = None
    g.add_batch(x[None], None)
    q = g.quantize(blocksize=128)[0]
    seconds = time.perf_counter() - start
    return seconds, _out_error(x, w, q)


def _gptqmodel_missing() -> str | None:
    try:
        import gptqmodel  # noqa: F401
    except ImportError as e:
        return f"GPTQModel not importable ({e}); install: {GPTQMODEL_INSTALL}"
    return None


def gptq_rows(quick: bool, say: Any) -> list[Row]:
    shapes = [("w1", INTER, HIDDEN)] if quick else [("w1", INTER, HIDDEN), ("w2", HIDDEN, INTER)]
    tokens = 256 if quick else 2048
    missing = _gptqmodel_missing()
    rows = []
    for name, out_f, in_f in shapes:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        x = torch.randn(tokens, in_f, generator=gen)
        label = f"ours GPTQ 4-bit g128 sym (no act-order), {name} [{out_f}, {in_f}], {tokens} tokens"
        say(f"quant speed: ours GPTQ {name}")
        s, err = _ours_gptq(w, x)
        ours: dict[str, Figure] = {"seconds": s, "out rel err": err}
        peer = "GPTQModel 7.7 GPTQ (same settings, same activations)"
        note = "seconds include the Hessian from the activations; single run each"
        if missing:
            rows.append(Row(SECTION, label, peer, "seconds", "lower", ours, {}, 1, Status.SKIPPED, missing))
            continue
        say(f"quant speed: GPTQModel GPTQ {name}")
        s2, err2 = _gptqmodel_gptq(w, x)
        rows.append(Row(SECTION, label, peer, "seconds", "lower", ours, {"seconds": s2, "out rel err": err2}, 1,
                        note=note))  # fmt: skip
    return rows


def bare_rows(quick: bool, say: Any) -> list[Row]:
    repeats = 3 if quick else 5
    w = torch.randn(INTER, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.02
    shape = f"[{INTER}, {HIDDEN}] fp32"
    say("quant speed: NF4 / int8 overhead")
    nf4 = get_method(QuantConfig(MethodName.NF4, bits=4, nf4_blocksize=64, double_quant=True))
    int8 = get_method(QuantConfig(MethodName.INT8, bits=8))
    ours_nf4 = median_seconds(lambda: nf4.quantize(w), repeats)
    bare_nf4 = median_seconds(lambda: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
                              repeats)  # fmt: skip
    w16 = w.to(torch.float16)
    ours_i8 = median_seconds(lambda: int8.quantize(w), repeats)
    bare_i8 = median_seconds(lambda: bnbf.int8_vectorwise_quant(w16), repeats)
    note = "median after one warm-up call"
    return [
        Row(SECTION, f"ours NF4 quantize() {shape}", "bitsandbytes functional.quantize_4bit (nf4, 64, double quant)",
            "seconds", "lower", {"seconds": ours_nf4}, {"seconds": bare_nf4}, repeats,
            note=note + "; ours also dequantizes once to record the weight MSE"),
        Row(SECTION, f"ours int8 quantize() {shape}", "bitsandbytes functional.int8_vectorwise_quant (fp16 input)",
            "seconds", "lower", {"seconds": ours_i8}, {"seconds": bare_i8}, repeats,
            note=note + "; ours includes the fp32->fp16 cast and the dequantize for the weight MSE"),
    ]  # fmt: skip


def run(quick: bool, say: Any) -> list[Row]:
    return gptq_rows(quick, say) + bare_rows(quick, say)
