"""The decoder layer for ``--target ort``: onnxruntime contrib ops as its 1.31 CPU kernels accept them.

- norms: SkipSimplifiedLayerNormalization (residual add fused); the first layer's input norm, which
  has no residual to fuse, in ai.onnx ops (SimplifiedLayerNormalization is outside the checker's domains);
- attention: RotaryEmbedding on q and k with per-token positions, then GroupQueryAttention with
  ``do_rotary=0``. GQA's own rotary uses only the first position id of each row in a prompt, which
  is wrong for left-padded rows, so rotary runs outside. Every row is given the padded length
  (``seqlens_k = total_length - 1``) and padding enters through ``attention_bias``; the kernel's
  window is then in padded indices, and ``local_window_size = sliding_window`` reproduces
  "q - k < window" exactly (checked numerically: ``sliding_window - 1`` does not). The bias lets a
  padding query see itself, as the reference does. GQA also accepts onnxruntime-genai's shared
  max-length KV buffer (``past_present_share_buffer``), the standard target's Concat does not;
- linears: MatMulNBits (GPTQ 4/8-bit, LLM.int8 and W8 as 8-bit with zero point 128; groups or whole
  rows split into power-of-two blocks sharing their scale), MatMulBnb4
  (NF4 codes and absmax as stored), else MatMul on the float weight;
- experts: QMoE when every expert linear has a block form of the same bits and one block size fits
  them all (QMoE has a single ``block_size`` for fc1 and fc2: a group is split into power-of-two
  blocks sharing its scale, so w1/w3 with one group per row and w2 with several still fit; per-row
  scales when every linear has one group per row): GPTQ 4/8-bit with the artifact's scales and zero
  points, LLM.int8/W8 as 8-bit with one scale per row (no ``block_size``: the CPU kernel then
  keeps fp32 activations; block-wise 8-bit would quantize activations to int8), NF4
  re-quantized to asymmetric 8- or 4-bit blocks (:class:`NF4Experts`).
  Otherwise MoE on the dequantized float weights. Both take raw router logits and fc1 rows
  interleaved gate/up (g0, u0, g1, u1, ...), with all five inputs (fc1 bias left empty).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from mixtral_quant.config import MixtralConfig
from mixtral_quant.export.common import (
    ExportContext,
    LinearWeights,
    Signals,
    block_quant,
    block_signature,
    bnb4,
    codebook,
    float_matmul,
    matmul_block,
    requantize,
    rms_norm_ops,
    rotary_cache,
    shared_block,
)
from mixtral_quant.export.graph import GraphBuilder
from mixtral_quant.quant.block_form import BlockQuant, runnable_bits
from mixtral_quant.quant.packing import pack_uint4_low_first


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[..., k]`` -> uint8 ``[..., k*bits/8]`` (4-bit: low nibble first)."""
    if bits == 8:
        return codes.astype(np.uint8)
    return pack_uint4_low_first(torch.from_numpy(np.ascontiguousarray(codes))).numpy()


def pack_zeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Zero points ``[..., g]`` packed along the last axis, padded to whole bytes."""
    if bits == 4 and zeros.shape[-1] % 2:
        zeros = np.concatenate([zeros, np.zeros((*zeros.shape[:-1], 1), np.uint8)], axis=-1)
    return pack_codes(zeros, bits)


class OrtOps:
    """Builds one decoder's attention, norms and feed-forward blocks with contrib ops."""

    def __init__(self, ctx: ExportContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg

    def prepare(self, g: GraphBuilder, s: Signals) -> None:
        dt = self.ctx.dtype.numpy
        self.positions = s.positions
        one = g.i64(1)
        self.seqlens_k = g.op("Cast", g.op("Expand", g.op("Sub", s.total, one), s.batch), to=TensorProto.INT32)
        self.total_len = g.op("Cast", g.op("Squeeze", s.total, g.i64(0)), to=TensorProto.INT32)
        key_real = g.op("Unsqueeze", s.key_real, g.i64(1, 2))  # [B, 1, 1, T]
        allowed = g.op("Or", key_real, s.self_key)  # [B, 1, S, T]; causal and window are GQA's
        self.bias = g.op("Where", allowed, g.const(0.0, dt), g.const(np.finfo(dt).min, dt))
        cos, sin = rotary_cache(self.cfg, full=False)
        self.cos = g.initializer("rotary.cos_cache", cos.astype(dt))
        self.sin = g.initializer("rotary.sin_cache", sin.astype(dt))

    # Norms ------------------------------------------------------------------------------------------
    def rms_norm(self, g: GraphBuilder, x: str, weight: np.ndarray) -> str:
        return rms_norm_ops(g, x, weight, self.cfg.rms_norm_eps)

    def add_rms_norm(self, g: GraphBuilder, x: str, residual: str, weight: np.ndarray) -> tuple[str, str]:
        """(rms_norm(x + residual), x + residual)."""
        w = g.initializer("norm.weight", weight)
        out = g.ms("SkipSimplifiedLayerNormalization", [x, residual, w], 4, epsilon=self.cfg.rms_norm_eps)
        return out[0], out[3]

    # Linears ----------------------------------------------------------------------------------------
    def linear(self, g: GraphBuilder, x: str, lin: LinearWeights, component: str) -> str:
        saved, g.scope = g.scope, f"/{lin.prefix}"
        try:
            return self._linear(g, x, lin, component)
        finally:
            g.scope = saved

    def _linear(self, g: GraphBuilder, x: str, lin: LinearWeights, component: str) -> str:
        ctx, k, n = self.ctx, lin.in_features, lin.out_features
        stored = block_quant(lin)
        block = None if stored is None else matmul_block(stored.choices)
        if stored is not None and block is not None:
            form = stored.at(block).widened(runnable_bits(stored.bits))  # groups split into power-of-two blocks
            if form.bits != stored.bits:
                ctx.note(component, f"{stored.bits}-bit codes widened to {form.bits} bits exactly")
            scales = form.scales.astype(ctx.dtype.numpy)  # [N, K/block]
            codes = pack_codes(form.codes, form.bits).reshape(n, k // block, block * form.bits // 8)
            inputs = [x, g.initializer("qweight", codes), g.initializer("scales", scales)]
            if form.zeros is not None:
                inputs.append(g.initializer("zero_points", pack_zeros(form.zeros, form.bits)))
            ctx.note(component, f"MatMulNBits {form.bits}-bit block {block}")
            return g.ms("MatMulNBits", inputs, K=k, N=n, bits=form.bits, block_size=block, accuracy_level=0)[0]
        nf4 = bnb4(lin)
        if nf4 is not None:
            absmax = g.initializer("absmax", nf4.absmax.astype(ctx.dtype.numpy))
            ctx.note(component, f"MatMulBnb4 block {nf4.block}")
            codes_name = g.initializer("qweight", nf4.codes)
            return g.ms(
                "MatMulBnb4", [x, codes_name, absmax], K=k, N=n, block_size=nf4.block, quant_type=nf4.quant_type
            )[0]
        ctx.note(component, "MatMul (float)" if lin.quant is None else "MatMul (dequantized float)")
        return float_matmul(g, ctx, x, lin.dequantized(), "linear")

    # Blocks -----------------------------------------------------------------------------------------
    def attention(self, g: GraphBuilder, layer: int, h: str, past_k: str, past_v: str, present: tuple[str, str]) -> str:
        cfg = self.cfg
        p = f"model.layers.{layer}.self_attn"
        d, nh, nkv, m = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
        q = self.linear(g, h, self.ctx.linear(f"{p}.q_proj", nh * d, m), "attention")
        k = self.linear(g, h, self.ctx.linear(f"{p}.k_proj", nkv * d, m), "attention")
        v = self.linear(g, h, self.ctx.linear(f"{p}.v_proj", nkv * d, m), "attention")
        q = g.ms("RotaryEmbedding", [q, self.positions, self.cos, self.sin], num_heads=nh, interleaved=0)[0]
        k = g.ms("RotaryEmbedding", [k, self.positions, self.cos, self.sin], num_heads=nkv, interleaved=0)[0]
        inputs = [q, k, v, past_k, past_v, self.seqlens_k, self.total_len, "", "", "", self.bias]
        out = g.node(
            "GroupQueryAttention",
            inputs,
            domain="com.microsoft",
            outputs=[g.fresh("attn"), present[0], present[1]],
            num_heads=nh,
            kv_num_heads=nkv,
            local_window_size=cfg.sliding_window if cfg.sliding_window is not None else -1,
            do_rotary=0,
        )[0]
        self.ctx.note("attention core", "RotaryEmbedding + GroupQueryAttention (attention_bias for padding)")
        return self.linear(g, out, self.ctx.linear(f"{p}.o_proj", m, nh * d), "attention")

    def moe(self, g: GraphBuilder, layer: int, h: str) -> str:
        ctx, cfg = self.ctx, self.cfg
        saved, g.scope = g.scope, f"/model.layers.{layer}.block_sparse_moe"
        try:
            router = self.router_logits(g, layer, h)
            plan = plan_experts(ctx, layer)
            if plan is None:
                fc1, fc2 = float_experts(g, ctx, layer)
                ctx.note("experts", "MoE (float)" if ctx.quant is None else "MoE (dequantized float)")
                return g.ms("MoE", [h, router, fc1, "", fc2], **moe_attrs(cfg))[0]
            inputs, attrs = quantized_experts(g, ctx, layer, plan)
            ctx.note("experts", f"QMoE {plan[0]}-bit " + (f"block {plan[1]}" if plan[1] else "per-row scales"))
            return g.ms("QMoE", [h, router, *inputs], **moe_attrs(cfg), **attrs)[0]
        finally:
            g.scope = saved

    def router_logits(self, g: GraphBuilder, layer: int, h: str) -> str:
        """Raw router logits ``[B*S, E]`` (MoE/QMoE take logits and apply softmax, top-k themselves)."""
        cfg = self.cfg
        gate = self.ctx.linear(f"model.layers.{layer}.block_sparse_moe.gate", cfg.num_experts, cfg.hidden_size)
        logits = float_matmul(g, self.ctx, h, gate.dequantized(), "router")
        return g.op("Reshape", logits, g.i64(-1, cfg.num_experts))


# Experts ------------------------------------------------------------------------------------------------
ExpertPlan = tuple[int, int | None, bool]  # QMoE (bits, block or None for per-row scales, zero points given)


def moe_attrs(cfg: MixtralConfig) -> dict[str, Any]:
    assert cfg.moe is not None
    return {
        "k": cfg.moe.num_experts_per_tok,
        "activation_type": "swiglu",
        "swiglu_fusion": 1,
        "normalize_routing_weights": 1,
        "activation_alpha": 1.0,
        "activation_beta": 0.0,
    }


def expert_prefix(layer: int, expert: int, name: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{name}"


def expert_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of w1 (gate), w3 (up), w2 (down)."""
    m, i = cfg.hidden_size, cfg.intermediate_size
    return {"w1": (i, m), "w3": (i, m), "w2": (m, i)}


def plan_experts(ctx: ExportContext, layer: int) -> ExpertPlan | None:
    """The QMoE layout every expert of ``layer`` fits, or None (float MoE). Reads no packed weights."""
    cfg, q = ctx.cfg, ctx.quant
    if q is None:
        return None
    if codebook(q):
        grid = ctx.nf4_experts.grid
        if grid is None or cfg.hidden_size % grid[1] or cfg.intermediate_size % grid[1]:
            return None
        return grid[0], grid[1], True
    sigs = []
    for e in range(cfg.num_experts):
        for name, (o, i) in expert_shapes(cfg).items():
            sig = block_signature(
                ctx.linear(expert_prefix(layer, e, name), o, i, skip=frozenset({"qweight", "weight"}))
            )
            if sig is None:
                return None
            sigs.append(sig)
    fits, block = shared_block([s.choices for s in sigs])  # one block_size for fc1 and fc2
    # one width for all: narrower grids (2/3-bit, or 4-bit beside 8-bit experts) widened exactly
    bits = runnable_bits(max(s.bits for s in sigs))
    widened = sorted({s.bits for s in sigs} - {bits})
    if fits and widened:
        ctx.note("experts", f"{'/'.join(map(str, widened))}-bit codes widened to {bits} bits exactly")
    return (bits, block, any(s.has_zeros for s in sigs)) if fits else None


def interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Rows g0, u0, g1, u1, ... (the CPU kernels' fused SwiGLU layout)."""
    return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def expert_form(ctx: ExportContext, layer: int, expert: int, name: str, block: int | None, bits: int
                ) -> BlockQuant:  # fmt: skip
    """The expert linear's codes, scales and zeros in blocks of ``block``, ``bits`` wide (the plan's)."""
    o, i = expert_shapes(ctx.cfg)[name]
    lin = ctx.linear(expert_prefix(layer, expert, name), o, i)
    grid = ctx.nf4_experts.grid
    if codebook(lin.quant) and grid is not None:
        return requantize(lin, *grid).at(block).widened(bits)
    form = block_quant(lin)
    assert form is not None, "plan_experts admitted a linear with no block form"
    return form.at(block).widened(bits)


def float_experts(g: GraphBuilder, ctx: ExportContext, layer: int) -> tuple[str, str]:
    """fc1 [E, 2I, M] (gate/up interleaved) and fc2 [E, M, I], streamed one expert at a time."""
    cfg, dt = ctx.cfg, ctx.dtype.numpy
    e, m, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    shapes = expert_shapes(cfg)

    def deq(expert: int, name: str) -> np.ndarray:
        return ctx.linear(expert_prefix(layer, expert, name), *shapes[name]).dequantized()

    fc1 = g.streamed_initializer(
        "fc1.weight", dt, [e, 2 * i, m], (interleave(deq(x, "w1"), deq(x, "w3")) for x in range(e))
    )
    fc2 = g.streamed_initializer("fc2.weight", dt, [e, m, i], (deq(x, "w2") for x in range(e)))
    return fc1, fc2


def quantized_experts(
    g: GraphBuilder, ctx: ExportContext, layer: int, plan: ExpertPlan
) -> tuple[list[str], dict[str, int]]:
    """QMoE inputs from fc1_experts_weights on, and its quantization attributes."""
    bits, block, has_zeros = plan
    cfg, dt = ctx.cfg, ctx.dtype.numpy
    e, m, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    grids: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"fc1": [], "fc2": []}  # (scales, zeros) per expert

    def fc1_chunks() -> Iterator[np.ndarray]:
        for x in range(e):
            f1, f3 = expert_form(ctx, layer, x, "w1", block, bits), expert_form(ctx, layer, x, "w3", block, bits)
            grids["fc1"].append((interleave(f1.scales, f3.scales), interleave(zeros_of(f1), zeros_of(f3))))
            yield pack_codes(interleave(f1.codes, f3.codes), bits)

    def fc2_chunks() -> Iterator[np.ndarray]:
        for x in range(e):
            f2 = expert_form(ctx, layer, x, "w2", block, bits)
            grids["fc2"].append((f2.scales, zeros_of(f2)))
            yield pack_codes(f2.codes, bits)

    inputs = [g.streamed_initializer("fc1.qweight", np.uint8, [e, 2 * i, m * bits // 8], fc1_chunks())]
    fc1_scales, fc1_zeros = grid_tensors(grids["fc1"], bits, block)
    inputs += [g.initializer("fc1.scales", fc1_scales.astype(dt)), ""]
    inputs.append(g.streamed_initializer("fc2.qweight", np.uint8, [e, m, i * bits // 8], fc2_chunks()))
    fc2_scales, fc2_zeros = grid_tensors(grids["fc2"], bits, block)
    inputs.append(g.initializer("fc2.scales", fc2_scales.astype(dt)))
    if has_zeros:
        inputs += [
            "",
            "",
            "",
            "",
            g.initializer("fc1.zero_points", fc1_zeros),
            g.initializer("fc2.zero_points", fc2_zeros),
        ]
    attrs = {"expert_weight_bits": bits, "accuracy_level": 0}
    if block is not None:
        attrs["block_size"] = block
    return inputs, attrs


def zeros_of(form: BlockQuant) -> np.ndarray:
    """The form's zero points, the default ``2**(bits-1)`` written out when it has none."""
    if form.zeros is not None:
        return form.zeros
    return np.full(form.scales.shape, 2 ** (form.bits - 1), np.uint8)


def grid_tensors(
    grids: list[tuple[np.ndarray, np.ndarray]], bits: int, block: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Scales and packed zero points of all experts: [E, N] and [E, N*bits/8] per row, else
    [E, N, K/block] and [E, N, ceil(K/block*bits/8)]."""
    scales = np.stack([s for s, _ in grids])
    zeros = np.stack([z for _, z in grids])
    if block is None:
        return scales[..., 0], pack_zeros(zeros[..., 0], bits)
    return scales, pack_zeros(zeros, bits)
