"""What both export targets share: options, graph I/O names, and the artifact's weights in ONNX-ready forms.

A quantized linear is read once from the artifact (its stored tensors, Hub names) and offered in
the forms the graphs consume, each exact against ``get_method(cfg).dequantize(tensors)``:

- :class:`~mixtral_quant.quant.block_form.BlockQuant`: ``W[n, k] = (codes[n, k] - zero[n, g]) *
  scale[n, g]``, groups of ``block`` along K, as the method's own ``block_form`` gives it (GPTQ/RTN
  4- and 8-bit with contiguous groups, LLM.int8, W8; none for NF4 and Q4_K, whose grids are not
  integer codes times a scale less an integer zero). :meth:`BlockQuant.at` re-blocks it.
- :class:`~mixtral_quant.quant.block_form.Bnb4`: bitsandbytes NF4 codes as stored plus the (de-nested)
  absmax per block (NF4's ``bnb4_form``).
- the dequantized float weight, always available (the standard target and every fallback).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from mixtral_quant.checkpoint import CheckpointReader, load_config, quantization_config
from mixtral_quant.config import MixtralConfig
from mixtral_quant.errors import CheckpointError
from mixtral_quant.export.graph import GraphBuilder
from mixtral_quant.quant import MethodName, QuantConfig, Scheme, get_method, read_quantization_config, read_scheme
from mixtral_quant.quant.base import method_class
from mixtral_quant.quant.block_form import BlockQuant, Bnb4, GridSignature
from mixtral_quant.stored_linear import quantized_tensors


class Target(str, Enum):
    ORT = "ort"  # onnxruntime contrib ops (GroupQueryAttention, MoE/QMoE, MatMulNBits, MatMulBnb4)
    STANDARD = "standard"  # ai.onnx ops only; quantized weights dequantized to float


class ExportDtype(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def numpy(self) -> np.dtype[Any]:
        return np.dtype(np.float32 if self is ExportDtype.FP32 else np.float16)


class NF4Experts(str, Enum):
    """How NF4 experts reach the ORT graph: QMoE has no NF4 codebook, so they are re-quantized
    (round-to-nearest, asymmetric, blocks along K) from the dequantized NF4 weights, or kept float."""

    INT8 = "int8"  # 8-bit blocks of 64: about 8.5 bits per weight; CPU QMoE uses int8 activations
    INT4 = "int4"  # 4-bit blocks of 32: about 4.6 bits per weight, the smallest, the largest error
    FLOAT = "float"  # float MoE: exact against the NF4 weights, at float size

    @property
    def grid(self) -> tuple[int, int] | None:
        """(bits, block) of the re-quantization; None for float."""
        return {NF4Experts.INT8: (8, 64), NF4Experts.INT4: (4, 32), NF4Experts.FLOAT: None}[self]


# Graph I/O names (onnxruntime-genai and Optimum conventions); %d is the layer index.
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXPORT_INFO = "export.json"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
LOGITS = "logits"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"


# Artifact reading -----------------------------------------------------------------------------------
@contextmanager
def open_variant(folder: Path) -> Iterator[tuple[MixtralConfig, QuantConfig | None, CheckpointReader]]:
    """The config, the quantization (None: float) and a tensor reader of an artifact folder."""
    cfg = load_config(folder)
    qc = quantization_config(folder)
    with CheckpointReader(folder) as reader:
        yield cfg, (read_quantization_config(qc) if qc else None), reader


# Linear weights and their forms ---------------------------------------------------------------------
@dataclass
class LinearWeights:
    """One linear layer as stored: ``tensors`` relative to ``prefix``; ``quant`` None when float."""

    prefix: str
    out_features: int
    in_features: int
    quant: QuantConfig | None
    tensors: dict[str, torch.Tensor]

    def dequantized(self) -> np.ndarray:
        """float32 ``[out, in]``."""
        if self.quant is None:
            w = self.tensors["weight"].to(torch.float32)
        else:
            w = get_method(self.quant).dequantize(self.tensors)
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise CheckpointError(
                f"{self.prefix} has shape {tuple(w.shape)}, expected {(self.out_features, self.in_features)}"
            )
        return w.numpy()


def read_linear(
    reader: CheckpointReader,
    prefix: str,
    out_features: int,
    in_features: int,
    quant: QuantConfig | None,
    skip: frozenset[str] = frozenset(),
) -> LinearWeights:
    """The stored tensors of ``prefix`` (less ``skip``): quantized when the method's marker is present."""
    tensors = quantized_tensors(reader, get_method(quant) if quant else None, prefix, skip=skip)
    if tensors is not None:
        return LinearWeights(prefix, out_features, in_features, quant, tensors)
    return LinearWeights(prefix, out_features, in_features, None, {"weight": reader.get(f"{prefix}.weight")})


def matmul_block(choices: frozenset[int | None]) -> int | None:
    """The block MatMulNBits takes among ``choices``: the largest; None when none is a size."""
    return max((b for b in choices if b is not None), default=None)


def shared_block(choices: list[frozenset[int | None]]) -> tuple[bool, int | None]:
    """(fits, block) for one QMoE over linears with these choices: per-row scales when every linear
    allows them, else the largest block they all allow; ``fits`` False when they share none."""
    common = frozenset.intersection(*choices) if choices else frozenset()
    if not common:
        return False, None
    return True, None if None in common else matmul_block(common)


def method_form(lin: LinearWeights, name: str) -> Any:
    """The quantization method's optional form ``name`` (``block_form``, ``bnb4_form``, ``gguf_rows``, ...:
    see :class:`~mixtral_quant.quant.base.Method`) as a bound method; None for a float linear or a method
    that has no such form."""
    return getattr(get_method(lin.quant), name, None) if lin.quant is not None else None


def block_signature(lin: LinearWeights) -> GridSignature | None:
    """The signature of :func:`block_quant`'s form, read without the codes; None when it has none."""
    form = method_form(lin, "block_signature")
    return None if form is None else form(lin.tensors, lin.in_features)


def block_quant(lin: LinearWeights) -> BlockQuant | None:
    """The linear as integer codes with scales and zeros on its stored grid, exactly (the method's
    ``block_form``); None when it has no such form. :meth:`BlockQuant.at` re-blocks it."""
    form = method_form(lin, "block_form")
    return None if form is None else form(lin.tensors, lin.in_features)


def bnb4(lin: LinearWeights) -> Bnb4 | None:
    """The linear as MatMulBnb4 takes it (the method's ``bnb4_form``); None when it has no such form."""
    form = method_form(lin, "bnb4_form")
    return None if form is None else form(lin.tensors)


def codebook(q: QuantConfig | None) -> bool:
    """Whether the method of ``q`` stores codes on a codebook (``bnb4_form``: NF4 / FP4), which QMoE cannot
    run: its experts are re-quantized (:func:`requantize`, ``--nf4-experts``) or exported float."""
    return q is not None and hasattr(method_class(q.method_name), "bnb4_form")


def requantize(lin: LinearWeights, bits: int, block: int) -> BlockQuant:
    """Round-to-nearest asymmetric ``bits``-bit blocks of the dequantized weight (NF4 experts)."""
    cfg = QuantConfig.of(MethodName.RTN, bits=bits, group_size=block, sym=False)
    w = torch.from_numpy(lin.dequantized())
    stored = LinearWeights(lin.prefix, lin.out_features, lin.in_features, cfg, get_method(cfg).quantize(w).tensors)
    form = block_quant(stored)
    assert form is not None  # RTN output is always a contiguous-group grid of 4 or 8 bits
    return form


# What a target needs while it builds ------------------------------------------------------------------
@dataclass
class ExportContext:
    """The artifact being exported and the choices made so far: ``notes`` maps each component to the
    ONNX ops it became, over the whole graph; ``layer_notes`` the same per decoder layer (``layer``
    is the one being built, None outside the layers)."""

    cfg: MixtralConfig
    quant: QuantConfig | None
    reader: CheckpointReader
    dtype: ExportDtype
    nf4_experts: NF4Experts = NF4Experts.INT8
    notes: dict[str, set[str]] = field(default_factory=dict)
    layer_notes: dict[int, dict[str, set[str]]] = field(default_factory=dict)
    layer: int | None = None
    scheme: Scheme | None = None  # each linear's settings (a mixed-width artifact's differ); read from the folder

    def __post_init__(self) -> None:
        if self.scheme is None and self.quant is not None:
            qc = quantization_config(self.reader.folder)
            self.scheme = read_scheme(qc) if qc else None

    def linear(
        self, prefix: str, out_features: int, in_features: int, skip: frozenset[str] = frozenset()
    ) -> LinearWeights:
        quant = self.scheme.config_for(prefix) if self.scheme is not None else self.quant
        return read_linear(self.reader, prefix, out_features, in_features, quant, skip)

    def vector(self, name: str) -> np.ndarray:
        """A float tensor (norm weight, embedding) in the export dtype."""
        return self.reader.get(name).to(torch.float32).numpy().astype(self.dtype.numpy)

    def note(self, component: str, mapping: str) -> None:
        self.notes.setdefault(component, set()).add(mapping)
        if self.layer is not None:
            self.layer_notes.setdefault(self.layer, {}).setdefault(component, set()).add(mapping)


def rotary_cache(cfg: MixtralConfig, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin float32 ``[max_positions, D/2]`` (``[.., D]`` with ``full``), as :func:`rotary_tables` computes."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(cfg.max_position_embeddings).float()[:, None] * inv_freq  # [P, D/2]
    if full:
        freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos().numpy(), freqs.sin().numpy()


def rms_norm_ops(g: GraphBuilder, x: str, weight: np.ndarray, eps: float) -> str:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` in ai.onnx ops, computed in float32 for fp16 inputs.

    onnxruntime's SimplifiedLayerNormalization sits in the ai.onnx domain, which the ONNX checker
    rejects, so the ORT target uses this too where no residual add can be fused.
    """
    fp16 = weight.dtype == np.float16
    xf = g.op("Cast", x, to=TensorProto.FLOAT) if fp16 else x
    mean_sq = g.op("ReduceMean", g.op("Mul", xf, xf), axes=[-1], keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_sq, g.const(eps, np.float32))))
    y = g.op("Mul", xf, inv)
    y = g.op("Cast", y, to=TensorProto.FLOAT16) if fp16 else y
    return g.op("Mul", g.initializer("norm.weight", weight), y)


def float_matmul(g: GraphBuilder, ctx: ExportContext, x: str, weight: np.ndarray, hint: str) -> str:
    """``x @ weight.T`` for a float ``weight [out, in]`` stored transposed in the export dtype."""
    w = g.initializer(f"{hint}.weight_t", np.ascontiguousarray(weight.T.astype(ctx.dtype.numpy)))
    return g.op("MatMul", x, w)


@dataclass
class Signals:
    """Graph values every layer reads, computed once from input_ids and attention_mask."""

    batch: str  # int64 [1]
    seq: str  # int64 [1], new tokens S
    total: str  # int64 [1], cached + new T
    positions: str  # int64 [B, S]: cumsum(mask) - 1, clamped at 0, last S
    key_real: str  # bool [B, T]: attention_mask == 1
    q_idx: str  # int64 [S, 1]: padded index of each new token (T - S + s)
    k_idx: str  # int64 [1, T]
    self_key: str  # bool [S, T]: k == q (a padding query still sees itself)
