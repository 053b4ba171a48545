"""Measure what the embedded tiny Mixtral learned, and whether quantizers can be told apart on it.

    python scripts/tiny_report.py [--model DIR] [--ctx 512]

Writes REPORT.md and report.json beside the model:
- wiki-test perplexity (windows of ctx, no overlap) beside a unigram model's on the same tokens
  (unigram estimated on the training text, wiki-train + State of the Union, add-one smoothing);
- tokens per expert per layer on wiki-test (dead experts are those with none);
- round-to-nearest (groups of 128, experts and attention) at 4 and 3 bits: the rise in perplexity;
- per module kind: kurtosis and max/std of the weights, beside a freshly initialised model's.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.eval.data import load_dataset
from mixtral_quant.eval.perplexity import model_perplexity
from mixtral_quant.loading import load_model, new_model
from mixtral_quant.model import MixtralForCausalLM
from mixtral_quant.quant import MethodName, QuantConfig, get_method
from mixtral_quant.recipe import CORPORA
from mixtral_quant.tokenizer import Tokenizer

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")


def unigram_ppl(tok: Tokenizer, test: torch.Tensor) -> float:
    counts: Counter[int] = Counter()
    for name in ("wiki-train", "sotu"):
        counts.update(tok.encode((CORPORA / f"{name}.txt").read_text()))
    total = sum(counts.values()) + tok.vocab_size
    scored = test[1:].tolist()  # every token but the first BOS
    nll = -sum(math.log((counts[t] + 1) / total) for t in scored)
    return math.exp(nll / len(scored))


def rtn(model: MixtralForCausalLM, bits: int) -> MixtralForCausalLM:
    method = get_method(QuantConfig(MethodName.RTN, bits=bits, group_size=128))
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and (".experts." in name or ".self_attn." in name):
                mod.weight.copy_(method.dequantize(method.quantize(mod.weight.float()).tensors))
    return model


def weight_stats(model: MixtralForCausalLM) -> dict[str, dict[str, float]]:
    out = {}
    for kind in KINDS:
        ws = [m.weight.float().flatten() for n, m in model.named_modules() if n.endswith("." + kind)]
        w = torch.cat(ws)
        z = (w - w.mean()) / w.std()
        rows = [m.weight.float() for n, m in model.named_modules() if n.endswith("." + kind)]
        max_std = torch.cat([(r.abs().amax(1) / r.std(1)) for r in rows]).mean()
        out[kind] = {"kurtosis": float(z.pow(4).mean()), "row_max_over_std": float(max_std)}
    return out


@torch.no_grad()
def tokens_per_expert(model: MixtralForCausalLM, test: torch.Tensor, ctx: int) -> list[list[int]]:
    assert model.cfg.moe is not None
    counts = torch.zeros(model.cfg.num_hidden_layers, model.cfg.moe.num_local_experts, dtype=torch.int64)
    for w in range((len(test) - 1) // ctx):
        out = model(test[w * ctx : (w + 1) * ctx][None], output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            counts[i] += torch.bincount(logits.topk(2).indices.flatten(), minlength=counts.shape[1])
    return counts.tolist()


STARVED = 0.001  # share of a layer's top-2 slots below which an expert is listed as starved


def training_lines(model: Path) -> list[str]:
    """How the model was trained, phase by phase, from training_log.json (each phase keeps the one before)."""
    path = model / "training_log.json"
    if not path.is_file():
        return []
    phases = []
    log: dict[str, Any] | None = json.loads(path.read_text())
    while log is not None:
        phases.append(log)
        log = log.get("previous")
    lines = ["Training (`scripts/train_tiny.py`), phase by phase:", ""]
    for k, ph in enumerate(reversed(phases), 1):
        a = ph["args"]
        flags = (f"--steps {ph['steps_done']} --lr {a['lr']} --warmup {a['warmup']} --seed {a['seed']} "
                 f"--schedule {a.get('schedule', 'cosine')}" + (" --init-from PHASE1" if a.get("init_from") else ""))
        lines.append(f"- phase {k}: `{flags}`: {ph['train_tokens_seen']:,} tokens, {ph['seconds'] / 60:.0f} min "
                     f"on {ph['threads']} thread(s), torch {ph['torch']}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=0, help="score only the first N tokens of wiki-test (0: all)")
    args = ap.parse_args()
    tok = Tokenizer(args.model)
    test = load_dataset("wiki-test").tokens
    if args.tokens:
        test = test[: args.tokens + 1]
    base = load_model(args.model)
    res = model_perplexity(base, test, args.ctx)
    ppl = res.ppl
    print(f"wiki-test ppl {ppl:.2f}", flush=True)
    uni = unigram_ppl(tok, test)
    print(f"unigram ppl {uni:.2f}", flush=True)
    rtn_ppl = {b: model_perplexity(rtn(load_model(args.model), b), test, args.ctx).ppl for b in (4, 3)}
    print(f"rtn ppl {rtn_ppl}", flush=True)
    full = load_dataset("wiki-test").tokens  # router statistics over the whole held-out split, not the head
    experts = tokens_per_expert(base, full, args.ctx)
    slots = sum(experts[0])
    starved = [f"layer {i} expert {e}: {c} of {slots}" for i, row in enumerate(experts) for e, c in enumerate(row)
               if c < STARVED * slots]
    trained, fresh = weight_stats(base), weight_stats(new_model(base.cfg, seed=0))
    report = {
        "wiki_test_ppl": ppl,
        "unigram_ppl": uni,
        "ppl_over_unigram": ppl / uni,
        "rtn_g128_ppl": {str(b): p for b, p in rtn_ppl.items()},
        "rtn_g128_rise_percent": {str(b): 100 * (p / ppl - 1) for b, p in rtn_ppl.items()},
        "tokens_per_expert": experts,
        "dead_experts": sum(c == 0 for row in experts for c in row),
        "starved_experts": starved,
        "router_tokens": len(full) - 1,
        "weights_trained": trained,
        "weights_fresh_init": fresh,
        "ctx": args.ctx,
        "tokens_scored": res.tokens_scored,
    }
    (args.model / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# The embedded tiny Mixtral: what it learned",
        "",
        f"Measured by `scripts/tiny_report.py --tokens {args.tokens}` on wiki-test "
        f"({res.tokens_scored} tokens scored, windows of {args.ctx}, no overlap).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| wiki-test perplexity | {ppl:.1f} |",
        f"| unigram perplexity (train text, add-one) | {uni:.1f} |",
        f"| ratio | {ppl / uni:.3f} |",
        f"| RTN g128 4-bit perplexity rise | {report['rtn_g128_rise_percent']['4']:.3f} % |",
        f"| RTN g128 3-bit perplexity rise | {report['rtn_g128_rise_percent']['3']:.3f} % |",
        f"| dead experts (no token of all {len(full) - 1:,} wiki-test tokens) | {report['dead_experts']} |",
        f"| starved experts (under {100 * STARVED:g} % of the slots) | {'; '.join(starved) or 'none'} |",
        "",
        f"Tokens per expert per layer (top-2 slots over all of wiki-test, {slots:,} per layer):",
        "",
        *[f"- layer {i}: {row}" for i, row in enumerate(experts)],
        "",
        "| module | kurtosis trained | kurtosis fresh | row max/std trained | row max/std fresh |",
        "|---|---|---|---|---|",
        *[f"| {k} | {trained[k]['kurtosis']:.2f} | {fresh[k]['kurtosis']:.2f} | "
          f"{trained[k]['row_max_over_std']:.2f} | {fresh[k]['row_max_over_std']:.2f} |" for k in KINDS],
    ]
    lines += ["", *training_lines(args.model)]
    (args.model / "REPORT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
