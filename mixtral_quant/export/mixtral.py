"""The Mixtral / Mistral decoder as one ONNX graph, built from an artifact's weights (no tracing).

Graph I/O (onnxruntime-genai and Optimum names):

- ``input_ids`` int64 [batch, seq]; ``attention_mask`` int64 [batch, total_seq] (1 real, 0 padding,
  left padding allowed); ``past_key_values.N.key`` / ``.value`` [batch, kv_heads, past_seq, head_dim];
- ``logits`` float32 [batch, seq, vocab]; ``present.N.key`` / ``.value`` [batch, kv_heads, total_seq, head_dim].

Positions are computed inside from the mask (``cumsum - 1`` clamped at 0, last ``seq`` of them), so
a caller passes only the mask, as onnxruntime-genai does. The layer blocks come from a target
(:class:`~mixtral_quant.export.ort.OrtOps` or :class:`~mixtral_quant.export.standard.StandardOps`);
the residual stream, embeddings and head are the same for both.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto
from tqdm import tqdm

from mixtral_quant import __version__
from mixtral_quant.artifact import (
    STATE,
    check_source,
    output_lock,
    prepare_output,
    publish,
    read_manifest,
    read_state,
    remove_scraps,
    run_errors,
    sha256_file,
    write_json,
    write_manifest,
)
from mixtral_quant.errors import CheckpointError
from mixtral_quant.export.common import (
    ATTENTION_MASK,
    DATA_FILE,
    EXPORT_INFO,
    INPUT_IDS,
    LOGITS,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    ExportContext,
    ExportDtype,
    LinearWeights,
    NF4Experts,
    Signals,
    Target,
    float_matmul,
    open_variant,
)
from mixtral_quant.export.genai import write_genai_files
from mixtral_quant.export.graph import ExternalData, GraphBuilder, save_model
from mixtral_quant.export.ort import OrtOps
from mixtral_quant.export.record import export_info
from mixtral_quant.export.standard import StandardOps

# Copied beside the graph when the variant has them, so `generate --backend onnx` finds its tokenizer.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INT64_MAX = np.iinfo(np.int64).max


class TargetOps(Protocol):
    """What a target builds; the decoder around it is shared."""

    def prepare(self, g: GraphBuilder, s: Signals) -> None: ...

    def rms_norm(self, g: GraphBuilder, x: str, weight: np.ndarray) -> str: ...

    def add_rms_norm(self, g: GraphBuilder, x: str, residual: str, weight: np.ndarray) -> tuple[str, str]: ...

    def linear(self, g: GraphBuilder, x: str, lin: LinearWeights, component: str) -> str: ...

    def attention(
        self, g: GraphBuilder, layer: int, h: str, past_k: str, past_v: str, present: tuple[str, str]
    ) -> str: ...

    def moe(self, g: GraphBuilder, layer: int, h: str) -> str: ...


def make_ops(target: Target, ctx: ExportContext) -> TargetOps:
    return OrtOps(ctx) if target is Target.ORT else StandardOps(ctx)


def signals(g: GraphBuilder, input_ids: str, mask: str) -> Signals:
    """Sizes, positions and index grids derived once from the inputs."""
    g.scope = "/signals"
    ids_shape = g.op("Shape", input_ids)
    batch = g.op("Slice", ids_shape, g.i64(0), g.i64(1))
    seq = g.op("Slice", ids_shape, g.i64(1), g.i64(2))
    total = g.op("Slice", g.op("Shape", mask), g.i64(1), g.i64(2))
    past = g.op("Sub", total, seq)
    cumsum = g.op("CumSum", mask, g.const(1, np.int64))
    positions = g.op("Max", g.op("Sub", cumsum, g.const(1, np.int64)), g.const(0, np.int64))  # [B, T]
    positions = g.op("Slice", positions, g.op("Neg", seq), g.i64(INT64_MAX), g.i64(1))  # [B, S]
    scalar = [g.op("Squeeze", t, g.i64(0)) for t in (past, total)]
    one = g.const(1, np.int64)
    q_idx = g.op("Unsqueeze", g.op("Range", scalar[0], scalar[1], one), g.i64(1))  # [S, 1]
    k_idx = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), scalar[1], one), g.i64(0))  # [1, T]
    key_real = g.op("Cast", mask, to=TensorProto.BOOL)
    self_key = g.op("Equal", q_idx, k_idx)
    g.scope = ""
    return Signals(batch, seq, total, positions, key_real, q_idx, k_idx, self_key)


def dense_mlp(g: GraphBuilder, ops: TargetOps, ctx: ExportContext, layer: int, h: str) -> str:
    """Mistral's SwiGLU MLP: down(silu(gate(h)) * up(h))."""
    cfg = ctx.cfg
    p, m, i = f"model.layers.{layer}.mlp", cfg.hidden_size, cfg.intermediate_size
    gate = ops.linear(g, h, ctx.linear(f"{p}.gate_proj", i, m), "mlp")
    up = ops.linear(g, h, ctx.linear(f"{p}.up_proj", i, m), "mlp")
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    return ops.linear(g, act, ctx.linear(f"{p}.down_proj", m, i), "mlp")


def build_decoder(g: GraphBuilder, ctx: ExportContext, ops: TargetOps, progress: bool,
                  on_layer: Callable[[int], None] | None = None) -> None:
    """The whole graph; ``on_layer(i)`` runs once layer ``i``'s weights are all in the data file."""
    cfg = ctx.cfg
    elem = TensorProto.FLOAT16 if ctx.dtype is ExportDtype.FP16 else TensorProto.FLOAT
    kv_shape: list[int | str | None] = ["batch_size", cfg.num_key_value_heads, "past_sequence_length", cfg.head_dim]
    ids = g.input(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = g.input(ATTENTION_MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"])
    pasts = [
        (g.input(PAST_KEY % i, elem, kv_shape), g.input(PAST_VALUE % i, elem, kv_shape))
        for i in range(cfg.num_hidden_layers)
    ]
    s = signals(g, ids, mask)
    ops.prepare(g, s)

    embed = ctx.vector("model.embed_tokens.weight")
    x = g.op("Gather", g.initializer("model.embed_tokens.weight", embed), ids)  # [B, S, M]
    ctx.note("embeddings", "Gather (float)")
    h = ops.rms_norm(g, x, ctx.vector("model.layers.0.input_layernorm.weight"))
    for i in tqdm(range(cfg.num_hidden_layers), desc="export layers", disable=not progress):
        g.scope, ctx.layer = f"/model/layers.{i}", i
        past_k, past_v = pasts[i]
        attn = ops.attention(g, i, h, past_k, past_v, present_names(i))
        h, x = ops.add_rms_norm(g, attn, x, ctx.vector(f"model.layers.{i}.post_attention_layernorm.weight"))
        y = ops.moe(g, i, h) if cfg.moe is not None else dense_mlp(g, ops, ctx, i, h)
        last = i + 1 == cfg.num_hidden_layers
        next_norm = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        h, x = ops.add_rms_norm(g, y, x, ctx.vector(next_norm))
        if on_layer is not None:
            on_layer(i)
    g.scope, ctx.layer = "/lm_head", None
    logits = float_matmul(g, ctx, h, lm_head_weight(ctx), "lm_head")
    ctx.note("lm_head", "MatMul (float)")
    if elem != TensorProto.FLOAT:
        logits = g.op("Cast", logits, to=TensorProto.FLOAT)
    g.output(logits, LOGITS, TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])
    kv_out: list[int | str | None] = ["batch_size", cfg.num_key_value_heads, "total_sequence_length", cfg.head_dim]
    for key, value in (present_names(i) for i in range(cfg.num_hidden_layers)):
        g.output(key, key, elem, kv_out)
        g.output(value, value, elem, kv_out)


def present_names(layer: int) -> tuple[str, str]:
    return PRESENT_KEY % layer, PRESENT_VALUE % layer


def lm_head_weight(ctx: ExportContext) -> np.ndarray:
    cfg = ctx.cfg
    if "lm_head.weight" not in ctx.reader.where and cfg.tie_word_embeddings:
        return ctx.reader.get("model.embed_tokens.weight").float().numpy()
    return ctx.linear("lm_head", cfg.vocab_size, cfg.hidden_size).dequantized()


def export_onnx(
    variant: Path,
    out: Path,
    target: Target = Target.ORT,
    dtype: ExportDtype = ExportDtype.FP32,
    overwrite: bool = False,
    progress: bool = True,
    *,
    nf4_experts: NF4Experts = NF4Experts.INT8,
    resume: bool = False,
    no_verify: bool = False,
) -> Path:
    """Export the artifact folder ``variant`` to ``out``: model.onnx, model.onnx.data, export.json
    (source, choices, the op each component became), the variant's tokenizer files and a manifest.

    The folder is built in ``<out>.partial`` and renamed into place once the checker has passed; an
    existing ``out`` is refused unless ``overwrite``. After each layer the data file is synced and
    ``state.json`` records its length: ``resume`` continues an interrupted export from there (the
    graph is derived again; the bytes already written are checked, not rewritten).
    """
    variant, out = Path(variant), Path(out)
    with run_errors(out), output_lock(out), open_variant(variant) as (cfg, quant, reader):  # a broken source fails here
        identity = {
            "source": source_identity(variant, quant is not None, no_verify),
            "target": target.value,
            "dtype": dtype.value,
            "nf4_experts": nf4_experts.value,
            "tool_version": __version__,
        }
        work = prepare_output(out, overwrite, resume, variant)
        keep = 0
        if resume and (work / STATE).is_file():
            state = read_state(work, identity, {"data_bytes": int, "layers_done": int},
                               "another variant or other options")
            keep = state["data_bytes"]
        ctx = ExportContext(cfg, quant, reader, dtype, nf4_experts)
        with closing(ExternalData(work / DATA_FILE, keep)) as data:
            g = GraphBuilder(data, name=f"{cfg.model_type}_decoder")

            def commit(i: int) -> None:
                if data.offset > keep:  # layers inside the reused prefix change nothing
                    state = {"identity": identity, "layers_done": i + 1, "data_bytes": data.commit()}
                    write_json(work / STATE, state)

            try:
                build_decoder(g, ctx, make_ops(target, ctx), progress, commit)
            except CheckpointError:
                data.close()
                shutil.rmtree(work, ignore_errors=True)  # a damaged source: nothing here can be resumed
                raise
            data.commit()
        model_path = work / MODEL_FILE
        save_model(g.model(doc=f"{cfg.model_type} decoder exported by mixtral-quant from {variant.name}"), model_path)
        onnx.checker.check_model(str(model_path))
        (work / EXPORT_INFO).write_text(json.dumps(export_info(ctx, variant, target), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (variant / name).is_file():
                shutil.copyfile(variant / name, work / name)
        write_genai_files(cfg, work, target)
        (work / STATE).unlink(missing_ok=True)
        remove_scraps(work)
        write_manifest(work, {"export": {k: v for k, v in identity.items() if k != "source"},
                              "source_files": identity["source"], "source_model": variant.name})
        return publish(work, out)


def source_identity(variant: Path, quantized: bool, no_verify: bool = False) -> dict[str, str]:
    """The variant's file hashes: from its manifest when it has one (checked), else computed; a
    quantized folder without a manifest only with ``no_verify``."""
    check_source(variant, quantized, no_verify)
    manifest = read_manifest(variant)
    if manifest is not None:
        return dict(manifest["files"])
    return {p.name: sha256_file(p) for p in sorted(variant.iterdir()) if p.is_file()}
