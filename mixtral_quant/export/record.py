"""export.json: what an export records, how it is read back, and how it is summarised.

It holds the source, the choices (target, dtype, NF4 experts), the sizes the runner needs, and the
ONNX op each component became: ``mappings`` over the whole graph (component -> sorted list of ops)
and ``layers``, the same per decoder layer. The summary printed after an export and the benchmark's
row labels are read from it, so they name the ops that are in the graph, not the recipe's intent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixtral_quant.errors import IntegrityError
from mixtral_quant.export.common import DATA_FILE, EXPORT_INFO, MODEL_FILE, ExportContext, Target

# The components a decode speed depends on, in the order a label names them.
WEIGHT_COMPONENTS = ("experts", "mlp", "attention")


def export_info(ctx: ExportContext, variant: Path, target: Target) -> dict[str, Any]:
    """What export.json records: the source, the choices, and the op each component became."""
    cfg = ctx.cfg
    return {
        "source": str(variant),
        "model_type": cfg.model_type,
        "target": target.value,
        "dtype": ctx.dtype.value,
        "quantization": None if ctx.quant is None else ctx.quant.method_name,
        "bits": None if ctx.quant is None else ctx.quant.bits,
        "nf4_experts": ctx.nf4_experts.value,
        # GroupQueryAttention writes into onnxruntime-genai's shared max-length KV buffer; Concat cannot
        "past_present_share_buffer": target is Target.ORT,
        "mappings": {k: sorted(v) for k, v in sorted(ctx.notes.items())},
        "layers": [
            {k: sorted(v) for k, v in sorted(ctx.layer_notes.get(i, {}).items())}
            for i in range(cfg.num_hidden_layers)
        ],
        "model_file": MODEL_FILE,
        "data_file": DATA_FILE,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
    }


def read_export_info(folder: Path) -> dict[str, Any] | None:
    """``folder``'s export.json (None when it has none); one that is not a JSON object, or whose
    fields have the wrong types, is an IntegrityError naming it."""
    path = Path(folder) / EXPORT_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise IntegrityError(f"{path} is corrupted (not valid JSON): export the model again") from None
    if not isinstance(info, dict):
        raise IntegrityError(f"{path} is corrupted (a JSON {type(info).__name__}, not an object): "
                             "export the model again")
    context = info.get("max_position_embeddings")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise IntegrityError(f"{path} is corrupted (max_position_embeddings is {context!r}, not a positive "
                             "integer): export the model again")
    for key, empty in (("mappings", {}), ("layers", [])):
        if not _valid_ops(info.get(key, empty)) or type(info.get(key, empty)) is not type(empty):
            raise IntegrityError(f"{path} is corrupted ({key!r} is not what an export writes): export it again")
    return info


def _valid_ops(value: object) -> bool:
    """A mapping (component -> list of op strings), or a list of them (one per layer)."""
    maps = value if isinstance(value, list) else [value]

    def ops_ok(ops: object) -> bool:
        return isinstance(ops, list) and all(isinstance(o, str) for o in ops)

    return all(isinstance(m, dict) and all(ops_ok(ops) for ops in m.values()) for m in maps)


def _runs(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def op_lines(info: dict[str, Any]) -> list[str]:
    """One line per distinct (component, ops) mapping, naming the layers it covers:
    ``layers 0-3  experts: QMoE 4-bit block 128``; then the components outside the layers."""
    where: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for i, comps in enumerate(info.get("layers", [])):
        for component, ops in comps.items():
            where.setdefault((component, tuple(ops)), []).append(i)
    lines = [f"{'layer' if len(idx) == 1 else 'layers'} {_runs(idx)}  {component}: {'; '.join(ops)}"
             for (component, ops), idx in sorted(where.items(), key=lambda kv: (kv[1][0], kv[0]))]
    in_layers = {component for component, _ in where}
    lines += [f"{component}: {'; '.join(ops)}" for component, ops in info.get("mappings", {}).items()
              if component not in in_layers]
    return lines


def export_summary(folder: Path) -> str:
    """What ``export onnx`` prints: the op each component became, from ``folder``'s export.json."""
    info = read_export_info(folder)
    if info is None:
        return f"{folder} has no {EXPORT_INFO}"
    return "\n".join([f"ONNX ops ({info.get('target')} target, {info.get('dtype')}):",
                      *(f"  {line}" for line in op_lines(info))])


def ops_label(info: dict[str, Any]) -> str:
    """A short label of the weight ops that ran: ``experts QMoE 4-bit block 128, attention MatMulNBits
    4-bit block 128``; mixed layers list every op their component became."""
    mappings = info.get("mappings", {})
    return ", ".join(f"{c} {' / '.join(mappings[c])}" for c in WEIGHT_COMPONENTS if c in mappings)
