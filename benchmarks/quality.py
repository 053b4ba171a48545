"""Section 1, quality on the embedded tiny model: our recipes against their peers on the same windows.

Our variants go through ``evaluate()`` (perplexity, KL and router agreement against the 16-bit
model, bits per parameter). transformers + bitsandbytes models (as users load them today) run
over the same token windows here, their perplexity from their own logits and their KL / router
agreement against our baseline's outputs with the project's ``compare``. GPTQModel quantizes the
whole model itself with our recipe's settings and calibration sequences (benchmarks/peer_gptqmodel.py);
its folder, renamed to Hub names, is measured on the same windows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.peer_gptqmodel import build_peer, measure_peer, rtn_fallbacks
from benchmarks.table import Row, Status
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.demo import head_of
from mixtral_quant.eval.compare import Comparison, compare
from mixtral_quant.eval.data import load_dataset, tokenizer_for
from mixtral_quant.eval.perplexity import NLLAccumulator, WindowOutput, forward_windows, plan_windows
from mixtral_quant.eval.report import EvalReport, ModelResult
from mixtral_quant.eval.runner import evaluate
from mixtral_quant.loading import load_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import CORPORA, load_recipe
from mixtral_quant.tokenizer import Tokenizer

SECTION = "quality"
RECIPES = ("nf4", "gptq-w4g128", "gptq-w4g128-noact", "rtn-w4g128", "int8", "w8")
CPU = torch.device("cpu")
GPTQMODEL_INSTALL = "pip install --no-deps -r scripts/gptqmodel-requirements.txt"
BNB_INSTALL = 'pip install bitsandbytes transformers (or pip install -e ".[dev]")'


def quantize_all(out: Path, samples: int) -> dict[str, Path]:
    folders = {}
    for name in RECIPES:
        folders[name] = out / name
        quantize_model(DEFAULT_MODEL, load_recipe(name, samples=samples), folders[name], CPU,
                       overwrite=True, progress=False)  # fmt: skip
    return folders


def _figures(m: ModelResult) -> dict[str, Any]:
    c = m.comparison
    return {
        "ppl": m.perplexity.ppl,
        "ppl/fp16": m.ppl_ratio,
        "KL": c.kl_mean if c else None,
        "router agree min": c.min_router_agreement if c else None,
        "bits/param": m.memory.bits_per_parameter["total"],
    }


def evaluate_on_texts(folders: dict[str, Path], work: Path, tokens: int, say: Any, section: str, t0: float
                      ) -> Iterator[tuple[str, EvalReport, dict[str, dict[str, Any]]]]:  # fmt: skip
    """Every folder against the 16-bit model on ``tokens`` tokens of the head of wiki-test and of the tail
    of the held-out novel moby-dick.txt, one lockstep pass per text: (text, report, figures by name)."""
    from benchmarks.gguf import tail_of  # the gguf section's helper; imported here, where it is used

    tok = Tokenizer(DEFAULT_MODEL)
    texts = {"wiki-test": head_of(CORPORA / "wiki-test.txt", tok, tokens, work / "wiki-test-head.txt"),
             "moby-dick": tail_of(CORPORA / "moby-dick.txt", tok, tokens, work / "moby-dick-tail.txt")}
    for text, path in texts.items():
        say(f"{section}: evaluate on {text} ({time.time() - t0:.0f}s)")
        report = evaluate(list(folders.values()), DEFAULT_MODEL, str(path), 512, None, "cpu", work / f"report-{text}",
                          progress=False)  # fmt: skip
        yield text, report, {name: _figures(report.variant(folder.name)) for name, folder in folders.items()}


def text_place(text: str, tokens: int) -> str:
    return f"{tokens} tokens of the {'head of wiki-test' if text == 'wiki-test' else 'tail of moby-dick'}, ctx 512"


def _peer_figures(ppl: float, base_ppl: float, c: Comparison, bits: float | None) -> dict[str, Any]:
    return {"ppl": ppl, "ppl/fp16": ppl / base_ppl, "KL": c.kl_mean,
            "router agree min": c.min_router_agreement, "bits/param": bits}  # fmt: skip


def _hf_outputs(model: Any, tokens: torch.Tensor, windows: list) -> Iterator[WindowOutput]:
    with torch.no_grad():
        for w in windows:
            out = model(tokens[w.begin : w.end][None], output_router_logits=True)
            routers = [r.reshape(-1, r.shape[-1]) for r in out.router_logits]  # per layer [S, E]
            yield WindowOutput(w, out.logits[0].float(), routers)


def eval_time_row(eval_s: float, models: int, tokens: torch.Tensor, windows: list, where: str) -> Row:
    """eval's wall time (load, speed, one lockstep pass) per scored token and model, against
    transformers' float forward over the same windows per scored token."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in windows:
            model(tokens[w.begin : w.end][None])
    hf_s = time.perf_counter() - t0
    scored = sum(w.n_scored for w in windows)
    ours = {"ms/token": 1e3 * eval_s / (scored * models), "seconds": eval_s, "models": models}
    theirs = {"ms/token": 1e3 * hf_s / scored, "seconds": hf_s, "models": 1}
    name = f"eval of {models - 1} variants + baseline: ms per scored token and model (load, speed, lockstep pass)"
    peer = "transformers 5 MixtralForCausalLM forward over the same windows (fp32 float model, logits only)"
    return Row(SECTION, name, peer, "ms/token", "lower", ours, theirs, 1, Status.OK, where)


def hf_bnb(kind: str, tokens: torch.Tensor, windows: list, base_ppl: float) -> tuple[dict[str, Any], str]:
    """Perplexity / KL / router agreement of transformers' Mixtral loaded with bitsandbytes ``kind``."""
    from transformers import BitsAndBytesConfig, MixtralForCausalLM

    if kind == "nf4":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    elif kind == "nf4-every-expert":  # our nf4 recipe's settings: blocksize 64, double quantization
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    model = MixtralForCausalLM.from_pretrained(DEFAULT_MODEL, quantization_config=qc, dtype=torch.float32).eval()
    fp_params = sum(p.numel() for p in load_model(DEFAULT_MODEL).parameters())
    footprint = model.get_memory_footprint()
    if kind == "nf4-every-expert":
        footprint += nf4_experts_by_hand(model)
    bits = 8 * footprint / fp_params
    acc = NLLAccumulator(tokens)
    outs = []
    for o in _hf_outputs(model, tokens, windows):
        acc.add(o)
        outs.append(o)
    ppl = acc.result(0, 0, False).ppl
    base = load_model(DEFAULT_MODEL)
    top_k = base.cfg.moe.num_experts_per_tok if base.cfg.moe else None
    c = compare(forward_windows(base, tokens, windows, CPU, router_logits=True), iter(outs), top_k=top_k)
    quantized = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")})
    return _peer_figures(ppl, base_ppl, c, bits), f"bitsandbytes modules: {', '.join(quantized) or 'none'}"


def nf4_experts_by_hand(model: Any) -> int:
    """NF4 on every expert of a transformers 5 Mixtral, as a user would have to do it by hand: its
    experts are fused 3-D parameters that ``load_in_4bit`` leaves alone, so each expert's w1, w3 and
    w2 goes through ``bitsandbytes.functional.quantize_4bit`` (nf4, blocksize 64, double quantization)
    and back. Returns the change in bytes against the fp32 experts (their stored 4-bit size minus
    their fp32 size), for bits per parameter."""
    import bitsandbytes.functional as bnbf

    saved = 0
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            half = experts.gate_up_proj.shape[1] // 2
            for e in range(experts.gate_up_proj.shape[0]):
                for w in (experts.gate_up_proj[e, :half], experts.gate_up_proj[e, half:], experts.down_proj[e]):
                    codes, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True,
                                                      quant_type="nf4")  # fmt: skip
                    w.copy_(bnbf.dequantize_4bit(codes, state).to(w.dtype))
                    stored = codes.nbytes + sum(t.nbytes for t in state.as_dict(packed=True).values()
                                                if isinstance(t, torch.Tensor))  # fmt: skip
                    saved += stored - w.nbytes
    return saved


def gptqmodel_peer(work: Path, samples: int, tokens: torch.Tensor, windows: list, base_ppl: float, recipe: str
                   ) -> tuple[dict[str, Any], str]:  # fmt: skip
    """GPTQModel's own GPTQ of the tiny model (the recipe's settings and calibration tokens), read back by
    our loader and measured on the same windows (benchmarks/peer_gptqmodel.py)."""
    folder = build_peer(work, samples, recipe=recipe)
    ppl, c, bits = measure_peer(folder, DEFAULT_MODEL, tokens, windows)
    rtn, modules = rtn_fallbacks(folder)
    q = load_recipe(recipe).quant
    o = q.options
    return _peer_figures(ppl, base_ppl, c, bits), (
        f"GPTQModel quantize(), bits {q.bits} group {q.group_size} sym {o.sym}, desc_act {o.act_order}, static "
        f"groups {o.static_groups}, act_group_aware off, damp {o.damp_percent}, our {samples} calibration "
        f"sequences; {rtn} of {modules} modules took its RTN fallback (experts under 0.5% of tokens)"
    )


def run(work: Path, quick: bool, say: Any) -> list[Row]:
    samples = 8 if quick else 32
    eval_tokens = 8192 if quick else 65536  # wiki-test has 248,850; all of it takes too long for 30 min
    ctx = 512
    t0 = time.time()
    say(f"quality: quantize {len(RECIPES)} recipes (samples={samples})")
    folders = quantize_all(work / "variants", samples)
    src = DEFAULT_MODEL
    dataset = str(head_of(CORPORA / "wiki-test.txt", Tokenizer(src), eval_tokens, work / "wiki-test-head.txt"))
    say(f"quality: evaluate ({time.time() - t0:.0f}s)")
    t_eval = time.perf_counter()
    report: EvalReport = evaluate(list(folders.values()), src, dataset, ctx, None, "cpu", work / "report",
                                  progress=False)  # fmt: skip
    eval_s = time.perf_counter() - t_eval
    base_ppl = report.baseline.perplexity.ppl
    v = {name: _figures(report.variant(name)) for name in RECIPES}
    data = load_dataset(dataset, tokenizer_for(src))
    windows = plan_windows(len(data.tokens), ctx)
    where = (
        f"{len(data.tokens)} tokens of the head of wiki-test, ctx {ctx}, {len(windows)} windows, "
        f"calibration samples {samples}; fp16 ppl {base_ppl:.4g}"
    )
    rows: list[Row] = []

    def row(name: str, peer: str, ours: dict[str, Any], theirs: dict[str, Any], status: Status = Status.OK,
            note: str = "") -> None:  # fmt: skip
        rows.append(Row(SECTION, name, peer, "ppl", "lower", ours, theirs, 1, status, note or where))

    peers: dict[str, tuple[dict[str, Any], str] | str] = {}
    for kind in ("nf4", "nf4-every-expert", "int8"):
        say(f"quality: transformers + bitsandbytes {kind} ({time.time() - t0:.0f}s)")
        try:
            peers[kind] = hf_bnb(kind, data.tokens, windows, base_ppl)
        except ImportError as e:
            peers[kind] = f"skipped: {e}; {BNB_INSTALL}"
        except Exception as e:  # a peer that breaks here is reported in its row, not hidden
            peers[kind] = f"peer failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"

    def peer_row(name: str, ours_name: str, kind: str, label: str) -> None:
        got = peers[kind]
        if isinstance(got, str):
            status = Status.SKIPPED if got.startswith("skipped") else Status.NOT_MEASURED
            row(name, label, v[ours_name], {}, status, got)
        else:
            row(name, label, v[ours_name], got[0], note=f"{where}; peer {got[1]}")

    say(f"quality: transformers' forward over the same windows ({time.time() - t0:.0f}s)")
    rows.append(eval_time_row(eval_s, len(folders) + 1, data.tokens, windows, where))
    peer_row("nf4 (every expert + attention)", "nf4", "nf4",
             "transformers 5 + bitsandbytes NF4 (load_in_4bit; attention only, experts stay fp32)")  # fmt: skip
    peer_row("nf4 (every expert + attention)", "nf4", "nf4-every-expert",
             "transformers 5 + bitsandbytes NF4 on every expert by hand (quantize_4bit on the fused experts; "
             "attention load_in_4bit; double quant, blocksize 64)")  # fmt: skip
    row("nf4 (every expert + attention)", "fp16 (unquantized)", v["nf4"],
        {"ppl": base_ppl, "ppl/fp16": 1.0, "KL": 0.0, "router agree min": 1.0,
         "bits/param": report.baseline.memory.bits_per_parameter["total"]})  # fmt: skip
    row("gptq-w4g128 (act-order)", "rtn-w4g128", v["gptq-w4g128"], v["rtn-w4g128"])
    row("gptq-w4g128-noact", "rtn-w4g128", v["gptq-w4g128-noact"], v["rtn-w4g128"])
    for recipe, name in (("gptq-w4g128", "gptq-w4g128 (act-order)"), ("gptq-w4g128-noact", "gptq-w4g128-noact")):
        say(f"quality: GPTQModel GPTQ {recipe} ({time.time() - t0:.0f}s)")
        try:
            peers[recipe] = gptqmodel_peer(work, samples, data.tokens, windows, base_ppl, recipe)
        except ImportError as e:
            peers[recipe] = f"skipped: {e}; {GPTQMODEL_INSTALL}"
        except Exception as e:  # reported in its row, like the bitsandbytes peers
            peers[recipe] = f"peer failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        peer_row(name, recipe, recipe, "GPTQModel 7.7 GPTQ (same settings)")
    peer_row("int8 (LLM.int8)", "int8", "int8", "transformers 5 + bitsandbytes LLM.int8 (load_in_8bit)")
    peer_row("w8 (weight-only int8)", "w8", "int8", "transformers 5 + bitsandbytes LLM.int8 (load_in_8bit)")
    say(f"quality: done ({time.time() - t0:.0f}s)")
    return rows
