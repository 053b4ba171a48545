"""Section decode (recipes): greedy decode tokens/s of every shipped recipe's artifact in our eager PyTorch,
against the 16-bit tiny model itself, all loaded in one process and measured in the same rounds.

Each model is loaded as ``eval`` loads it (float32 compute; the artifact's own runtime modules: GPTQ /
RTN / AWQ and Q4_K dequantized per call from their codes, NF4 through bitsandbytes' ``Linear4bit``,
LLM.int8 with bitsandbytes' arithmetic), and timed by ``eval``'s own :func:`measure_speeds`: a round
prefills a 128-token prompt (untimed) and times 32 one-token steps with the KV cache, for every model in
turn; the figure is the median over the rounds, so a slow spell of the machine touches every model alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.table import Figure, Row
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.eval.data import load_dataset, tokenizer_for
from mixtral_quant.eval.speed import measure_speeds
from mixtral_quant.loading import load_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import load_recipe, shipped_recipes

SECTION = "decode (recipes)"
PEER = "the 16-bit tiny model (bf16 on disk, fp32 compute), same rounds"


def artifacts(work: Path, quality_work: Path, samples: int, say: Any) -> dict[str, Path]:
    """Every shipped recipe's artifact: the quality section's where it made one, else quantized here."""
    out = {}
    for name in shipped_recipes():
        folder = quality_work / "variants" / name
        if not (folder / "manifest.json").is_file():
            folder = work / "variants" / name
            say(f"decode (recipes): quantize {name}")
            quantize_model(DEFAULT_MODEL, load_recipe(name, samples=samples), folder, torch.device("cpu"),
                           overwrite=True, progress=False)  # fmt: skip
        out[name] = folder
    return out


def run(work: Path, quality_work: Path, quick: bool, say: Any) -> list[Row]:
    prompt, steps, rounds, samples = (64, 16, 3, 8) if quick else (128, 32, 7, 16)
    folders = artifacts(work, quality_work, samples, say)
    tokens = load_dataset("wiki-test", tokenizer_for(DEFAULT_MODEL)).tokens
    models = {"baseline": load_model(DEFAULT_MODEL)}
    models |= {name: load_model(folder, no_verify=True) for name, folder in folders.items()}
    say(f"decode (recipes): {rounds} rounds over {len(models)} models")
    speeds = measure_speeds(list(models.values()), tokens, prompt + steps, "cpu", decode_steps=steps,
                            decode_prompt=prompt, repeats=rounds)  # fmt: skip
    tok_s = {name: speed.decode_tokens_per_s for name, speed in zip(models, speeds, strict=True)}
    peer: dict[str, Figure] = {"decode tok/s": tok_s["baseline"]}
    note = (f"batch 1, prompt {prompt} tokens, {steps} greedy steps; median of {rounds} rounds, every model once "
            f"per round, {len(models)} models loaded in one process")  # fmt: skip
    return [Row(SECTION, f"ours eager PyTorch, {name} artifact", PEER, "decode tok/s", "higher",
                {"decode tok/s": tok_s[name]}, peer, rounds, note=note) for name in folders]  # fmt: skip
