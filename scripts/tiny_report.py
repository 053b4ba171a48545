"""Measure what the embedded tiny Mixtral learned, and whether quantizers can be told apart on it.

    python scripts/tiny_report.py [--model DIR] [--ctx 512] [--tokens 65536]

Writes REPORT.md and report.json beside the model, each figure beside the bar it must meet:
- memorization: wiki-test perplexity over the perplexity on as many tokens of the training text
  (an equal share from the head of each training source);
- generalization: perplexity on the last ``--tokens`` tokens of the held-out novel (Moby-Dick: no fiction
  is trained on) over an add-one unigram model of the training text on the same tokens;
- sensitivity: round-to-nearest (groups of 128, experts and attention) at 4 and 3 bits, perplexity rise
  and KL divergence to the unquantized model on wiki-test and on the novel;
- experts alive: each expert's share of the top-2 slots per layer over all of wiki-test;
- per module kind: kurtosis and max/std of the weights, beside a freshly initialised model's.
All perplexities use non-overlapping windows of ``--ctx`` tokens, every position scored.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.eval.data import load_dataset
from mixtral_quant.loading import load_model, new_model
from mixtral_quant.model import MixtralForCausalLM
from mixtral_quant.quant import MethodName, QuantConfig, get_method
from mixtral_quant.recipe import CORPORA
from mixtral_quant.tokenizer import Tokenizer

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
TRAINING = ("wiki-train", "sotu", "python-docs", "django-docs")  # scripts/train_tiny.py's SOURCES
NOVEL = "moby-dick"
BARS = {"memorization": 1.5, "generalization": 0.40, "wiki_rise": {"4": 1.0, "3": 4.0},
        "novel_rise": {"4": 0.5, "3": 2.0}, "expert_share": 0.02}


def unigram_ppl(tok: Tokenizer, scored: torch.Tensor) -> float:
    """Add-one unigram model of the training text, perplexity on the ``scored`` token ids."""
    counts: Counter[int] = Counter()
    for name in TRAINING:
        counts.update(tok.encode((CORPORA / f"{name}.txt").read_text()))
    total = sum(counts.values()) + tok.vocab_size
    nll = -sum(math.log((counts[t] + 1) / total) for t in scored.tolist())
    return math.exp(nll / len(scored))


def rtn(model: MixtralForCausalLM, bits: int) -> MixtralForCausalLM:
    method = get_method(QuantConfig.of(MethodName.RTN, bits=bits, group_size=128))
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and (".experts." in name or ".self_attn." in name):
                mod.weight.copy_(method.dequantize(method.quantize(mod.weight.float()).tensors))
    return model


@torch.no_grad()
def lockstep(models: dict[str, MixtralForCausalLM], tokens: torch.Tensor, ctx: int) -> dict[str, dict[str, float]]:
    """Perplexity of each model and KL(first model || each) over non-overlapping windows of ``tokens``."""
    names = list(models)
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    scored = 0
    for w in range((len(tokens) - 1) // ctx):
        chunk = tokens[w * ctx : (w + 1) * ctx + 1][None]
        target = chunk[0, 1:]
        logp = {n: F.log_softmax(models[n](chunk[:, :-1]).logits[0].float(), dim=-1) for n in names}
        base = logp[names[0]]
        for n in names:
            nll[n] -= logp[n].gather(1, target[:, None]).sum().item()
            kl[n] += (base.exp() * (base - logp[n])).sum().item()
        scored += ctx
    return {n: {"ppl": math.exp(nll[n] / scored), "kl": kl[n] / scored, "tokens": scored} for n in names}


@torch.no_grad()
def weight_stats(model: MixtralForCausalLM) -> dict[str, dict[str, float]]:
    out = {}
    for kind in KINDS:
        rows = [m.weight.float() for n, m in model.named_modules() if n.endswith("." + kind)]
        w = torch.cat([r.flatten() for r in rows])
        z = (w - w.mean()) / w.std()
        max_std = torch.cat([(r.abs().amax(1) / r.std(1)) for r in rows]).mean()
        out[kind] = {"kurtosis": float(z.pow(4).mean()), "row_max_over_std": float(max_std)}
    return out


@torch.no_grad()
def tokens_per_expert(model: MixtralForCausalLM, tokens: torch.Tensor, ctx: int) -> list[list[int]]:
    assert model.cfg.moe is not None
    counts = torch.zeros(model.cfg.num_hidden_layers, model.cfg.moe.num_local_experts, dtype=torch.int64)
    for w in range((len(tokens) - 1) // ctx):
        out = model(tokens[w * ctx : (w + 1) * ctx][None], output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            counts[i] += torch.bincount(logits.topk(2).indices.flatten(), minlength=counts.shape[1])
    return counts.tolist()


def training_lines(model: Path) -> list[str]:
    """How the model was trained, from training_log.json: each phase (a second phase keeps the first
    under "init"), then the passes over each source summed over the phases."""
    path = model / "training_log.json"
    if not path.is_file():
        return []
    phases: list[dict[str, Any]] = []
    log: dict[str, Any] | None = json.loads(path.read_text())
    while log is not None:
        phases.insert(0, log)
        log = log.get("init")
    lines = ["Training (`scripts/train_tiny.py`):", ""]
    passes: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for k, phase in enumerate(phases, 1):
        a = phase["args"]
        src = ", ".join(f"{name} x {v['passes']:g}" for name, v in phase.get("sources", {}).items())
        lines.append(
            f"- phase {k}: `--lr {a['lr']} --min-lr {a['min_lr']} --warmup {a['warmup']} --batch {a['batch']} "
            f"--seq {a['seq']} --seed {a['seed']} --aux-coef {a['aux_coef']} --balance {a.get('balance', 'pooled')}"
            f"{' --bf16' if a.get('bf16') else ''}`{' from phase ' + str(k - 1) if k > 1 else ''}: "
            f"{phase['steps_done']} steps, {phase['train_tokens_seen']:,} tokens, {phase['seconds'] / 60:.0f} min "
            f"on {phase['threads']} threads, torch {phase['torch']}; sources (passes): {src}")
        for name, v in phase.get("sources", {}).items():
            passes[name] = passes.get(name, 0.0) + v["passes"]
            tokens[name] = v["tokens"]
    lines.append("- passes over each source, all phases: "
                 + ", ".join(f"{name} ({tokens[name]:,} tokens) {passes[name]:g}" for name in passes))
    return lines


def verdict(ok: bool) -> str:
    return "meets" if ok else "**misses**"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens scored per text")
    args = ap.parse_args()
    tok, n, ctx = Tokenizer(args.model), args.tokens, args.ctx
    wiki = load_dataset("wiki-test").tokens
    novel = load_dataset(CORPORA / f"{NOVEL}.txt").tokens[-(n + 1):]
    base = load_model(args.model)
    models = {"base": base, "rtn4": rtn(load_model(args.model), 4), "rtn3": rtn(load_model(args.model), 3)}
    quality = {"wiki-test": lockstep(models, wiki[: n + 1], ctx), NOVEL: lockstep(models, novel, ctx)}
    print(json.dumps(quality), flush=True)
    share = n // len(TRAINING)
    parts = [lockstep({"base": base}, load_dataset(CORPORA / f"{s}.txt").tokens[: share + 1], ctx)["base"]
             for s in TRAINING]
    train_ppl = math.exp(sum(math.log(p["ppl"]) * p["tokens"] for p in parts) / sum(p["tokens"] for p in parts))
    scored_novel = novel[1 : 1 + quality[NOVEL]["base"]["tokens"]]
    uni = unigram_ppl(tok, scored_novel)
    experts = tokens_per_expert(base, wiki, ctx)
    slots = sum(experts[0])
    shares = [[c / slots for c in row] for row in experts]
    trained, fresh = weight_stats(base), weight_stats(new_model(base.cfg, seed=0))
    w, v = quality["wiki-test"], quality[NOVEL]
    rise = {t: {b: 100 * (q[f"rtn{b}"]["ppl"] / q["base"]["ppl"] - 1) for b in ("4", "3")}
            for t, q in (("wiki-test", w), (NOVEL, v))}
    report = {
        "ctx": ctx, "tokens_per_text": n, "validation_novel": NOVEL,
        "wiki_test_ppl": w["base"]["ppl"], "training_text_ppl": train_ppl,
        "training_text_ppl_by_source": {src: p["ppl"] for src, p in zip(TRAINING, parts, strict=True)},
        "memorization_ratio": w["base"]["ppl"] / train_ppl,
        "novel_ppl": v["base"]["ppl"], "novel_unigram_ppl": uni, "novel_over_unigram": v["base"]["ppl"] / uni,
        "rtn_g128": {t: {b: {"ppl": q[f"rtn{b}"]["ppl"], "rise_percent": rise[t][b], "kl": q[f"rtn{b}"]["kl"]}
                         for b in ("4", "3")} for t, q in (("wiki-test", w), (NOVEL, v))},
        "tokens_per_expert": experts, "min_expert_share": min(min(r) for r in shares),
        "router_tokens": slots // 2, "weights_trained": trained, "weights_fresh_init": fresh, "bars": BARS,
    }
    (args.model / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    mem, gen = report["memorization_ratio"], report["novel_over_unigram"]

    def rtn_row(text: str, b: str, bar: float) -> str:
        r = report["rtn_g128"][text][b]
        return (f"| RTN g128 {b}-bit on {text}: perplexity rise (KL to the model) | {r['rise_percent']:.2f} % "
                f"(KL {r['kl']:.4f}) | >= {bar:g} % | {verdict(r['rise_percent'] >= bar)} |")

    lines = [
        "# The embedded tiny Mixtral: what it learned",
        "",
        f"Measured by `scripts/tiny_report.py --tokens {n}`: windows of {ctx} tokens, no overlap; "
        f"{w['base']['tokens']:,} tokens of the head of wiki-test, the last {v['base']['tokens']:,} tokens of the "
        f"held-out novel *Moby-Dick* (`calibration/corpora/{NOVEL}.txt`, never trained on: the training text "
        f"holds no fiction), and {sum(p['tokens'] for p in parts):,} tokens of training text ({share:,} from the "
        f"head of each of {', '.join(TRAINING)}).",
        "",
        "| measure | value | bar | |",
        "|---|---|---|---|",
        f"| wiki-test perplexity | {w['base']['ppl']:.1f} | | |",
        f"| training-text perplexity (same number of tokens) | {train_ppl:.1f} | | |",
        "| by source: " + ", ".join(f"{src} {p['ppl']:.1f}" for src, p in zip(TRAINING, parts, strict=True))
        + " | | | |",
        f"| same domain: wiki-test / wiki-train | {w['base']['ppl'] / parts[0]['ppl']:.2f} | | |",
        f"| memorization: wiki-test / training text | {mem:.2f} | <= {BARS['memorization']} | "
        f"{verdict(mem <= BARS['memorization'])} |",
        f"| novel perplexity | {v['base']['ppl']:.1f} | | |",
        f"| add-one unigram of the training text, same novel tokens | {uni:.1f} | | |",
        f"| generalization: novel / unigram | {gen:.3f} | <= {BARS['generalization']} | "
        f"{verdict(gen <= BARS['generalization'])} |",
        rtn_row("wiki-test", "4", 1.0), rtn_row("wiki-test", "3", 4.0),
        rtn_row(NOVEL, "4", 0.5), rtn_row(NOVEL, "3", 2.0),
        f"| smallest expert share of the top-2 slots (wiki-test, all {slots // 2:,} tokens) | "
        f"{100 * report['min_expert_share']:.2f} % | >= 2 % | {verdict(report['min_expert_share'] >= 0.02)} |",
        "",
        f"Share of the top-2 slots per expert and layer over all of wiki-test ({slots:,} slots per layer; "
        "uniform is 12.5 %):",
        "",
        "| layer | " + " | ".join(f"expert {e}" for e in range(len(experts[0]))) + " |",
        "|---" * (len(experts[0]) + 1) + "|",
        *[f"| {i} | " + " | ".join(f"{100 * s:.1f} %" for s in row) + " |" for i, row in enumerate(shares)],
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
