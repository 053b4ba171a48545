"""The measuring pass of a ``[mixed]`` recipe: every expert linear quantized at every candidate width.

Before the layer-sequential run, the float model runs over the calibration tokens layer by layer; in
each layer every expert's w1/w3 (on the tokens the router sends it) and w2 (on the hidden activations of
its float w1/w3) are quantized at each width of ``choices`` with the recipe's own method and settings,
through the same :class:`~mixtral_quant.calibrate.LayerQuantizer` as the real run, and each result's
stored bytes and relative output error are kept (nothing is installed: the next layer sees the float
layer's outputs). The cost of a width is that error times the expert's share of the router's slots
(mixtral_quant/mixed.py). The real run then quantizes at the allocated widths, later layers seeing
the mixed earlier ones, and its own errors are recorded beside these predictions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm

from .calibrate import HESSIAN_BUDGET, LayerQuantizer, LayerReport
from .checkpoint import CheckpointReader
from .config import MixtralConfig
from .errors import ConfigError
from .layer_inputs import expert_input
from .loading import load_layer
from .mixed import Choice, allocate
from .model import Expert
from .quant import HessianAccumulator
from .quant.base import method_class
from .recipe import Recipe


def probe_costs(reader: CheckpointReader, cfg: MixtralConfig, recipe: Recipe, h: torch.Tensor,
                device: torch.device, chunk: int = 8, progress: bool = True) -> dict[str, list[Choice]]:  # fmt: skip
    """Each expert linear's choices (width, stored bytes, cost), from the float model's activations ``h``
    (the embedded calibration tokens, ``[B, S, M]``; not modified)."""
    assert recipe.mixed is not None and cfg.moe is not None
    choices: dict[str, list[Choice]] = {}
    bar = tqdm(range(cfg.num_hidden_layers), desc=f"measure {recipe.name} widths", unit="layer", disable=not progress)
    for i in bar:
        layer = load_layer(reader, cfg, i, torch.float32, device, keep_linears_stored=True)
        lq = LayerQuantizer(layer, cfg, recipe, device, chunk)
        mlp_in = torch.cat(lq.inputs.each_chunk(h, lq.inputs.mlp_input))
        lq.count_tokens(mlp_in)
        counts = lq.report.tokens_per_expert
        slots = max(1, sum(counts))
        experts = list(range(cfg.moe.num_local_experts))
        for stage, inputs, linears in (("w1", expert_input, ("w1", "w3")), ("w2", Expert.hidden, ("w2",))):
            in_features = cfg.hidden_size if stage == "w1" else cfg.intermediate_size
            per_pass = max(1, HESSIAN_BUDGET // (4 * in_features * in_features))
            for start in range(0, len(experts), per_pass):
                group = experts[start : start + per_pass]
                accs = lq.inputs.capture_routed(mlp_in, group, inputs)
                for e in group:
                    _measure(lq, [f"block_sparse_moe.experts.{e}.{w}" for w in linears], accs.pop(str(e), None),
                             counts[e] / slots, recipe.mixed.choices, f"model.layers.{i}.", choices)  # fmt: skip
        del mlp_in
        h = _outputs(lq, h)
    return choices


def _outputs(lq: LayerQuantizer, h: torch.Tensor) -> torch.Tensor:
    """The (float) layer's outputs: the next layer's inputs."""
    return torch.cat(lq.inputs.each_chunk(h, lambda x: lq.layer(x, lq.inputs.ctx(x.shape[0], x.shape[1]))[0]))


def _measure(lq: LayerQuantizer, names: list[str], acc: HessianAccumulator | None, share: float,
             widths: tuple[int, ...], prefix: str, out: dict[str, list[Choice]]) -> None:  # fmt: skip
    """``names`` (sharing one input) at every width: bytes stored and share-weighted relative error."""
    for bits in widths:
        lq.widths = dict.fromkeys(names, bits)
        done = lq.compute(names, acc)
        for name in names:
            nbytes = sum(t.numel() * t.element_size() for t in done.tensors[name].values())
            out.setdefault(prefix + name, []).append(Choice(bits, nbytes, share * done.errors[name]))
    lq.widths = {}


def expert_parameters(cfg: MixtralConfig) -> int:
    assert cfg.moe is not None
    return 3 * cfg.hidden_size * cfg.intermediate_size * cfg.moe.num_local_experts * cfg.num_hidden_layers


def check_budget(recipe: Recipe, cfg: MixtralConfig) -> None:
    """Before anything is written: a model with experts, and a budget the narrowest width fits (ConfigError
    naming the least budget that does)."""
    mixed = recipe.mixed
    assert mixed is not None
    if cfg.moe is None:
        raise ConfigError(f"recipe {recipe.name} allocates widths per expert: {cfg.model_type} has no experts")
    narrow = recipe.quant.with_fields(bits=min(mixed.choices))
    sizes = getattr(method_class(narrow.method_name), "stored_bytes", None)
    if sizes is None:
        return
    m, i = cfg.hidden_size, cfg.intermediate_size
    least = (2 * sizes(narrow, m, i) + sizes(narrow, i, m)) * cfg.moe.num_local_experts * cfg.num_hidden_layers
    if least > int(mixed.budget_bits * expert_parameters(cfg) / 8):
        bits = 8 * least / expert_parameters(cfg)
        raise ConfigError(f"recipe {recipe.name}: budget_bits {mixed.budget_bits} is below what "
                          f"{min(mixed.choices)}-bit experts store ({bits:.3f} bits per parameter with scales, "
                          "zeros and g_idx): raise the budget or add a narrower choice")


def plan_widths(reader: CheckpointReader, cfg: MixtralConfig, recipe: Recipe, h: torch.Tensor,
                device: torch.device, chunk: int = 8, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """The widths of a ``[mixed]`` recipe: measured (:func:`probe_costs`), then allocated under the byte
    budget (:func:`~mixtral_quant.mixed.allocate`). JSON: ``widths`` (full name -> bits, attention too
    when ``attention_bits`` differs from ``bits``), every choice's ``costs`` and ``bytes``, the budget."""
    mixed = recipe.mixed
    assert mixed is not None  # and check_budget passed before anything was written
    choices = probe_costs(reader, cfg, recipe, h, device, chunk, progress)
    params = expert_parameters(cfg)
    budget = int(mixed.budget_bits * params / 8)
    picked = allocate(choices, budget)
    widths = {name: c.bits for name, c in picked.items()}
    if recipe.attention_bits != recipe.quant.bits and recipe.quantizes("attention"):
        widths |= {f"model.layers.{i}.self_attn.{p}": recipe.attention_bits for i in range(cfg.num_hidden_layers)
                   for p in ("q_proj", "k_proj", "v_proj", "o_proj")}  # fmt: skip
    return {
        "budget_bytes": budget,
        "expert_parameters": params,
        "widths": dict(sorted(widths.items())),
        "costs": {n: {str(c.bits): c.cost for c in cs} for n, cs in sorted(choices.items())},
        "bytes": {n: {str(c.bits): c.nbytes for c in cs} for n, cs in sorted(choices.items())},
    }


def mixed_record(plan: dict[str, Any], reports: list[LayerReport], recipe: Recipe) -> dict[str, Any]:
    """calibration.json's ``mixed``: the budget, what was stored, and per expert linear its width with the
    cost the measuring pass predicted and the one the run measured (its error times its expert's share)."""
    assert recipe.mixed is not None
    modules = {}
    for report in reports:
        counts = report.tokens_per_expert
        for rel, error in report.errors.items():
            name = f"model.layers.{report.layer}.{rel}"
            if name not in plan["costs"]:
                continue
            expert = int(rel.split(".")[2])
            bits = plan["widths"][name]
            modules[name] = {"bits": bits, "bytes": plan["bytes"][name][str(bits)],
                             "predicted_cost": plan["costs"][name][str(bits)],
                             "measured_cost": float(f"{error * counts[expert] / max(1, sum(counts)):.6g}")}  # fmt: skip
    stored = sum(m["bytes"] for m in modules.values())
    return {
        "budget_bits": recipe.mixed.budget_bits,
        "choices": list(recipe.mixed.choices),
        "attention_bits": recipe.attention_bits,
        "budget_bytes": plan["budget_bytes"],
        "stored_bytes": stored,
        "bits_per_expert_parameter": round(8 * stored / plan["expert_parameters"], 4),
        # exactly rounded sums: a resumed run reads its first layers' reports back in another order
        "predicted_cost": math.fsum(m["predicted_cost"] for m in modules.values()),
        "measured_cost": math.fsum(m["measured_cost"] for m in modules.values()),
        "modules": dict(sorted(modules.items())),
        "costs": plan["costs"],
        "bytes": plan["bytes"],
    }
