"""Section mixed, quality on the embedded tiny model: MoE-aware mixed precision (a ``[mixed]`` GPTQ recipe)
against every uniform assignment that fits the same bytes.

Ours: GPTQ (groups of 128, act-order, static groups) with a width per expert linear chosen among 2, 3, 4
and 8 bits under a budget of 2.5, 3.0 and 3.5 stored bits per expert parameter, attention at 8 bits.
Peers: the same GPTQ with one width for every expert linear (2, 3, 4 or 8) and attention at any of those
widths, each kept when its quantized linears (experts and attention) take no more bytes than ours; each
row names the best of them on its figure. Scored on the head of wiki-test and the tail of the held-out
novel moby-dick.txt: perplexity and KL to the 16-bit model (on this model quantization noise can lower
a text's perplexity below the 16-bit model's, so KL is the figure that ranks; both are reported).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.quality import evaluate_on_texts, text_place
from benchmarks.table import Row
from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import MixedPrecision, Recipe, load_recipe

SECTION = "mixed"
BUDGETS = (2.5, 3.0, 3.5)
WIDTHS = (2, 3, 4, 8)
ATTENTION_BITS = 8


def recipes(samples: int) -> dict[str, Recipe]:
    """Ours at each budget, and every uniform (experts, attention) pair that can fit the largest."""
    base = load_recipe("gptq-w4g128", samples=samples)
    made = {f"mixed-{b}": replace(base, name=f"mixed-{b}", mixed=MixedPrecision(b, WIDTHS, ATTENTION_BITS))
            for b in BUDGETS}  # fmt: skip
    for experts in WIDTHS[:2]:  # 4-bit experts alone take more than the largest budget
        for attention in WIDTHS:
            name = f"uniform-e{experts}-a{attention}"
            made[name] = replace(base, name=name, mixed=MixedPrecision(9.0, (experts,), attention))
    return made


def quantized_bytes(folder: Path) -> int:
    """Bytes of the quantized linears (experts and attention projections) on disk."""
    with CheckpointReader(folder) as reader:
        return sum(reader.nbytes(n) for n in reader.names
                   if ".self_attn." in n or (".experts." in n and not n.endswith(".weight")))  # fmt: skip


def run(work: Path, quick: bool, say: Any) -> list[Row]:
    samples = 8 if quick else 32
    eval_tokens = 4096 if quick else 16384
    t0 = time.time()
    folders: dict[str, Path] = {}
    for name, recipe in recipes(samples).items():
        say(f"mixed: quantize {name} (samples={samples}, {time.time() - t0:.0f}s)")
        folders[name] = quantize_model(DEFAULT_MODEL, recipe, work / name, overwrite=True, progress=False)
    size = {name: quantized_bytes(folder) for name, folder in folders.items()}
    rows: list[Row] = []
    for text, report, measured in evaluate_on_texts(folders, work, eval_tokens, say, SECTION, t0):
        figures = {name: f | {"bytes": size[name]} for name, f in measured.items()}
        where = (f"{text_place(text, eval_tokens)}; GPTQ g128 act-order, {samples} x 512 calibration tokens of "
                 f"wiki-train for all; fp16 ppl {report.baseline.perplexity.ppl:.4g}")
        for budget in BUDGETS:
            ours = f"mixed-{budget}"
            fits = [n for n in folders if n.startswith("uniform-") and size[n] <= size[ours]]
            for metric in ("ppl", "KL"):
                best = min(fits, key=lambda n: figures[n][metric])
                note = f"{where}; uniform assignments that fit: {', '.join(sorted(fits))}"
                rows.append(Row(SECTION, f"{ours} (attention 8-bit), {metric} {text}", f"{best} (best that fits)",
                                metric, "lower", figures[ours], figures[best], 1, note=note))  # fmt: skip
    say(f"mixed: done ({time.time() - t0:.0f}s)")
    return rows
