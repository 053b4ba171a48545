"""Quality peer: GPTQModel's own AWQ of the tiny Mixtral, dequantized into a float folder our loader reads.

    python -m benchmarks.peer_awq --out /tmp/awq-saved --samples 8                    # the child step alone
    python -m benchmarks.peer_awq --out /tmp/awq-saved --samples 8 --hub /tmp/awq     # ... and the float folder

GPTQModel 7.7 (``QuantizeConfig(method="awq", format="gemm")``, its ``AWQProcessor``) quantizes a copy of
the model (plus a tokenizer.json) with the awq-w4g128 recipe's settings (4 bits, groups of 128, symmetric)
on the very token sequences our pipeline calibrates on (``calibration_tokens``), on the CPU. What it does
there, read from gptqmodel/looper/awq_processor.py and recorded per run in ``awq_run.json``:

- scales: input_layernorm -> q/k/v; post_attention_layernorm -> every expert's w1/w3 (the search replays
  the whole MoE block); each expert's w3 -> w2 (on the tokens routed to it). v -> o is skipped (GQA: v
  has 64 outputs, o 256 inputs). The router (block_sparse_moe.gate) is *not* in the norm's group: its
  weight is saved unchanged while the norm it reads is divided by the scales, so the saved model routes
  on rescaled inputs (that is the peer's result, kept as is; on the tiny model it costs more than AWQ
  gains). Duo scaling (s = mean|x|^a / mean|w|^(1-a), a = 0, 0.05 .. 0.95), then a clip search (each
  group's max times 1, 0.95 .. 0.55, on every n-th token, about 512 of them) on every linear but q/k.
- it runs in 16 bits: its AWQ packer (AwqTorchLinear) refuses fp32, so the model is loaded in the
  source checkpoint's dtype (bf16 here); norms, scales and the searched weights are bf16.
- all calibration sequences go in as one batch: GPTQModel keeps at most one largest batch of token rows
  of an MoE module's inputs for the search (``_token_row_budget``), so with batch_size=1 the experts and
  the MoE block would see 512 of the tokens; one batch lets them see every token.
- lm_head and the router are left in float; an expert reached by under 0.5 % of the tokens would take
  GPTQModel's round-to-nearest fallback (listed in ``awq_run.json``).

The float folder: every tensor is taken from GPTQModel's save (the norms carry the folded scales), the
packed GEMM tensors (qweight / qzeros / scales) dequantized as (q - z) * s in fp32, which holds them
exactly, the others widened to fp32; Hub names (``hub_name``), the source config.json with torch_dtype
float32 and no quantization_config, and the source tokenizer / generation files. The child checks the
dequantization against GPTQModel's own in-memory quantized modules (each applied to the identity gives
its weight in its compute dtype; they must equal ours rounded to that dtype, bit for bit).

GPTQModel.load patches transformers' Mixtral MoE class for the rest of its process, so the
quantization runs in a child interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from benchmarks.peer_gptqmodel import _cpu_workers, hub_name, run_child
from mixtral_quant.calibrate import calibration_tokens
from mixtral_quant.checkpoint import DEFAULT_MODEL, write_float_folder
from mixtral_quant.hf_tokenizer import write_tokenizer_files
from mixtral_quant.recipe import Recipe, load_recipe
from mixtral_quant.tokenizer import Tokenizer

RECIPE = "awq-w4g128"
SAMPLES = 32
RUN_FILE = "awq_run.json"  # what the child did: settings, scaling groups, clipped linears, time, weight check
PEER_QC_FILE = "peer_quantize_config.json"  # GPTQModel's quantize_config.json, renamed: the folder is float
# AWQ's GEMM layout packs 8 4-bit codes per int32 along the output axis, columns in the order 0 2 4 6 1 3 5 7;
# code i of a word belongs to column REVERSE[i] of its block of 8 (llm-awq's AWQ_REVERSE_ORDER).
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
PACKED = ("qweight", "qzeros", "scales")
SOURCE_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "LICENSE-tokenizer", "TOKENIZER_NOTICE.md")  # fmt: skip


def quantize_config(recipe: Recipe) -> Any:
    """GPTQModel's AWQ config for the recipe: same bits / group / sym, GEMM packing (its AWQ default)."""
    from gptqmodel import QuantizeConfig

    q = recipe.quant
    return QuantizeConfig(method="awq", format="gemm", bits=q.bits, group_size=q.group_size, sym=q.options.sym,
                          offload_to_disk=False)  # fmt: skip


def unpack_gemm(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The codes of an AWQ GEMM-packed int32 tensor ``[rows, cols / 8]`` as int32 ``[rows, cols]``, natural order."""
    if bits != 4:
        raise ValueError(f"AWQ GEMM unpacking is written for 4 bits, got {bits}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)  # [rows, words, 8]: code i of word
    order = torch.tensor(AWQ_REVERSE_ORDER)
    return codes[..., order].reshape(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int = 4
               ) -> torch.Tensor:  # fmt: skip
    """An AWQ GEMM linear's weight ``[out, in]`` in fp32: (q - z) * s, exact (a 16-bit scale times a small int)."""
    q, z = unpack_gemm(qweight, bits), unpack_gemm(qzeros, bits)  # [in, out], [in / group, out]
    z = z.repeat_interleave(group_size, dim=0)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)
    return ((q - z).to(torch.float32) * s).t().contiguous()


def saved_tensors(saved: Path) -> dict[str, torch.Tensor]:
    """Every tensor of GPTQModel's saved folder, in its own names."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(saved.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def float_weights(tensors: dict[str, torch.Tensor], group_size: int, bits: int = 4) -> dict[str, torch.Tensor]:
    """GPTQModel's names -> fp32 weights: each packed linear dequantized into ``NAME.weight``, the rest widened."""
    out: dict[str, torch.Tensor] = {}
    linears = {n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")}
    for name in linears:
        qweight, qzeros, scales = (tensors[f"{name}.{p}"] for p in PACKED)
        out[f"{name}.weight"] = dequantize(qweight, qzeros, scales, group_size, bits)
    for name, t in tensors.items():
        if name.rsplit(".", 1)[0] in linears:
            continue
        if not t.is_floating_point():
            raise ValueError(f"unexpected non-float tensor {name} ({t.dtype}) in GPTQModel's save")
        out[name] = t.to(torch.float32)
    return out


def to_hub_folder(saved: Path, model: Path, out: Path) -> Path:
    """GPTQModel's saved AWQ folder as a float checkpoint in Hub names, with ``model``'s config and tokenizer."""
    qc = json.loads((saved / "quantize_config.json").read_text())
    weights = float_weights(saved_tensors(saved), int(qc["group_size"]), int(qc["bits"]))
    shutil.rmtree(out, ignore_errors=True)
    write_float_folder(out, {hub_name(n): t for n, t in sorted(weights.items())}, model, SOURCE_FILES,
                       drop=("dtype", "quantization_config"))  # fmt: skip
    shutil.copyfile(saved / "quantize_config.json", out / PEER_QC_FILE)
    for name in ("quant_log.csv", RUN_FILE):
        if (saved / name).is_file():
            shutil.copyfile(saved / name, out / name)
    return out


def _record_scaling(run: dict[str, Any]) -> None:
    """Wrap GPTQModel's apply_scale / apply_clip / fallback test to note which groups it scaled, which linears it
    clipped and which groups it sent to its round-to-nearest fallback."""
    import gptqmodel.looper.awq_processor as awq

    apply_scale, apply_clip = awq.apply_scale, awq.apply_clip
    should_fallback = awq.AWQProcessor._should_fallback_group

    def scale(module: Any, scales_list: Any, input_feat_dict: Any = None) -> Any:
        for prev, layers, s, loss in scales_list:
            run["scaled"].append({"prev_op": prev, "layers": list(layers), "scale_min": float(s.min()),
                                  "scale_max": float(s.max()), "loss": float(loss)})  # fmt: skip
        return apply_scale(module, scales_list, input_feat_dict=input_feat_dict)

    def clip(module: Any, clip_list: Any) -> Any:
        run["clipped"].extend(name for name, _ in clip_list)
        return apply_clip(module, clip_list)

    def fallback(self: Any, layer_names: list[str], input_feat: Any) -> bool:
        used = bool(should_fallback(self, layer_names, input_feat))
        if used:
            run["rtn_fallback"].extend(layer_names)
        return used

    awq.apply_scale, awq.apply_clip = scale, clip
    awq.AWQProcessor._should_fallback_group = fallback


def _probe(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each GPTQModel AWQ linear applied to the identity: its weight ``[out, in]`` as its kernel computes it."""
    from gptqmodel.nn_modules.qlinear import AWQuantLinear

    probes: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, m in model.named_modules():
            if isinstance(m, AWQuantLinear):
                eye = torch.eye(m.in_features, dtype=m.scales.dtype)
                probes[name] = m(eye).t().contiguous()
    return probes


def check_against(probes: dict[str, torch.Tensor], saved: Path) -> dict[str, Any]:
    """Our fp32 dequantization of the saved tensors, rounded to each probe's dtype, against the probes."""
    qc = json.loads((saved / "quantize_config.json").read_text())
    weights = float_weights(saved_tensors(saved), int(qc["group_size"]), int(qc["bits"]))
    differing = [n for n, p in probes.items() if not torch.equal(weights[f"{n}.weight"].to(p.dtype), p)]
    worst = max((float((weights[f"{n}.weight"] - p.float()).abs().max()) for n, p in probes.items()), default=0.0)
    return {"modules": len(probes), "differing": differing, "max_abs_diff_fp32_vs_kernel": worst}


def awq_quantize(model: Path, recipe: Recipe, out: Path) -> Path:
    """Quantize ``model`` with GPTQModel's AWQ (in this process) on our calibration tokens; its own save in ``out``,
    with ``awq_run.json``. Raises RuntimeError when the saved tensors do not dequantize to its own modules."""
    import gptqmodel
    from gptqmodel import GPTQModel

    src = out.parent / f"{out.name}-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(model, src)
    config = json.loads((src / "config.json").read_text())
    write_tokenizer_files(src, config.get("max_position_embeddings", 4096))
    ids = calibration_tokens(recipe, Tokenizer(model))
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    stored = config.get("torch_dtype") or config.get("dtype")
    dtype = torch.float16 if stored == "float16" else torch.bfloat16  # its AWQ packer takes fp16 / bf16 only
    q = recipe.quant
    run: dict[str, Any] = {
        "peer": f"GPTQModel {gptqmodel.__version__} AWQ (format gemm)", "torch": torch.__version__,
        "bits": q.bits, "group_size": q.group_size, "sym": q.options.sym, "dtype": str(dtype).removeprefix("torch."),
        "samples": len(calibration), "seq_len": recipe.calibration.seq_len, "batch_size": len(calibration),
        "scaled": [], "clipped": [], "rtn_fallback": [],
    }  # fmt: skip
    _record_scaling(run)
    started = time.perf_counter()
    gq = GPTQModel.load(str(src), quantize_config(recipe), device="cpu", dtype=dtype)
    gq.quantize(calibration, calibration_sort=None, batch_size=len(calibration))
    run["quantize_s"] = round(time.perf_counter() - started, 1)
    probes = _probe(gq.model)
    shutil.rmtree(out, ignore_errors=True)
    gq.save(str(out))
    shutil.rmtree(src, ignore_errors=True)
    rows = [line.split(",") for line in (out / "quant_log.csv").read_text().splitlines()[1:] if line.strip()]
    run["quantized_modules"] = len(rows)
    run["weight_check"] = check_against(probes, out)
    (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    if run["weight_check"]["differing"] or run["weight_check"]["modules"] != len(rows):
        raise RuntimeError(f"dequantized weights do not match GPTQModel's modules: {run['weight_check']}")
    return out


def build_awq_peer(out: Path, samples: int, model: Path = DEFAULT_MODEL, recipe: str = RECIPE) -> Path:
    """GPTQModel's AWQ of ``model`` (child process), as the float Hub-named folder ``out`` our loader reads;
    GPTQModel's own save is kept beside it (``OUT-gptqmodel``).

    Raises ImportError when gptqmodel is not installed, RuntimeError (with its last error line) when it fails.
    """
    saved = out.parent / f"{out.name}-gptqmodel"
    run_child("benchmarks.peer_awq", model, saved, samples, recipe, "GPTQModel AWQ quantization")
    return to_hub_folder(saved, model, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="GPTQModel AWQ quantization of a model with our recipe and calibration")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, required=True, help="GPTQModel's own save")
    ap.add_argument("--samples", type=int, default=SAMPLES)
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--hub", type=Path, help="also write the float Hub-named folder our loader reads here")
    args = ap.parse_args(argv)
    os.environ["GPTQMODEL_CPU_WORKERS"] = _cpu_workers()
    torch._dynamo.config.disable = True
    awq_quantize(args.model, load_recipe(args.recipe, samples=args.samples), args.out)
    if args.hub:
        to_hub_folder(args.out, args.model, args.hub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
