"""Section 4, prefill and decode tokens/s on the tiny model: onnxruntime exports, our eager PyTorch,
transformers' eager ``generate``; batch 1 and 8, greedy, equal-length prompts (no padding).

Prefill: one forward call over ``B x P`` prompt tokens. Decode: ``N`` greedy one-token steps after it
(``B x N`` tokens). Ours and onnxruntime are timed call by call (each onnxruntime row is labelled
by the ops its export.json records: QMoE or float MoE, MatMulNBits or MatMul); transformers through ``generate()``
as users call it, decode from ``generate(N + 1 new) - generate(1 new)``. Every row's ratio is against
transformers' eager PyTorch at the same batch size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.table import Row
from mixtral_quant.cache import KVCache
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.eval.data import load_dataset, tokenizer_for
from mixtral_quant.export import ExportDtype, Target, export_onnx
from mixtral_quant.export.ort_runner import OnnxDecoder
from mixtral_quant.export.record import ops_label, read_export_info
from mixtral_quant.loading import load_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import load_recipe

SECTION = "decode"
Timings = tuple[float, float]  # prefill seconds, decode seconds (medians)


def _median(fn: Callable[[], float], repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(ids: torch.Tensor, steps: int, repeats: int) -> Timings:
    model = load_model(DEFAULT_MODEL)
    b, p = ids.shape

    @torch.no_grad()
    def run() -> tuple[float, float]:
        cache = KVCache(model.cfg, b, p + steps)
        t0 = time.perf_counter()
        nxt = model(ids, cache=cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(steps):
            nxt = model(nxt, cache=cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, time.perf_counter() - t1

    return _pairs(run, repeats)


def _pairs(run: Callable[[], tuple[float, float]], repeats: int) -> Timings:
    run()
    got = [run() for _ in range(repeats)]
    return statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)


def onnx(folder: Path, ids: torch.Tensor, steps: int, repeats: int) -> Timings:
    decoder = OnnxDecoder(folder, threads=torch.get_num_threads())
    x = ids.numpy()
    b, p = x.shape

    def run() -> tuple[float, float]:
        mask = np.ones((b, p), np.int64)
        t0 = time.perf_counter()
        logits, past = decoder.step(x, mask, decoder.empty_past(b))
        t1 = time.perf_counter()
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1)[:, None]
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            logits, past = decoder.step(nxt, mask, past)
        return t1 - t0, time.perf_counter() - t1

    return _pairs(run, repeats)


def transformers_eager(ids: torch.Tensor, steps: int, repeats: int) -> Timings:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()

    def gen(n: int) -> float:
        with torch.no_grad():
            return _timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=0))  # fmt: skip

    one = _median(lambda: gen(1), repeats)
    full = _median(lambda: gen(steps + 1), repeats)
    return one, max(full - one, 1e-9)


def exports(work: Path, quality_work: Path, say: Any) -> dict[str, Path]:
    """fp32, GPTQ-int4 and int8 ONNX folders (quantizing the two artifacts if section 1 did not)."""
    out = {}
    for name in ("fp32", "gptq-w4g128", "int8"):
        src = DEFAULT_MODEL
        if name != "fp32":
            src = quality_work / "variants" / name
            if not (src / "manifest.json").is_file():
                src = work / "variants" / name
                quantize_model(DEFAULT_MODEL, load_recipe(name, samples=16), src, torch.device("cpu"),
                               overwrite=True, progress=False)  # fmt: skip
        say(f"decode: export onnx {name}")
        out[name] = work / f"{name}-onnx"
        export_onnx(src, out[name], Target.ORT, ExportDtype.FP32, overwrite=True)
    return out


def onnx_label(name: str, folder: Path) -> str:
    """The row's label from the ops the export holds (its export.json), not from the recipe's name:
    ``onnxruntime gptq-w4g128 export: experts QMoE 4-bit block 128, attention MatMulNBits 4-bit block 128``."""
    info = read_export_info(folder)
    ops = ops_label(info) if info is not None else "ops not recorded"
    return f"onnxruntime {name} export: {ops} (ORT target)"


def _figures(t: Timings, batch: int, prompt: int, steps: int) -> dict[str, Any]:
    return {"decode tok/s": batch * steps / t[1], "prefill tok/s": batch * prompt / t[0], "prefill s": t[0],
            "decode s": t[1]}  # fmt: skip


def run(work: Path, quality_work: Path, quick: bool, say: Any) -> list[Row]:
    prompt, steps, repeats = (64, 16, 3) if quick else (128, 32, 5)
    folders = exports(work, quality_work, say)
    data = load_dataset("wiki-test", tokenizer_for(DEFAULT_MODEL))
    rows = []
    for batch in (1, 8):
        ids = data.tokens[: batch * prompt].reshape(batch, prompt)
        say(f"decode: batch {batch}")
        results: dict[str, Timings] = {"transformers": transformers_eager(ids, steps, repeats)}
        results["ours"] = ours(ids, steps, repeats)
        for name, folder in folders.items():
            results[f"onnx {name}"] = onnx(folder, ids, steps, repeats)

        peer = _figures(results["transformers"], batch, prompt, steps)
        labels = {"ours": "ours eager PyTorch fp32 (load_model, KV cache)"}
        labels |= {f"onnx {n}": onnx_label(n, folder) for n, folder in folders.items()}
        for key, label in labels.items():
            rows.append(Row(SECTION, f"{label}, batch {batch}", "transformers 5 eager generate (fp32, greedy)",
                            "decode tok/s", "higher", _figures(results[key], batch, prompt, steps), peer, repeats,
                            note=f"prompt {prompt} tokens, {steps} decode steps; median after a warm-up"))  # fmt: skip
    return rows
