"""GGUF for llama.cpp: a float model or any artifact of ours as one .gguf file, streamed layer by layer.

    mixtral-quant export gguf exports/gptq-w4g32 --out exports/tiny-q4_0.gguf --type q4_0

llama.cpp reads Mixtral as architecture ``llama`` with ``expert_count`` / ``expert_used_count``; per
layer ``attn_q/k/v/output`` (q and k rows in llama.cpp's rotary order), ``ffn_gate_inp`` (the
router, F32) and the experts stacked as ``ffn_gate_exps`` (w1), ``ffn_up_exps`` (w3) and
``ffn_down_exps`` (w2) of shape [experts, rows, cols]. A linear whose grid is GGUF's block type
(symmetric 4-bit or 8-bit with fp16 scales over 32 inputs, or groups that split into such blocks)
is written code for code; any other is dequantized and re-quantized with llama.cpp's own
round-to-nearest (gguf-py's port of ggml's reference quantizer), and the record says which.

The file is written as ``FILE.partial`` and renamed into place when complete; ``FILE.manifest.json``
beside it records its sha256, the source's files and what each component became.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from mixtral_quant import __version__
from mixtral_quant.artifact import output_lock, run_errors, sha256_file, write_json
from mixtral_quant.config import MixtralConfig
from mixtral_quant.errors import CheckpointError, IntegrityError, MixtralQuantError
from mixtral_quant.export.common import (
    ExportContext,
    ExportDtype,
    LinearWeights,
    block_quant,
    method_form,
    open_variant,
)
from mixtral_quant.export.gguf_blocks import QK_K, gguf_grid, pack_exact, quantize_q6_k, rope_rows
from mixtral_quant.export.gguf_vocab import add_vocab, read_vocab
from mixtral_quant.export.mixtral import lm_head_weight, source_identity
from mixtral_quant.export.record import op_lines
from mixtral_quant.quant.q4_k import quantize_q4_k

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
MANIFEST_SUFFIX = ".manifest.json"
FORMAT = "mixtral-quant-gguf"


class GGUFType(str, Enum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q6_K = "q6_k"
    Q4_K = "q4_k"
    Q4_0 = "q4_0"

    @property
    def ggml(self) -> gguf.GGMLQuantizationType:
        return getattr(Q, self.name)

    @property
    def bits(self) -> int | None:
        """The width of our grids it holds exactly; None for the float types."""
        return {GGUFType.Q8_0: 8, GGUFType.Q4_0: 4}.get(self)

    @property
    def file_type(self) -> gguf.LlamaFileType:
        names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_K": "MOSTLY_Q4_K_S"}
        return gguf.LlamaFileType[names.get(self.name, f"MOSTLY_{self.name}")]


FOUR_BIT = (GGUFType.Q4_0, GGUFType.Q4_K)


@dataclass(frozen=True)
class GGUFOptions:
    """``linear``: the decoder's linears (experts, attention); ``embedding`` defaults to ``linear``,
    ``output`` to ``linear`` too but for Q4_0, whose output is Q6_K as llama-quantize makes it (Q8_0
    when the hidden size is not a multiple of 256). ``kv`` (attention k and v) defaults to ``linear``,
    but for an 8-expert model re-quantized from float at Q4_0, where llama-quantize makes them Q8_0."""

    linear: GGUFType = GGUFType.F16
    embedding: GGUFType | None = None
    output: GGUFType | None = None
    kv: GGUFType | None = None

    @property
    def embedding_type(self) -> GGUFType:
        return self.embedding or self.linear

    def kv_type(self, cfg: MixtralConfig, from_float: bool) -> GGUFType:
        if self.kv is not None:
            return self.kv
        eight = cfg.moe is not None and cfg.moe.num_local_experts == 8
        return GGUFType.Q8_0 if self.linear in FOUR_BIT and eight and from_float else self.linear

    def output_type(self, hidden_size: int) -> GGUFType:
        if self.output is not None or self.linear not in FOUR_BIT:
            return self.output or self.linear
        return GGUFType.Q6_K if hidden_size % QK_K == 0 else GGUFType.Q8_0


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: ``shape`` of the float tensor it stores (rows last), and its type."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def byte_shape(self) -> tuple[int, ...]:
        if self.qtype in (Q.F32, Q.F16):
            return self.shape
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        width = {Q.F32: 4, Q.F16: 2}.get(self.qtype, 1)
        return int(np.prod(self.byte_shape)) * width

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype({Q.F32: np.float32, Q.F16: np.float16}.get(self.qtype, np.uint8))


@dataclass(frozen=True)
class Piece:
    """A tensor to write and how to make it: ``make(ctx)`` returns its data in ``plan.dtype``."""

    plan: TensorPlan
    component: str
    layer: int | None
    make: Callable[[ExportContext], np.ndarray]


# What the decoder's tensors are ----------------------------------------------------------------------
def pieces(cfg: MixtralConfig, opts: GGUFOptions, from_float: bool) -> list[Piece]:
    """Every tensor of the file, in the order written (token_embd, the layers, output)."""
    m, d, vocab = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    f32, lin, kv = Q.F32, opts.linear.ggml, opts.kv_type(cfg, from_float).ggml
    emb, head = opts.embedding_type.ggml, opts.output_type(m).ggml
    out = [Piece(TensorPlan("token_embd.weight", (vocab, m), emb), "embeddings", None,
                 lambda ctx: _noted(ctx, "embeddings", emb, _tensor(ctx, "model.embed_tokens.weight")))]
    for i in range(cfg.num_hidden_layers):
        p, blk = f"model.layers.{i}", f"blk.{i}"
        out += [
            _norm(f"{blk}.attn_norm.weight", f"{p}.input_layernorm.weight", m, i),
            _linear(f"{blk}.attn_q.weight", "attention", i, [f"{p}.self_attn.q_proj"], (nh * d, m), lin, nh),
            _linear(f"{blk}.attn_k.weight", "attention", i, [f"{p}.self_attn.k_proj"], (nkv * d, m), kv, nkv),
            _linear(f"{blk}.attn_v.weight", "attention", i, [f"{p}.self_attn.v_proj"], (nkv * d, m), kv),
            _linear(f"{blk}.attn_output.weight", "attention", i, [f"{p}.self_attn.o_proj"], (m, nh * d), lin),
            _norm(f"{blk}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight", m, i),
        ]
        if cfg.moe is None:
            inter = cfg.intermediate_size
            out += [
                _linear(f"{blk}.ffn_gate.weight", "mlp", i, [f"{p}.mlp.gate_proj"], (inter, m), lin),
                _linear(f"{blk}.ffn_up.weight", "mlp", i, [f"{p}.mlp.up_proj"], (inter, m), lin),
                _linear(f"{blk}.ffn_down.weight", "mlp", i, [f"{p}.mlp.down_proj"], (m, inter), lin),
            ]
            continue
        e, inter = cfg.moe.num_local_experts, cfg.intermediate_size
        experts = f"{p}.block_sparse_moe.experts"
        out += [
            _linear(f"{blk}.ffn_gate_inp.weight", "router", i, [f"{p}.block_sparse_moe.gate"], (e, m), f32),
            _linear(f"{blk}.ffn_gate_exps.weight", "experts", i, [f"{experts}.{x}.w1" for x in range(e)],
                    (inter, m), lin),
            _linear(f"{blk}.ffn_up_exps.weight", "experts", i, [f"{experts}.{x}.w3" for x in range(e)],
                    (inter, m), lin),
            _linear(f"{blk}.ffn_down_exps.weight", "experts", i, [f"{experts}.{x}.w2" for x in range(e)],
                    (m, inter), lin),
        ]
    out += [
        _norm("output_norm.weight", "model.norm.weight", m, None),
        Piece(TensorPlan("output.weight", (vocab, m), head), "lm_head", None,
              lambda ctx: _noted(ctx, "lm_head", head, lm_head_weight(ctx))),
    ]
    return out


def _norm(name: str, source: str, size: int, layer: int | None) -> Piece:
    return Piece(TensorPlan(name, (size,), Q.F32), "norms", layer,
                 lambda ctx: _noted(ctx, "norms", Q.F32, _tensor(ctx, source)))


def _tensor(ctx: ExportContext, name: str) -> np.ndarray:
    return ctx.reader.get(name).float().numpy()


def _noted(ctx: ExportContext, component: str, qtype: gguf.GGMLQuantizationType, w: np.ndarray) -> np.ndarray:
    """A float tensor (embedding, head, norm) encoded as ``qtype``, noted under ``component``."""
    ctx.note(component, f"{qtype.name} ({'float' if qtype in FLOAT_TYPES else 're-quantized from float'})")
    return _quantize(w, qtype)


def _linear(name: str, component: str, layer: int, prefixes: list[str], shape: tuple[int, int],
            qtype: gguf.GGMLQuantizationType, rope_heads: int | None = None) -> Piece:
    """One linear, or experts stacked along a first axis when ``prefixes`` lists several."""
    full = (len(prefixes), *shape) if len(prefixes) > 1 else shape

    def make(ctx: ExportContext) -> np.ndarray:
        parts = [_encode_linear(ctx, ctx.linear(p, *shape), qtype, rope_heads, component) for p in prefixes]
        return np.stack(parts) if len(parts) > 1 else parts[0]

    return Piece(TensorPlan(name, full, qtype), component, layer, make)


def _encode_linear(ctx: ExportContext, lin: LinearWeights, qtype: gguf.GGMLQuantizationType,
                   rope_heads: int | None, component: str) -> np.ndarray:
    """A linear as ``qtype``: its own codes when its grid is that block type, else its float weight encoded."""
    own = method_form(lin, "gguf_rows")
    stored = own(lin.tensors) if own is not None else None
    if stored is not None and stored[0] == qtype.name:  # a method that stores a GGML block type itself
        ctx.note(component, f"{qtype.name} (exact)")
        return rope_rows(stored[1], rope_heads) if rope_heads is not None else stored[1]
    bits = {Q.Q4_0: 4, Q.Q8_0: 8}.get(qtype)
    form = gguf_grid(block_quant(lin), bits) if bits is not None else None
    if form is not None:
        if rope_heads is not None:
            form.codes, form.scales = rope_rows(form.codes, rope_heads), rope_rows(form.scales, rope_heads)
        ctx.note(component, f"{qtype.name} (exact)")
        return pack_exact(form)
    w = lin.dequantized()
    if rope_heads is not None:
        w = rope_rows(w, rope_heads)
    how = "float" if qtype in FLOAT_TYPES else ("re-quantized from float" if lin.quant is None else "re-quantized")
    ctx.note(component, f"{qtype.name} ({how})")
    return _quantize(w, qtype)


def _quantize(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == Q.Q6_K:
        return quantize_q6_k(w)
    if qtype == Q.Q4_K:
        return quantize_q4_k(w)
    return w if qtype == Q.F32 else gguf.quants.quantize(w, qtype)


# Writing ----------------------------------------------------------------------------------------------
@dataclass
class GGUFResult:
    path: Path
    record: dict[str, Any]
    warnings: list[str]


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + MANIFEST_SUFFIX)


def export_gguf(variant: Path, out: Path, opts: GGUFOptions | None = None, overwrite: bool = False,
                progress: bool = True, *, no_verify: bool = False) -> GGUFResult:
    """Write ``variant`` (a float model or an artifact folder) as the GGUF file ``out``, with
    ``out.manifest.json`` beside it. Refuses an existing ``out`` unless ``overwrite`` (and then only
    a GGUF this tool wrote), a source it cannot verify, and shapes the block types cannot hold."""
    variant, out, opts = Path(variant), Path(out), opts or GGUFOptions()
    check_gguf_out(out, overwrite, variant)
    with run_errors(out), output_lock(out), open_variant(variant) as (cfg, quant, reader):
        identity = source_identity(variant, quant is not None, no_verify)
        check_gguf_out(out, overwrite, variant)  # again, now that the lock is held
        plan = pieces(cfg, opts, quant is None)
        _check_rows(plan)
        vocab = read_vocab(variant, cfg.vocab_size)
        warnings = _window_warnings(cfg)
        ctx = ExportContext(cfg, quant, reader, ExportDtype.FP32)
        writer = gguf.GGUFWriter(None, "llama")
        _metadata(writer, cfg, opts, variant.name)
        add_vocab(writer, vocab)
        for piece in plan:
            p = piece.plan
            raw = None if p.qtype in (Q.F32, Q.F16) else p.qtype
            writer.add_tensor_info(p.name, p.byte_shape, p.dtype, p.nbytes, raw_dtype=raw)
        work = out.with_name(out.name + ".partial")
        try:
            writer.write_header_to_file(work)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for piece in tqdm(plan, desc="gguf tensors", disable=not progress):
                writer.write_tensor_data(_made(piece, ctx))
            writer.close()
            with work.open("rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            writer.close()
            work.unlink(missing_ok=True)
            raise
        record = _record(ctx, opts, variant, identity, warnings, len(plan))
        record["files"] = {out.name: sha256_file(work)}
        write_json(manifest_path(out), record)
        os.replace(work, out)
        return GGUFResult(out, record, warnings)


def _made(piece: Piece, ctx: ExportContext) -> np.ndarray:
    ctx.layer = piece.layer
    data = piece.make(ctx)
    p = piece.plan
    if data.dtype != p.dtype or tuple(data.shape) != p.byte_shape:
        raise CheckpointError(f"{p.name} came out as {data.dtype} {tuple(data.shape)}, "
                              f"expected {p.dtype} {p.byte_shape}")
    return data


def check_gguf_out(out: Path, overwrite: bool, source: Path) -> None:
    """``out`` names a new .gguf file outside the source, or (with ``overwrite``) one this tool wrote."""
    if out.suffix != ".gguf" or out.name in ("", ".gguf"):
        raise MixtralQuantError(f"--out {str(out)!r} is not a .gguf file name: give one such as "
                                "exports/model-q4_0.gguf")
    src = source.resolve()
    if src == out.resolve() or src in out.resolve().parents:
        raise MixtralQuantError(f"--out {out} is inside the source {source}: write the GGUF elsewhere")
    if out.is_dir():
        raise MixtralQuantError(f"{out} is a folder: give a .gguf file name")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MixtralQuantError(f"{out} already exists: choose another --out or pass --overwrite")
        if read_gguf_manifest(out, missing_ok=True) is None:
            raise MixtralQuantError(f"{out} was not written by mixtral-quant (no {manifest_path(out).name}): "
                                    "--overwrite replaces only those; choose another --out")


def _check_rows(plan: list[Piece]) -> None:
    for piece in plan:
        p = piece.plan
        block = gguf.GGML_QUANT_SIZES[p.qtype][0]
        if p.shape[-1] % block:
            raise MixtralQuantError(f"{p.qtype.name} needs rows of a multiple of {block} values but {p.name} has "
                                    f"{p.shape[-1]}: choose another --type")


def _window_warnings(cfg: MixtralConfig) -> list[str]:
    w = cfg.sliding_window
    if w is None or w >= cfg.max_position_embeddings:
        return []
    return [f"the model attends over a sliding window of {w} tokens and llama.cpp's llama architecture has none: "
            f"the GGUF computes the same function only for contexts of at most {w} tokens"]


def _metadata(writer: gguf.GGUFWriter, cfg: MixtralConfig, opts: GGUFOptions, name: str) -> None:
    m, nh = cfg.hidden_size, cfg.num_attention_heads
    writer.add_name(name)
    writer.add_quantized_by(f"mixtral-quant {__version__}")
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(m)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(nh)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != m // nh:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.moe is not None:
        writer.add_expert_count(cfg.moe.num_local_experts)
        writer.add_expert_used_count(cfg.moe.num_experts_per_tok)
    writer.add_file_type(opts.linear.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _record(ctx: ExportContext, opts: GGUFOptions, variant: Path, identity: dict[str, str],
            warnings: list[str], tensors: int) -> dict[str, Any]:
    cfg, q = ctx.cfg, ctx.quant
    return {
        "format": FORMAT,
        "version": 1,
        "tool_version": __version__,
        "source_model": variant.name,
        "source_files": identity,
        "quantization": None if q is None else q.method_name,
        "bits": None if q is None else q.bits,
        "types": {"linear": opts.linear.value, "attention_kv": opts.kv_type(cfg, q is None).value,
                  "embedding": opts.embedding_type.value, "output": opts.output_type(cfg.hidden_size).value},
        "tensors": tensors,
        "mappings": {k: sorted(v) for k, v in sorted(ctx.notes.items())},
        "layers": [{k: sorted(v) for k, v in sorted(ctx.layer_notes.get(i, {}).items())}
                   for i in range(cfg.num_hidden_layers)],
        "warnings": warnings,
    }


# Reading back -------------------------------------------------------------------------------------------
def read_gguf_manifest(path: Path, missing_ok: bool = False) -> dict[str, Any] | None:
    mpath = manifest_path(path)
    if not mpath.is_file():
        if missing_ok:
            return None
        raise IntegrityError(f"{path} has no {mpath.name}: it was not written by mixtral-quant, or is incomplete")
    try:
        record = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise IntegrityError(f"{mpath} is not valid JSON: export the GGUF again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("files"), dict):
        raise IntegrityError(f"{mpath} is not a mixtral-quant GGUF manifest")
    return record


def verify_gguf(path: Path) -> dict[str, Any]:
    """Check a GGUF file against the sha256 in its manifest; raise IntegrityError if it changed."""
    path = Path(path)
    record = read_gguf_manifest(path)
    assert record is not None
    digest = record["files"].get(path.name)
    if not path.is_file():
        raise IntegrityError(f"{path} is missing")
    if digest is None or sha256_file(path) != digest:
        raise IntegrityError(f"{path} was modified after it was written (its sha256 is not the one in "
                             f"{manifest_path(path).name})")
    return record


def gguf_summary(result: GGUFResult) -> str:
    """What ``export gguf`` prints: the type each component became, layer by layer."""
    lines = [f"GGUF tensor types ({result.record['types']['linear']}):",
             *(f"  {line}" for line in op_lines(result.record))]
    return "\n".join([*lines, *(f"warning: {w}" for w in result.warnings)])

