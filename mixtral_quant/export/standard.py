"""The decoder layer for ``--target standard``: ai.onnx ops only (opset 17), any ONNX runtime.

Every quantized weight is dequantized to float (exactly ``get_method(cfg).dequantize``): standard
ONNX has no blockwise-quantized MatMul this model's formats map onto.

- attention: rotary from a Gather of cos/sin tables by position, keys/values concatenated onto the
  past, grouped heads by broadcasting ``[B, G, rep, S, D] @ [B, G, 1, D, T]``, and one explicit
  mask (causal, sliding window, padding; a padding query sees itself) as an additive bias;
- MoE: computed densely over all experts (``[E, N, I]`` activations), mixed with a ``[N, E]``
  weight matrix holding the renormalised top-k probabilities (ScatterElements) and zeros elsewhere;
- norms, the attention softmax and the router softmax run in float32 also for fp16 exports.

Shape legend: B batch, S new tokens, T keys, G kv heads, rep query heads per kv head, D head dim,
M hidden, I expert dim, E experts, K active experts, N tokens (B*S).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

from mixtral_quant.export.common import (
    ExportContext,
    LinearWeights,
    Signals,
    float_matmul,
    rms_norm_ops,
    rotary_cache,
)
from mixtral_quant.export.graph import GraphBuilder


class StandardOps:
    """Builds one decoder's attention, norms and feed-forward blocks with standard ops."""

    def __init__(self, ctx: ExportContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.fp16 = ctx.dtype.numpy == np.float16

    def to_float(self, g: GraphBuilder, x: str) -> str:
        return g.op("Cast", x, to=TensorProto.FLOAT) if self.fp16 else x

    def to_model(self, g: GraphBuilder, x: str) -> str:
        return g.op("Cast", x, to=TensorProto.FLOAT16) if self.fp16 else x

    def prepare(self, g: GraphBuilder, s: Signals) -> None:
        cfg, dt = self.cfg, self.ctx.dtype.numpy
        allowed = g.op("LessOrEqual", s.k_idx, s.q_idx)  # [S, T] causal
        if cfg.sliding_window is not None:
            in_window = g.op("Less", g.op("Sub", s.q_idx, s.k_idx), g.i64(cfg.sliding_window))
            allowed = g.op("And", allowed, in_window)
        allowed = g.op("And", allowed, g.op("Unsqueeze", s.key_real, g.i64(1, 2)))  # [B, 1, S, T]
        allowed = g.op("Or", allowed, s.self_key)
        bias = g.op("Where", allowed, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32))
        self.bias = g.op("Unsqueeze", bias, g.i64(1))  # [B, 1, 1, S, T] float32
        cos, sin = rotary_cache(cfg, full=True)
        cos_pos = g.op("Gather", g.initializer("rotary.cos", cos.astype(dt)), s.positions)  # [B, S, D]
        sin_pos = g.op("Gather", g.initializer("rotary.sin", sin.astype(dt)), s.positions)
        self.cos4, self.sin4 = (g.op("Unsqueeze", t, g.i64(1)) for t in (cos_pos, sin_pos))  # [B, 1, S, D]
        self.cos5, self.sin5 = (g.op("Unsqueeze", t, g.i64(1, 2)) for t in (cos_pos, sin_pos))  # [B, 1, 1, S, D]

    # Norms ------------------------------------------------------------------------------------------
    def rms_norm(self, g: GraphBuilder, x: str, weight: np.ndarray) -> str:
        return rms_norm_ops(g, x, weight, self.cfg.rms_norm_eps)

    def add_rms_norm(self, g: GraphBuilder, x: str, residual: str, weight: np.ndarray) -> tuple[str, str]:
        total = g.op("Add", residual, x)
        return self.rms_norm(g, total, weight), total

    # Blocks -----------------------------------------------------------------------------------------
    def linear(self, g: GraphBuilder, x: str, lin: LinearWeights, component: str) -> str:
        self.ctx.note(component, "MatMul (float)" if lin.quant is None else "MatMul (dequantized float)")
        return float_matmul(g, self.ctx, x, lin.dequantized(), lin.prefix)

    def rotate(self, g: GraphBuilder, x: str, cos: str, sin: str) -> str:
        """``x * cos + rotate_half(x) * sin`` (non-interleaved halves)."""
        half = self.cfg.head_dim // 2
        x1, x2 = g.node("Split", [x, g.i64(half, half)], 2, axis=-1)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def attention(self, g: GraphBuilder, layer: int, h: str, past_k: str, past_v: str, present: tuple[str, str]) -> str:
        cfg, ctx = self.cfg, self.ctx
        p = f"model.layers.{layer}.self_attn"
        d, nh, nkv, m = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
        q = self.linear(g, h, ctx.linear(f"{p}.q_proj", nh * d, m), "attention")
        k = self.linear(g, h, ctx.linear(f"{p}.k_proj", nkv * d, m), "attention")
        v = self.linear(g, h, ctx.linear(f"{p}.v_proj", nkv * d, m), "attention")
        q = g.op("Transpose", g.op("Reshape", q, g.i64(0, 0, nkv, cfg.n_rep, d)), perm=[0, 2, 3, 1, 4])  # [B,G,rep,S,D]
        k = g.op("Transpose", g.op("Reshape", k, g.i64(0, 0, nkv, d)), perm=[0, 2, 1, 3])  # [B, G, S, D]
        v = g.op("Transpose", g.op("Reshape", v, g.i64(0, 0, nkv, d)), perm=[0, 2, 1, 3])
        q = self.rotate(g, q, self.cos5, self.sin5)
        k = self.rotate(g, k, self.cos4, self.sin4)
        keys = g.node("Concat", [past_k, k], outputs=[present[0]], axis=2)[0]  # [B, G, T, D]
        values = g.node("Concat", [past_v, v], outputs=[present[1]], axis=2)[0]
        k_t = g.op("Transpose", g.op("Unsqueeze", keys, g.i64(2)), perm=[0, 1, 2, 4, 3])  # [B, G, 1, D, T]
        scores = self.to_float(g, g.op("MatMul", q, k_t))  # [B, G, rep, S, T]
        scores = g.op("Add", g.op("Mul", scores, g.const(d**-0.5, np.float32)), self.bias)
        probs = self.to_model(g, g.op("Softmax", scores, axis=-1))
        out = g.op("MatMul", probs, g.op("Unsqueeze", values, g.i64(2)))  # [B, G, rep, S, D]
        out = g.op("Reshape", g.op("Transpose", out, perm=[0, 3, 1, 2, 4]), g.i64(0, 0, nh * d))  # [B, S, H*D]
        ctx.note("attention core", "MatMul/Softmax attention with explicit causal+window+padding mask")
        return self.linear(g, out, ctx.linear(f"{p}.o_proj", m, nh * d), "attention")

    def moe(self, g: GraphBuilder, layer: int, h: str) -> str:
        cfg, ctx = self.cfg, self.ctx
        assert cfg.moe is not None
        p, e = f"model.layers.{layer}.block_sparse_moe", cfg.num_experts
        m, i = cfg.hidden_size, cfg.intermediate_size
        x = g.op("Reshape", h, g.i64(-1, m))  # [N, M]
        gate = ctx.linear(f"{p}.gate", e, m)
        logits = self.to_float(g, float_matmul(g, ctx, x, gate.dequantized(), f"{p}.gate"))  # [N, E]
        probs = g.op("Softmax", logits, axis=-1)
        top, idx = g.node("TopK", [probs, g.i64(cfg.moe.num_experts_per_tok)], 2, axis=-1)  # [N, K]
        top = g.op("Div", top, g.op("ReduceSum", top, g.i64(-1), keepdims=1))
        zeros = g.op("ConstantOfShape", g.op("Shape", probs), value=np_tensor(0.0))
        mix = g.op("ScatterElements", zeros, idx, top, axis=1)  # [N, E], zero for unselected experts
        mix = self.to_model(g, g.op("Unsqueeze", g.op("Transpose", mix, perm=[1, 0]), g.i64(2)))  # [E, N, 1]

        def stacked(name: str, shape: list[int]) -> str:
            o, k = (i, m) if name != "w2" else (m, i)
            chunks = (ctx.linear(f"{p}.experts.{x_}.{name}", o, k).dequantized().T for x_ in range(e))
            return g.streamed_initializer(f"{p}.experts.{name}_t", ctx.dtype.numpy, shape, chunks)

        w1, w3, w2 = stacked("w1", [e, m, i]), stacked("w3", [e, m, i]), stacked("w2", [e, i, m])
        gate_act = g.op("MatMul", x, w1)  # [E, N, I]
        act = g.op("Mul", g.op("Mul", gate_act, g.op("Sigmoid", gate_act)), g.op("MatMul", x, w3))
        y = g.op("MatMul", act, w2)  # [E, N, M]
        out = g.op("ReduceSum", g.op("Mul", y, mix), g.i64(0), keepdims=0)  # [N, M]
        ctx.note(
            "experts",
            "dense over all experts, [N, E] mixing weights" + ("" if ctx.quant is None else ", dequantized float"),
        )
        return g.op("Reshape", out, g.op("Shape", h))


def np_tensor(value: float) -> TensorProto:
    """A one-element float32 TensorProto (ConstantOfShape's ``value``)."""
    return numpy_helper.from_array(np.array([value], dtype=np.float32))
