"""``mixtral-quant demo``: the project's main job on the embedded tiny Mixtral, in one command.

Quantize the tiny model with every shipped recipe, export the fp32, GPTQ-4bit and int8 variants
to ONNX, evaluate every variant against the 16-bit model on the head of wiki-test, print the
table and write the reports (JSON, Markdown, HTML) to the output folder.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import DEFAULT_MODEL, resolve_model
from .errors import MixtralQuantError
from .eval.report import EvalReport
from .eval.runner import evaluate
from .export import ExportDtype, Target, export_onnx
from .pipeline import quantize_model
from .recipe import CORPORA, load_recipe, shipped_recipes
from .tokenizer import Tokenizer

ONNX_VARIANTS = ("gptq-w4g128", "int8")
CPU = torch.device("cpu")


def head_of(text_file: Path, tokenizer: Tokenizer, tokens: int, out: Path) -> Path:
    """The first ``tokens`` tokens of a text file (cut at a line end), written to ``out``."""
    lines, n = [], 0
    for line in text_file.read_text().splitlines(keepends=True):
        lines.append(line)
        n += len(tokenizer.encode(line, bos=False))
        if n >= tokens:
            break
    out.write_text("".join(lines))
    return out


def run_demo(
    out: Path,
    model: Path | None = None,
    recipes: list[str] | None = None,
    samples: int = 32,
    eval_tokens: int = 8192,
    ctx: int = 512,
    check: Path | None = None,
    onnx: bool = True,
    device: torch.device = CPU,
    say: Callable[[str], None] = print,
) -> EvalReport:
    if eval_tokens < ctx:
        raise MixtralQuantError(f"--eval-tokens {eval_tokens} is less than one window of {ctx} tokens")
    src = resolve_model(model) if model is not None else DEFAULT_MODEL
    names = recipes or shipped_recipes()
    unknown = sorted(set(names) - set(shipped_recipes()))
    if unknown:
        raise MixtralQuantError(f"unknown recipe(s) {unknown}; shipped: {shipped_recipes()}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    variants = []
    for name in names:
        dst = out / name
        say(f"[{time.time() - t0:6.1f}s] quantize {name}")
        quantize_model(src, load_recipe(name, samples=samples), dst, device, overwrite=True, progress=True)
        variants.append(dst)
    if onnx:
        for name in ("fp16", *ONNX_VARIANTS):
            variant = src if name == "fp16" else out / name
            if name != "fp16" and name not in names:
                continue
            say(f"[{time.time() - t0:6.1f}s] export onnx {name}")
            export_onnx(variant, out / f"{name}-onnx", Target.ORT, ExportDtype.FP32, overwrite=True)
    data = head_of(CORPORA / "wiki-test.txt", Tokenizer(src), eval_tokens, out / "wiki-test-head.txt")
    say(f"[{time.time() - t0:6.1f}s] evaluate {len(variants)} variants on {eval_tokens} tokens of wiki-test")
    report = evaluate(variants, src, str(data), ctx, None, device.type, out / "report", check)
    say(f"[{time.time() - t0:6.1f}s] done")
    return report


def clean(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
