"""The closing table of a quantize run: error per layer and module kind, tokens per expert, bytes, time."""

from __future__ import annotations

import json
from pathlib import Path

from .inventory import human_bytes, inventory
from .model import COMPONENTS


def quantize_summary(artifact: Path, source: Path | None) -> str:
    cal = json.loads((artifact / "calibration.json").read_text())
    run = json.loads((artifact / "run_log.json").read_text())
    errors: dict[str, float] = cal["errors"]
    lines = [f"{'layer':>5}  {'attn err':>9}  {'expert err':>10}  {'time':>6}  tokens per expert"]
    for i, (tokens, secs) in enumerate(zip(cal["tokens_per_expert"], run["layer_seconds"], strict=True)):
        attn = [e for k, e in errors.items() if k.startswith(f"model.layers.{i}.self_attn.")]
        mlp = [e for k, e in errors.items() if k.startswith(f"model.layers.{i}.") and ".self_attn." not in k]
        lines.append(f"{i:>5}  {_mean(attn):>9.2e}  {_mean(mlp):>10.2e}  {secs:>5.1f}s  {tokens}")
    if cal["fallbacks"]:
        lines.append(f"fallbacks: {len(cal['fallbacks'])} modules ({next(iter(cal['fallbacks'].values()))}, ...)")
    if cal["damping_raised"]:
        lines.append(f"damping raised on {len(cal['damping_raised'])} modules")
    after = inventory(artifact)
    before = inventory(source)
    lines.append("")
    lines.append(f"{'component':<12}{'before':>12}{'after':>12}{'bits/param':>12}")
    for comp in COMPONENTS:
        if before.bytes_by_component.get(comp, 0) or after.bytes_by_component.get(comp, 0):
            lines.append(f"{comp:<12}{human_bytes(before.bytes_by_component[comp]):>12}"
                         f"{human_bytes(after.bytes_by_component.get(comp, 0)):>12}{after.bits_per_param(comp):>12.3f}")
    lines.append(f"{'total':<12}{human_bytes(before.total_bytes):>12}{human_bytes(after.total_bytes):>12}"
                 f"{after.bits_per_param():>12.3f}")
    lines.append(f"time {run['seconds']:.1f}s")
    return "\n".join(lines)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
