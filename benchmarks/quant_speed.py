"""Section 2, quantization speed on Mixtral-8x7B's expert shapes (random weights and activations).

GPTQ: ours (``mixtral_quant.quant`` GPTQ method) against GPTQModel's ``GPTQ`` on the same weight and
the same calibration activations; seconds and relative output error ``|XW^T - XQ^T|^2 / |XW^T|^2``.
NF4 and int8: our method's ``quantize()`` against the bare bitsandbytes call it wraps; the ratio is
the overhead (the calibration driver measures each linear's error once, outside the method).
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
    method = get_method(QuantConfig.of(MethodName.GPTQ, bits=4, group_size=128, sym=True, act_order=False))
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


KV = 1024  # Mixtral-8x7B: 8 KV heads of 128
LINEARS = {  # name: (out, in, shared input); one expert of a layer, and its attention
    "q_proj": (HIDDEN, HIDDEN, "attn"), "k_proj": (KV, HIDDEN, "attn"), "v_proj": (KV, HIDDEN, "attn"),
    "o_proj": (HIDDEN, HIDDEN, "o"), "w1": (INTER, HIDDEN, "mlp"), "w3": (INTER, HIDDEN, "mlp"),
    "w2": (HIDDEN, INTER, "w2"),
}  # fmt: skip


def _layer_inputs(tokens: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    weights = {n: torch.randn(o, i, generator=gen) * 0.02 for n, (o, i, _) in LINEARS.items()}
    acts = {src: torch.randn(tokens, i, generator=gen) for _, i, src in LINEARS.values()}
    return weights, acts


def _ours_layer(weights: dict[str, torch.Tensor], acts: dict[str, torch.Tensor], cfg: QuantConfig
                ) -> tuple[float, dict[str, float]]:  # fmt: skip
    """Our calibration's way: one Hessian per shared input, linears sharing it quantized stacked."""
    method = get_method(cfg)
    start = time.perf_counter()
    deq: dict[str, dict[str, torch.Tensor]] = {}
    for src, x in acts.items():
        names = [n for n, (_, _, s) in LINEARS.items() if s == src]
        acc = HessianAccumulator(x.shape[1])
        acc.add(x)
        results = method.quantize_stacked([weights[n] for n in names], acc.hessian)  # type: ignore[attr-defined]
        deq |= {n: r.tensors for n, r in zip(names, results, strict=True)}
    seconds = time.perf_counter() - start
    return seconds, {n: _out_error(acts[LINEARS[n][2]], weights[n], method.dequantize(t)) for n, t in deq.items()}


def _gptqmodel_layer(weights: dict[str, torch.Tensor], acts: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    start = time.perf_counter()
    qs = {}
    for name, w in weights.items():
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.clone()
        g = GPTQ(linear, QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=True, static_groups=True,
                                         damp_percent=0.01))  # fmt: skip
        g.quantizer.configure(perchannel=True)
        g.fallback = None
        g.add_batch(acts[LINEARS[name][2]][None], None)
        qs[name] = g.quantize(blocksize=128)[0]
    seconds = time.perf_counter() - start
    return seconds, {n: _out_error(acts[LINEARS[n][2]], weights[n], q) for n, q in qs.items()}


def layer_row(quick: bool, say: Any) -> Row:
    """One Mixtral-8x7B expert (w1/w3/w2) plus the attention's q/k/v/o, as the shipped gptq-w4g128
    recipe quantizes them (act-order, static groups), against GPTQModel on the same activations."""
    tokens = 256 if quick else 2048
    label = (f"ours GPTQ 4-bit g128 act-order static groups, q/k/v/o + one expert's w1/w3/w2 at Mixtral-8x7B "
             f"shapes, {tokens} tokens")
    peer = "GPTQModel 7.7 GPTQ (same settings, same activations), linear by linear"
    missing = _gptqmodel_missing()
    weights, acts = _layer_inputs(tokens)
    say("quant speed: ours GPTQ, one expert + attention")
    cfg = QuantConfig.of(MethodName.GPTQ, bits=4, group_size=128, sym=True, act_order=True, static_groups=True)
    s, errs = _ours_layer(weights, acts, cfg)
    ours: dict[str, Figure] = {"seconds": s, "out rel err sum": sum(errs.values()), "w2 out rel err": errs["w2"]}
    note = ("seconds include the Hessians from the activations (ours: one per shared input, q/k/v and w1/w3 "
            "stacked; GPTQModel: one per linear); a whole layer's 8 experts scale this by about 8; single run each")
    if missing:
        return Row(SECTION, label, peer, "seconds", "lower", ours, {}, 1, Status.SKIPPED, missing)
    say("quant speed: GPTQModel GPTQ, one expert + attention")
    s2, errs2 = _gptqmodel_layer(weights, acts)
    theirs: dict[str, Figure] = {"seconds": s2, "out rel err sum": sum(errs2.values()), "w2 out rel err": errs2["w2"]}
    return Row(SECTION, label, peer, "seconds", "lower", ours, theirs, 1, note=note)


def bare_rows(quick: bool, say: Any) -> list[Row]:
    repeats = 3 if quick else 5
    w = torch.randn(INTER, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.02
    shape = f"[{INTER}, {HIDDEN}] fp32"
    say("quant speed: NF4 / int8 overhead")
    nf4 = get_method(QuantConfig.of(MethodName.NF4, bits=4, nf4_blocksize=64, double_quant=True))
    int8 = get_method(QuantConfig.of(MethodName.INT8, bits=8))
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
            note=note),
        Row(SECTION, f"ours int8 quantize() {shape}", "bitsandbytes functional.int8_vectorwise_quant (fp16 input)",
            "seconds", "lower", {"seconds": ours_i8}, {"seconds": bare_i8}, repeats,
            note=note + "; ours includes the fp32->fp16 cast (bitsandbytes quantizes fp16)"),
    ]  # fmt: skip


def run(quick: bool, say: Any) -> list[Row]:
    return [*gptq_rows(quick, say), layer_row(quick, say), *bare_rows(quick, say)]
