"""Section awq, quality on the embedded tiny model: AWQ against round-to-nearest, AWQ + GPTQ against
GPTQ, and our AWQ against GPTQModel 7.7's AWQ (benchmarks/peer_awq.py), on the same calibration
sequences, scored on two texts: the head of wiki-test and the tail of the held-out novel moby-dick.txt.

Each pair gets a perplexity row and a KL row per text (KL to the 16-bit model: on this model 4-bit
round-to-nearest *lowers* the novel's perplexity below the baseline's, so there the KL is the figure
that ranks quantizers; the perplexity rows are kept so that nothing is hidden).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.peer_awq import build_awq_peer
from benchmarks.quality import evaluate_on_texts, text_place
from benchmarks.table import Row, Status
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import load_recipe

SECTION = "awq"
RECIPES = ("rtn-w4g128", "awq-w4g128", "gptq-w4g128", "awq-gptq-w4g128")
PEER = "GPTQModel 7.7 AWQ"
PAIRS = (("awq-w4g128", "rtn-w4g128"), ("awq-gptq-w4g128", "gptq-w4g128"), ("awq-w4g128", PEER))
PEER_SETTINGS = ("GPTQModel quantize(), method awq, format gemm, bits 4 group 128 sym, duo scaling, clip search, "
                 "v->o skipped (GQA), router not folded (as it saves it), bf16 search; dequantized to fp32")


def run(work: Path, quick: bool, say: Any) -> list[Row]:
    samples = 8 if quick else 32
    eval_tokens = 4096 if quick else 32768
    t0 = time.time()
    folders: dict[str, Path] = {}
    for name in RECIPES:
        say(f"awq: quantize {name} (samples={samples}, {time.time() - t0:.0f}s)")
        folders[name] = work / name
        quantize_model(DEFAULT_MODEL, load_recipe(name, samples=samples), folders[name], torch.device("cpu"),
                       overwrite=True, progress=False)  # fmt: skip
    peer_note = ""
    say(f"awq: {PEER} (samples={samples}, {time.time() - t0:.0f}s)")
    try:
        folders[PEER] = build_awq_peer(work / "peer-awq", samples)
    except ImportError as e:
        peer_note = f"skipped: {e}; pip install --no-deps -r scripts/gptqmodel-requirements.txt"
    except Exception as e:  # reported in its rows, not hidden
        peer_note = f"peer failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rows: list[Row] = []
    for text, report, figures in evaluate_on_texts(folders, work, eval_tokens, say, SECTION, t0):
        where = (f"{text_place(text, eval_tokens)}; calibration: {samples} x 512 tokens of wiki-train for all; "
                 f"fp16 ppl {report.baseline.perplexity.ppl:.4g}")
        for ours, peer in PAIRS:
            theirs = figures.get(peer, {})
            missing = Status.SKIPPED if peer_note.startswith("skipped") else Status.NOT_MEASURED
            status = Status.OK if theirs else missing
            note = where if theirs else peer_note
            if peer == PEER and theirs:
                note = f"{where}; peer {PEER_SETTINGS}"
            for metric in ("ppl", "KL"):
                rows.append(Row(SECTION, f"{ours}, {metric} {text}", peer if peer == PEER else f"{peer} (ours)",
                                metric, "lower", figures[ours], theirs, 1, status, note))
    say(f"awq: done ({time.time() - t0:.0f}s)")
    return rows
