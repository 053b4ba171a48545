"""Section distributed: torchrun with 2 ranks x 1 thread against 1 process x 2 threads on this machine.

The same command line both ways (``mixtral-quant quantize`` of the tiny model with gptq-w4g128, then
``mixtral-quant eval`` of the baseline and that artifact), timed from launch to exit (process start-up,
imports and the gloo rendezvous included), and the quantize loop alone from run_log.json. A third run,
1 process x 1 thread, is the reference the ranks' bytes must equal (a float32 sum follows the thread
count, so 1 x 2 threads gives other last bits): the row says whether they do.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.table import Figure, Row

SECTION = "distributed"
RECIPE = "gptq-w4g128"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


def _timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _shards_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for shard in sorted(folder.glob("model-*.safetensors")):
        h.update(shard.read_bytes())
    return h.hexdigest()[:16]


def _loop_seconds(folder: Path) -> float:
    return float(sum(json.loads((folder / "run_log.json").read_text())["layer_seconds"]))


def run(work: Path, quick: bool, say: Any) -> list[Row]:
    samples = 32 if quick else 128
    eval_tokens = 8192 if quick else 32768
    setups = {"2x1": (TORCHRUN, 1), "1x2": ([sys.executable], 2), "1x1": ([sys.executable], 1)}
    quantize_s: dict[str, float] = {}
    eval_s: dict[str, float] = {}
    for name, (launcher, threads) in setups.items():
        say(f"distributed: quantize {RECIPE}, {name} (ranks x threads)")
        quantize_s[name] = _timed([*launcher, "-m", "mixtral_quant", "quantize", "--recipe", RECIPE, "--samples",
                                   str(samples), "--out", str(work / f"q-{name}"), "--overwrite", "-q", "--device",
                                   "cpu"], threads)  # fmt: skip
    for name in ("2x1", "1x2"):
        launcher, threads = setups[name]
        say(f"distributed: eval, {name}")
        eval_s[name] = _timed([*launcher, "-m", "mixtral_quant", "eval", str(work / "q-1x1"), "--max-tokens",
                               str(eval_tokens), "--device", "cpu", "--report", str(work / f"report-{name}")],
                              threads)  # fmt: skip
    same = _shards_digest(work / "q-2x1") == _shards_digest(work / "q-1x1")
    figures: dict[str, dict[str, Figure]] = {name: {"seconds": round(quantize_s[name], 2),
                      "loop seconds": round(_loop_seconds(work / f"q-{name}"), 2)} for name in setups}
    reports = {n: json.loads((work / f"report-{n}" / "report.json").read_text()) for n in eval_s}
    ppl = {n: r["variants"][0]["perplexity"]["ppl"] for n, r in reports.items()}
    return [
        Row(SECTION, f"quantize {RECIPE} (tiny model, {samples} x 512 calibration tokens), torchrun 2 ranks x 1 thread",
            "1 process x 2 threads", "seconds", "lower", figures["2x1"], figures["1x2"], 1,
            note=f"launch to exit; bytes equal to 1 process x 1 thread ({figures['1x1']['seconds']} s): "
                 f"{'yes' if same else 'NO'}"),
        Row(SECTION, f"eval of the tiny model and {RECIPE} ({eval_tokens} tokens of wiki-test), torchrun 2 ranks x 1 "
            "thread", "1 process x 2 threads", "seconds", "lower", {"seconds": round(eval_s["2x1"], 2),
            "ppl": ppl["2x1"]}, {"seconds": round(eval_s["1x2"], 2), "ppl": ppl["1x2"]}, 1,
            note="launch to exit, speed measurement of each model included; windows divided among the ranks"),
    ]  # fmt: skip
