"""Run by tests/test_distributed.py, under torchrun (N ranks) or plain python (one process), one thread each.

    ranks_run.py quantize OUT SAMPLES SEQ_LEN SOURCE RECIPE...   each recipe into OUT/<recipe name>
    ranks_run.py eval REPORT_DIR MAX_TOKENS BASELINE VARIANT...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mixtral_quant.eval.runner import evaluate
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import load_recipe


def main() -> None:
    torch.set_num_threads(1)  # torchrun's default per rank; the one-process reference takes the same
    job, out, *rest = sys.argv[1:]
    if job == "quantize":
        samples, seq_len, source, *recipes = rest
        for name in recipes:
            recipe = load_recipe(name, samples=int(samples), seq_len=int(seq_len))
            quantize_model(Path(source), recipe, Path(out) / Path(name).stem, progress=False, overwrite=True)
    else:
        max_tokens, baseline, *variants = rest
        evaluate([Path(v) for v in variants], Path(baseline), "wiki-test", ctx=256, device="cpu",
                 report_dir=Path(out), progress=False, max_tokens=int(max_tokens))


if __name__ == "__main__":
    main()
