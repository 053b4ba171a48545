"""Section 3, peak memory of quantizing a checkpoint with Mixtral-8x7B's real layer shapes (full mode only).

A synthetic 2-layer checkpoint (hidden 4096, intermediate 14336, 8 experts, 32/8 heads, vocab 32000,
bf16 random weights, about 5.9 GB) is written tensor by tensor with ``write_checkpoint`` from a
generator, so it never sits in memory. Each recipe is quantized in a child process; the peak RSS is
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a wrapper process that ran only that child, and is
set against the checkpoint's size and one decoder layer's size: streaming layer by layer should keep
the peak near one layer (plus embeddings / lm_head), not the whole checkpoint. Section ``memory``
measures nf4 and rtn-w4g128 (a few minutes), section ``memory (GPTQ)`` the shipped gptq-w4g128 (GPTQ
of 16 experts at Mixtral-8x7B's shapes: about 15 minutes on 2 cores).

    python -m benchmarks.memory quantize SRC RECIPE OUT   # the child (used by run())
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.table import Row, Status
from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader, write_checkpoint
from mixtral_quant.config import PRESETS
from mixtral_quant.model import MixtralForCausalLM
from mixtral_quant.tokenizer import TOKENIZER_FILE

SECTION = "memory"
RECIPES = ("nf4", "rtn-w4g128")
SECTION_GPTQ = "memory (GPTQ)"
RECIPES_GPTQ = ("gptq-w4g128",)  # the shipped default: act-order, static groups, routed expert Hessians
LAYERS = 2
SHARD_BYTES = 2**30  # write_checkpoint holds one shard's tensors until the shard is written
NEEDED_BYTES = 2 * 6 * 10**9  # the checkpoint plus the largest quantized artifact, with room


def synthetic_tensors(cfg: Any, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            yield name, torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            yield name, (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_synthetic(folder: Path) -> Path:
    cfg = dataclasses.replace(PRESETS["mixtral-8x7b"], num_hidden_layers=LAYERS)
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(synthetic_tensors(cfg), tmp, max_shard_bytes=SHARD_BYTES)
    cfg.save(tmp / "config.json")
    shutil.copyfile(DEFAULT_MODEL / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    tmp.rename(folder)
    return folder


def sizes(folder: Path) -> tuple[int, int]:
    """Bytes of the whole checkpoint and of decoder layer 0."""
    with CheckpointReader(folder) as r:
        total = sum(r.nbytes(n) for n in r.names)
        layer = sum(r.nbytes(n) for n in r.names if n.startswith("model.layers.0."))
    return total, layer


def _child(src: str, recipe: str, out: str) -> None:
    from mixtral_quant.pipeline import quantize_model
    from mixtral_quant.recipe import load_recipe

    quantize_model(Path(src), load_recipe(recipe, samples=4, seq_len=128), Path(out), torch.device("cpu"),
                   overwrite=True, progress=False)  # fmt: skip


def _wrapper(src: str, recipe: str, out: str) -> None:
    """Runs the child alone and prints its peak RSS, so RUSAGE_CHILDREN covers that child only."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "quantize", src, recipe, out], check=False)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"rc": done.returncode, "peak_rss": peak_kib * 1024, "seconds": time.perf_counter() - start}))


def run(work: Path, quick: bool, say: Any, recipes: tuple[str, ...] = RECIPES, section: str = SECTION) -> list[Row]:
    peer = "checkpoint size / one layer's size"
    if quick:
        return [Row(section, f"{r} quantize peak RSS, 2-layer Mixtral-8x7B-shaped checkpoint", peer, "peak RSS GB",
                    "lower", status=Status.NOT_MEASURED, note="full mode only (writes a 5.9 GB checkpoint)")
                for r in recipes]  # fmt: skip
    free = shutil.disk_usage(work if work.exists() else work.parent).free
    src = work / "synthetic-mixtral-2layers"
    if free < NEEDED_BYTES and not (src / "config.json").is_file():
        return [Row(section, f"{r} quantize peak RSS", peer, "peak RSS GB", "lower", status=Status.NOT_MEASURED,
                    note=f"only {free / 1e9:.1f} GB free under {work}") for r in recipes]  # fmt: skip
    say("memory: write the synthetic checkpoint")
    t0 = time.perf_counter()
    write_synthetic(src)
    total, layer = sizes(src)
    say(f"memory: checkpoint {total / 1e9:.2f} GB written in {time.perf_counter() - t0:.0f}s")
    rows = []
    for recipe in recipes:
        out = work / f"synthetic-{recipe}"
        say(f"memory: quantize {recipe} in a child process")
        got = subprocess.run([sys.executable, "-m", "benchmarks.memory", "wrap", str(src), recipe, str(out)],
                             capture_output=True, text=True, check=False)  # fmt: skip
        line = got.stdout.strip().splitlines()[-1] if got.stdout.strip() else "{}"
        res = json.loads(line) if line.startswith("{") else {}
        shutil.rmtree(out, ignore_errors=True)
        if res.get("rc") != 0:
            tail = (got.stderr.strip().splitlines() or ["no output"])[-1][:200]
            rows.append(Row(section, f"{recipe} quantize peak RSS", peer, "peak RSS GB", "lower",
                            status=Status.NOT_MEASURED, note=f"child failed: {tail}"))  # fmt: skip
            continue
        gb = res["peak_rss"] / 1e9
        rows.append(Row(
            section, f"{recipe} quantize peak RSS, 2-layer Mixtral-8x7B-shaped bf16 checkpoint (samples 4 x 128)",
            "the checkpoint's size (ratio); one decoder layer's size in the figures", "peak RSS GB", "lower",
            {"peak RSS GB": gb, "seconds": res["seconds"], "peak / layer": res["peak_rss"] / layer},
            {"peak RSS GB": total / 1e9, "layer GB": layer / 1e9}, 1,
            note="ru_maxrss of the child (RUSAGE_CHILDREN)",
        ))  # fmt: skip
    return rows


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"quantize": _child, "wrap": _wrapper}[cmd](*args)
