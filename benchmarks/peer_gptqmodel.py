"""Quality peer: GPTQModel's own whole-model GPTQ of the tiny Mixtral, read back by our loader.

    python -m benchmarks.peer_gptqmodel --out /tmp/peer --samples 8     # the child step alone

GPTQModel quantizes a copy of the model (plus a tokenizer.json) with our recipe's settings and the
very token sequences our pipeline calibrates on (``calibration_tokens``). Its folder is then
rewritten in Hub names (GPTQModel 7.7 on transformers 5 saves defuser's ``mlp.experts.E.gate_proj``
etc., see scripts/gptqmodel_interop.py) with the source config.json plus GPTQModel's
``quantization_config``, so ``load_model`` and our evaluation run it like one of our variants.

GPTQModel.load patches transformers' Mixtral MoE class for the rest of its process, so the
quantization runs in a child interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mixtral_quant.calibrate import calibration_tokens
from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader
from mixtral_quant.eval.compare import Comparison, compare
from mixtral_quant.eval.memory import bits_per_parameter
from mixtral_quant.eval.perplexity import NLLAccumulator, Window, WindowOutput, forward_windows
from mixtral_quant.hf_tokenizer import write_tokenizer_files
from mixtral_quant.loading import load_model
from mixtral_quant.model import by_component
from mixtral_quant.recipe import Recipe, load_recipe
from mixtral_quant.sizes import parameter_counts
from mixtral_quant.tokenizer import Tokenizer

RECIPE = "gptq-w4g128-noact"
# GPTQModel 7.7's thread pool asks for 2 "model_loader:cpu" workers and refuses GPTQMODEL_CPU_WORKERS=1
# ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1").
MIN_CPU_WORKERS = 2
# GPTQModel's (defuser) names -> Hub names, which our loader reads.
HUB_NAMES = (
    (re.compile(r"\.mlp\.(gate|experts)\b"), r".block_sparse_moe.\1"),
    (re.compile(r"\.experts\.(\d+)\.gate_proj\b"), r".experts.\1.w1"),
    (re.compile(r"\.experts\.(\d+)\.up_proj\b"), r".experts.\1.w3"),
    (re.compile(r"\.experts\.(\d+)\.down_proj\b"), r".experts.\1.w2"),
)
QC_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "true_sequential",
           "format", "checkpoint_format", "pack_dtype")  # fmt: skip


def hub_name(name: str) -> str:
    for pattern, repl in HUB_NAMES:
        name = pattern.sub(repl, name)
    return name


def quantize_config(recipe: Recipe) -> Any:
    """GPTQModel's config for the recipe: same bits / group / sym / desc_act / static groups / damping, no
    act-group-aware reordering (GPTQModel's own variant of act-order, which ours does not have)."""
    from gptqmodel import QuantizeConfig

    q, o = recipe.quant, recipe.quant.options
    return QuantizeConfig(bits=q.bits, group_size=q.group_size, sym=o.sym, desc_act=o.act_order,
                          static_groups=o.static_groups, act_group_aware=False, damp_percent=o.damp_percent,
                          offload_to_disk=False)  # fmt: skip


def gptqmodel_quantize(model: Path, recipe: Recipe, out: Path) -> Path:
    """Quantize ``model`` with GPTQModel (in this process) on our calibration tokens; its own save in ``out``."""
    from gptqmodel import GPTQModel

    src = out.parent / f"{out.name}-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(model, src)
    write_tokenizer_files(src, json.loads((src / "config.json").read_text()).get("max_position_embeddings", 4096))
    ids = calibration_tokens(recipe, Tokenizer(model))
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    gq = GPTQModel.load(str(src), quantize_config(recipe), device="cpu", dtype=torch.float32)
    gq.quantize(calibration, calibration_sort=None, batch_size=1)
    shutil.rmtree(out, ignore_errors=True)
    gq.save(str(out))
    shutil.rmtree(src, ignore_errors=True)
    return out


def to_hub_folder(saved: Path, model: Path, out: Path) -> Path:
    """GPTQModel's saved folder in Hub tensor names, with ``model``'s config.json + its quantization_config.

    GPTQModel ran in fp32 and saves the unquantized tensors (embeddings, norms, router, lm_head) so; they are
    cast back to the source checkpoint's dtype (they came from it unchanged) so bits/param compare with ours.
    """
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = json.loads((model / "config.json").read_text())
    float_dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype") or "float32")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(saved.glob("*.safetensors")):
        for name, t in load_file(str(shard)).items():
            tensors[hub_name(name)] = t.to(float_dtype) if t.dtype == torch.float32 else t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qc = json.loads((saved / "config.json").read_text())["quantization_config"]
    config["quantization_config"] = {k: qc[k] for k in QC_KEYS if k in qc}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("generation_config.json", "tokenizer.model", "quant_log.csv"):
        if (src := saved if name == "quant_log.csv" else model).joinpath(name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def rtn_fallbacks(folder: Path) -> tuple[int, int]:
    """(modules GPTQModel quantized by its RTN fallback, modules it quantized), from its quant_log.csv."""
    log = folder / "quant_log.csv"
    if not log.is_file():
        return 0, 0
    rows = [line.split(",") for line in log.read_text().splitlines()[1:] if line.strip()]
    return sum("fallback" in r[2] for r in rows if len(r) > 2), len(rows)


def _cpu_workers() -> str:
    return str(max(MIN_CPU_WORKERS, int(os.environ.get("GPTQMODEL_CPU_WORKERS") or 0)))


def measure_peer(
    folder: Path, baseline: Path, tokens: torch.Tensor, windows: list[Window]
) -> tuple[float, Comparison, float]:
    """(perplexity, comparison with ``baseline``, bits/param of the stored weights) of a folder our loader reads,
    on the given windows: the numbers ``evaluate()`` gives a variant, computed the way the other peer rows are."""
    model, base = load_model(folder, no_verify=True), load_model(baseline)  # a peer's folder: no manifest of ours
    acc = NLLAccumulator(tokens)

    def scored(outputs: Iterator[WindowOutput]) -> Iterator[WindowOutput]:
        for o in outputs:
            acc.add(o)
            yield o

    top_k = base.cfg.moe.num_experts_per_tok if base.cfg.moe else None
    c = compare(forward_windows(base, tokens, windows, "cpu", router_logits=True),
                scored(forward_windows(model, tokens, windows, "cpu", router_logits=True)), top_k=top_k)  # fmt: skip
    with CheckpointReader(folder) as r:
        stored = by_component((n, r.nbytes(n)) for n in r.names)
    bits = bits_per_parameter(stored, parameter_counts(model.cfg))["total"]
    assert bits is not None
    return acc.result(0, 0, False).ppl, c, bits


def build_peer(work: Path, samples: int, model: Path = DEFAULT_MODEL, recipe: str = RECIPE) -> Path:
    """GPTQModel's quantization of ``model`` (child process), as a Hub-named folder our loader reads.

    Raises ImportError when gptqmodel is not installed, RuntimeError (with its last error line) when it fails.
    """
    saved = work / f"gptqmodel-saved-{recipe}"
    run_child("benchmarks.peer_gptqmodel", model, saved, samples, recipe, "GPTQModel quantization")
    return to_hub_folder(saved, model, work / f"gptqmodel-{recipe}")


def run_child(module: str, model: Path, out: Path, samples: int, recipe: str, what: str) -> None:
    """``python -m module --model --out --samples --recipe`` in a child interpreter (GPTQModel patches
    transformers for the rest of its process). ImportError when gptqmodel is not installed,
    RuntimeError with the child's last error line when it fails."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is None:
        raise ImportError("No module named 'gptqmodel'")
    cmd = [sys.executable, "-m", module, "--model", str(model), "--out", str(out), "--samples", str(samples),
           "--recipe", recipe]  # fmt: skip
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": _cpu_workers()}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root, env=env)
    if done.returncode:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"{what} exited {done.returncode}: {lines[-1] if lines else '?'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="GPTQModel quantization of a model with our recipe and calibration")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--recipe", default=RECIPE)
    args = ap.parse_args(argv)
    os.environ["GPTQMODEL_CPU_WORKERS"] = _cpu_workers()
    torch._dynamo.config.disable = True
    gptqmodel_quantize(args.model, load_recipe(args.recipe, samples=args.samples), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
