"""mixtral-quant benchmarks: one table of ours-against-a-peer rows, measured in one run.

    python -m benchmarks.run --quick      # under 5 minutes on a 2-core CPU
    python -m benchmarks.run              # full: about 40 minutes; adds the 5.9 GB memory section

Sections: quality (tiny model: our recipes vs transformers + bitsandbytes and RTN), awq (tiny model:
AWQ vs round-to-nearest, AWQ + GPTQ vs GPTQ, ours vs GPTQModel's AWQ, on wiki-test and a held-out novel), mixed
(tiny model: mixed-precision GPTQ under budgets of 2.5 / 3.0 / 3.5 bits per expert parameter vs every uniform
assignment that fits the same bytes), quant speed
(GPTQ / NF4 / int8 on Mixtral-8x7B expert shapes vs GPTQModel and bare bitsandbytes), memory
(peak RSS quantizing a 2-layer Mixtral-8x7B-shaped checkpoint; full mode only), memory-gptq (the
same for the shipped GPTQ recipe; full mode only, about 15 minutes) and decode
(prefill / decode tokens/s: onnxruntime exports, ours, transformers), decode-recipes (our decode tokens/s of
every shipped recipe's artifact against the 16-bit model, in the same rounds) and gguf (our GPTQ Q4_0 and Q4_K GGUFs vs
llama-quantize Q4_0 / Q4_K_M with an importance matrix, scored by llama-perplexity and by our eval;
needs scripts/build_llama_cpp.sh) and distributed (torchrun 2 ranks x 1 thread vs 1 process x 2 threads:
quantize and eval of the tiny model). Prints the table and writes
benchmarks/results/latest.json and latest.md. Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import awq, decode, decode_recipes, distributed, gguf, memory, mixed, quality, quant_speed
from benchmarks.table import Row, earlier_rows, machine, plain, write
from mixtral_quant.checkpoint import DEFAULT_MODEL

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("quality", "awq", "mixed", "quant-speed", "memory", "memory-gptq", "decode", "decode-recipes", "gguf",
            "distributed")
SECTION_NAMES = {
    "quality": quality.SECTION,
    "awq": awq.SECTION,
    "mixed": mixed.SECTION,
    "quant-speed": quant_speed.SECTION,
    "memory": memory.SECTION,
    "memory-gptq": memory.SECTION_GPTQ,
    "decode": decode.SECTION,
    "decode-recipes": decode_recipes.SECTION,
    "gguf": gguf.SECTION,
    "distributed": distributed.SECTION,
}


def _say(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _other_load() -> list[str]:
    """Notes on other CPU-heavy jobs running beside the benchmark (timings then not representative)."""
    got = subprocess.run(["pgrep", "-af", "train_tiny.py"], capture_output=True, text=True, check=False)
    procs = [line for line in got.stdout.splitlines() if "pgrep" not in line]
    notes = [f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (1 min)"]
    if procs:
        notes.append("scripts/train_tiny.py was running during this run: timings are not representative")
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small inputs, no memory section (under 5 minutes)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one under /tmp)")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the other sections' rows of the previous latest.json (rerun only --sections)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="where latest.json / latest.md go")
    args = ap.parse_args(argv)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    notes = [f"at start: {n}" for n in _other_load()]
    with tempfile.TemporaryDirectory(prefix="mq-bench-", dir="/tmp") as tmp:
        work = args.work or Path(tmp)
        rows: list[Row] = []
        if "quality" in args.sections:
            rows += quality.run(work / "quality", args.quick, _say)
        if "awq" in args.sections:
            rows += awq.run(work / "awq", args.quick, _say)
        if "mixed" in args.sections:
            rows += mixed.run(work / "mixed", args.quick, _say)
        if "quant-speed" in args.sections:
            rows += quant_speed.run(args.quick, _say)
        if "memory" in args.sections:
            rows += memory.run(work / "memory", args.quick, _say)
        if "memory-gptq" in args.sections:  # the same checkpoint; long (GPTQ of 16 Mixtral-8x7B experts)
            rows += memory.run(work / "memory", args.quick, _say, memory.RECIPES_GPTQ, memory.SECTION_GPTQ)
        if "decode" in args.sections:
            rows += decode.run(work / "decode", work / "quality", args.quick, _say)
        if "decode-recipes" in args.sections:
            rows += decode_recipes.run(work / "decode-recipes", work / "quality", args.quick, _say)
        if "gguf" in args.sections:
            rows += gguf.run(work / "gguf", args.quick, _say)
        if "distributed" in args.sections:
            rows += distributed.run(work / "distributed", args.quick, _say)
    notes += [f"at end: {n}" for n in _other_load()]
    meta = {
        "mode": "quick" if args.quick else "full",
        "sections": args.sections,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - t0,
        "machine": machine(),
        "tiny_model_sha256": hashlib.sha256((DEFAULT_MODEL / "model.safetensors").read_bytes()).hexdigest()[:16],
        "notes": sorted(set(notes)),
    }
    if args.keep:
        kept, old = earlier_rows(args.out, {SECTION_NAMES[s] for s in SECTIONS if s not in args.sections})
        if old is not None:
            rows = kept + rows
            earlier = {n if n.startswith(("run of ", "rows of ")) else f"run of {old['started']}, {n}"
                       for n in old.get("notes", [])}  # fmt: skip
            meta["notes"] = sorted(
                set(meta["notes"])
                | {f"rows of sections not rerun are kept from the run of {old['started']} ({old['mode']} mode)"}
                | earlier
            )
    print(plain(rows))
    for path in write(rows, meta, args.out):
        _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # as the CLI: no per-call casting notes
    sys.exit(main())
