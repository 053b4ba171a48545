"""What a model folder holds: parameters and bytes by component and dtype, bits per parameter, shards.

Counted from the safetensors headers and the config alone, so it is instant on a 93 GB checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointReader, load_config, quantization_config, resolve_model
from .config import MixtralConfig
from .model import COMPONENTS, by_component
from .sizes import parameter_counts


@dataclass
class Inventory:
    folder: Path
    config: MixtralConfig
    quantization: dict[str, object] | None
    params: dict[str, int]
    bytes_by_component: dict[str, int] = field(default_factory=dict)
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)  # file name -> bytes on disk
    # a mixed-width artifact: (layer, expert) -> bits of w1, w3, w2, read from the stored codes' shapes
    expert_widths: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    tokens_per_expert: list[list[int]] = field(default_factory=list)  # calibration.json's, when there is one

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_component.values())

    def bits_per_param(self, component: str | None = None) -> float:
        if component is None:
            return 8 * self.total_bytes / max(1, self.total_params)
        return 8 * self.bytes_by_component.get(component, 0) / max(1, self.params.get(component, 0))


def inventory(folder: str | Path | None) -> Inventory:
    path = resolve_model(folder)
    cfg = load_config(path)
    inv = Inventory(path, cfg, quantization_config(path), parameter_counts(cfg))
    with CheckpointReader(path) as reader:
        inv.bytes_by_component = by_component((name, reader.nbytes(name)) for name in reader.names)
        for name in reader.names:
            dt = reader.dtype(name)
            inv.bytes_by_dtype[dt] = inv.bytes_by_dtype.get(dt, 0) + reader.nbytes(name)
        inv.shards = {f.name: f.stat().st_size for f in reader.files}
        if inv.quantization and inv.quantization.get("dynamic") and cfg.moe is not None:
            inv.expert_widths = _expert_widths(reader, cfg)
            inv.tokens_per_expert = _tokens_per_expert(path)
    return inv


def _tokens_per_expert(path: Path) -> list[list[int]]:
    """The router's calibration slots per expert and layer, as quantize recorded them (none if unreadable)."""
    try:
        counts = json.loads((path / "calibration.json").read_text()).get("tokens_per_expert", [])
    except (OSError, ValueError, AttributeError):
        return []
    ok = isinstance(counts, list) and all(isinstance(r, list) and all(type(n) is int for n in r) for r in counts)
    return counts if ok else []


def _expert_widths(reader: CheckpointReader, cfg: MixtralConfig) -> dict[tuple[int, int], tuple[int, int, int]]:
    """Each expert's widths from its GPTQ ``qweight`` (``in_features * bits / 32`` rows of int32)."""
    assert cfg.moe is not None
    widths = {}
    for i in range(cfg.num_hidden_layers):
        for e in range(cfg.moe.num_local_experts):
            prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            bits = []
            for w, k in (("w1", cfg.hidden_size), ("w3", cfg.hidden_size), ("w2", cfg.intermediate_size)):
                name = f"{prefix}.{w}.qweight"
                bits.append(reader.shape(name)[0] * 32 // k if name in reader.where else 16)
            widths[(i, e)] = (bits[0], bits[1], bits[2])
    return widths


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def human_count(n: float) -> str:
    for unit, k in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(int(n))


def describe_quantization(q: dict[str, Any]) -> str:
    """One line from a config.json ``quantization_config`` entry: the method and the settings that shape
    the stored weights (read from the entry as written; nothing is imported)."""
    method = q.get("quant_method")
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            absmax = "double quant" if q.get("bnb_4bit_use_double_quant") else "fp32 absmax"
            return f"bitsandbytes {q.get('bnb_4bit_quant_type')}, {absmax}, compute {q.get('bnb_4bit_compute_dtype')}"
        return f"bitsandbytes LLM.int8, outlier threshold {q.get('llm_int8_threshold')}"
    parts = [f"{q.get('format') if method == 'mixtral-quant' else method} {q.get('bits')}-bit"]
    if "group_size" in q:
        parts.append("one group per row" if q["group_size"] == -1 else f"groups of {q['group_size']}")
    if q.get("desc_act"):
        parts.append("act-order" + (" (static groups)" if q.get("static_groups") else ""))
    if q.get("sym") is False:
        parts.append("asymmetric")
    if q.get("dynamic"):
        parts.append(f"{len(q['dynamic'])} modules at other widths (mixed precision)")
    return ", ".join(parts)


def format_inventory(inv: Inventory) -> str:
    cfg = inv.config
    lines = [f"model      {inv.folder}", f"type       {cfg.model_type}"]
    q = inv.quantization
    lines.append(f"quantized  {describe_quantization(q)}" if q else "quantized  no")
    lines.append(
        f"shape      {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, head_dim {cfg.head_dim}, vocab {cfg.vocab_size}"
    )
    if cfg.moe is not None:
        lines.append(f"moe        {cfg.moe.num_local_experts} experts, top-{cfg.moe.num_experts_per_tok}")
    lines.append(f"rope       theta {cfg.rope_theta:g}; sliding window {cfg.sliding_window}; "
                 f"context {cfg.max_position_embeddings}")
    lines.append("")
    lines.append(f"{'component':<12}{'params':>12}{'bytes':>14}{'bits/param':>12}")
    for comp in COMPONENTS:
        if inv.params.get(comp, 0) == 0 and inv.bytes_by_component.get(comp, 0) == 0:
            continue
        lines.append(f"{comp:<12}{human_count(inv.params.get(comp, 0)):>12}"
                     f"{human_bytes(inv.bytes_by_component.get(comp, 0)):>14}{inv.bits_per_param(comp):>12.3f}")
    lines.append(f"{'total':<12}{human_count(inv.total_params):>12}{human_bytes(inv.total_bytes):>14}"
                 f"{inv.bits_per_param():>12.3f}")
    if inv.expert_widths:
        lines.append("")
        lines.extend(format_expert_widths(inv.expert_widths, inv.tokens_per_expert))
    lines.append("")
    lines.append("by dtype   " + ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(inv.bytes_by_dtype.items())))
    lines.append("shards     " + ", ".join(f"{k} ({human_bytes(v)})" for k, v in inv.shards.items()))
    return "\n".join(lines)


def format_expert_widths(widths: dict[tuple[int, int], tuple[int, int, int]], tokens: list[list[int]] | None = None
                         ) -> list[str]:  # fmt: skip
    """Bits of every expert's w1/w3/w2, a row per layer and a column per expert; with ``tokens`` (per layer,
    per expert), each expert's share of the router's calibration slots beside its widths."""
    layers = sorted({i for i, _ in widths})
    experts = sorted({e for _, e in widths})
    shares = len(tokens or []) == len(layers) and all(len(r) == len(experts) for r in tokens or [])
    title = "bits per expert linear (w1/w3/w2)" + (", share of the router's calibration slots" if shares else "")
    lines = [title, "layer " + "".join(f"{'expert ' + str(e):>16}" for e in experts)]
    for i in layers:
        cells = []
        for e in experts:
            cell = "/".join(map(str, widths[(i, e)]))
            if shares and tokens:
                cell += f" {100 * tokens[i][e] / max(1, sum(tokens[i])):4.1f}%"
            cells.append(f"{cell:>16}")
        lines.append(f"{i:<6}" + "".join(cells))
    return lines
