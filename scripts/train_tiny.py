"""Train the embedded tiny Mixtral from scratch on CPU, reproducibly, resumable after an interruption.

The shipped model is three seeded phases (about 1 h 45 min, 37 min and 12 min on 2 cores):

    python scripts/train_tiny.py --out exports/tiny/p1 --state exports/tiny/p1.pt --bf16
    python scripts/train_tiny.py --init exports/tiny/p1 --out exports/tiny/p2 --state exports/tiny/p2.pt --bf16 \
        --balance per-layer --aux-coef 1.0 --lr 5e-4 --min-lr 5e-5 --warmup 10 \
        --sources sotu=0.2,python-docs=0.2,django-docs=0.2
    python scripts/train_tiny.py --init exports/tiny/p2 --out mixtral_quant/assets/tiny-mixtral \
        --state exports/tiny/p3.pt --bf16 --balance per-layer --aux-coef 0.1 --lr 3e-4 --min-lr 3e-5 --warmup 5 \
        --seed 1 --sources sotu=0.1,python-docs=0.1,django-docs=0.1
    python scripts/train_tiny.py ... --resume      # after a kill: continues from the last saved state

Phase 1 learns the language with Mixtral's pooled load-balancing loss, which let experts of single layers
die (one got 0.0 % of a layer's slots); phase 2 revives them with a strong per-layer loss, phase 3 lets the
language loss recover with a weak one. Every source stays within 1.5 passes over all phases (checked).

The model is Mixtral-8x7B's architecture scaled down (config preset ``tiny``): the real 32000-token
tokenizer, 8 experts with top-2 routing, 4 query heads per key/value head, head_dim 32, rope_theta 1e6
and no sliding window, as Mixtral-8x7B's own config.json.

Data: the training text of calibration/corpora (three kinds of English: Wikipedia articles, the State of
the Union addresses, the Python and Django manuals; no fiction), each source cut into sequences of
``seq + 1`` tokens (documents as BOS + text + EOS, back to back). Every source is seen once, Wikipedia
1.5 times (its sequences once, then a seeded half of them again), so no source is trained on more than
1.5 passes and nothing is memorized. The pooled sequences are shuffled once with the seed; step k takes
the k-th batch. wiki-test and moby-dick.txt are held out. AdamW with warm-up and cosine decay to
``--min-lr``. The state (weights, optimiser, step, log) is saved every ``--save-every`` steps; since the
data order depends only on the seed, ``--resume`` continues exactly where the saved state left off.
The weights are stored in bfloat16, as the real checkpoints are.

Load balancing: ``--balance pooled`` is Mixtral's auxiliary loss (transformers' load_balancing_loss_func),
whose expert shares are pooled over all layers, so an expert dead in one layer is paid for by the same
expert's index being hot in another. ``--balance per-layer`` averages the loss of each layer on its own
(as Switch Transformer and GShard apply it), which keeps every expert of every layer in use.
A later phase (``--init`` a saved model folder, ``--sources`` giving the extra passes) continues training
with fresh optimiser state; its summary keeps the earlier phases' under "init", so the passes add up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mixtral_quant.config import PRESETS, MoEArgs
from mixtral_quant.loading import load_model
from mixtral_quant.model import MixtralForCausalLM, load_balancing_loss

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "calibration" / "corpora"
TOKENIZER = ROOT / "mixtral_quant" / "assets" / "tiny-mixtral" / "tokenizer.model"
TITLE = re.compile(r"^= .+ =$", re.M)
# Training sources and passes over each (at most 1.5); held-out texts are never among them.
SOURCES = {"wiki-train": 1.5, "sotu": 1.0, "python-docs": 1.0, "django-docs": 1.0}
HELD_OUT = ("wiki-test", "moby-dick")


def documents(text: str) -> list[str]:
    """Split a corpus file into documents at its '= Title =' lines."""
    starts = [m.start() for m in TITLE.finditer(text)] or [0]
    starts.append(len(text))
    return [text[a:b].strip() for a, b in itertools.pairwise(starts) if text[a:b].strip()]


def token_stream(sp: spm.SentencePieceProcessor, path: Path) -> torch.Tensor:
    """BOS + document + EOS for every document of one corpus file."""
    ids: list[int] = []
    for doc in sp.encode(documents(path.read_text())):
        ids.extend([sp.bos_id(), *doc, sp.eos_id()])
    return torch.tensor(ids, dtype=torch.int64)


def parse_sources(spec: str) -> dict[str, float]:
    """'name=passes,...' -> {name: passes}; only training sources, at most 1.5 passes each."""
    out = {}
    for item in spec.split(","):
        name, _, passes = item.partition("=")
        if name not in SOURCES or not passes or not 0 < float(passes) <= 1.5:
            names = ", ".join(SOURCES)
            raise SystemExit(f"--sources: bad item {item!r} (training sources: {names}; passes in (0, 1.5])")
        out[name] = float(passes)
    return out


def check_total_passes(init: Path, sources: dict[str, float]) -> None:
    """Refuse a phase that would take any source past 1.5 passes, counting every earlier phase."""
    total = dict(sources)
    log: dict[str, Any] | None = json.loads((init / "training_log.json").read_text())
    while log is not None:
        for name, v in log.get("sources", {}).items():
            total[name] = total.get(name, 0.0) + v["passes"]
        log = log.get("init")
    over = {k: v for k, v in total.items() if v > 1.5 + 1e-9}
    if over:
        raise SystemExit(f"--sources: with the phases of {init} these sources pass 1.5: {over}")


def training_sequences(
    sp: spm.SentencePieceProcessor, seq: int, seed: int, sources: dict[str, float]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """All training sequences [N, seq + 1] in their seeded order, and what each source gave."""
    gen = torch.Generator().manual_seed(seed)
    parts, info = [], {}
    for name, passes in sources.items():
        ids = token_stream(sp, CORPORA / f"{name}.txt")
        n = (len(ids) - 1) // seq
        seqs = ids[: n * seq + 1].unfold(0, seq + 1, seq)  # [n, seq + 1], neighbours share one token
        whole, frac = int(passes), passes - int(passes)
        parts += [seqs] * whole
        if frac:
            parts.append(seqs[torch.randperm(n, generator=gen)[: round(frac * n)]])
        info[name] = {"tokens": len(ids), "sequences": n, "passes": passes}
    pooled = torch.cat(parts)
    return pooled[torch.randperm(len(pooled), generator=gen)], info


def init_weights(model: MixtralForCausalLM, std: float) -> None:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, mean=0.0, std=std)


@torch.no_grad()
def heldout_ppl(model: MixtralForCausalLM, ids: torch.Tensor, ctx: int, max_windows: int) -> float:
    """Perplexity over non-overlapping windows (a quick training-time monitor)."""
    model.eval()
    nll, count = 0.0, 0
    for w in range(min(max_windows, (len(ids) - 1) // ctx)):
        chunk = ids[w * ctx : w * ctx + ctx + 1][None]
        logits = model(chunk[:, :-1]).logits.float()
        nll += F.cross_entropy(logits.view(-1, logits.shape[-1]), chunk[0, 1:], reduction="sum").item()
        count += ctx
    model.train()
    return math.exp(nll / count)


def balance_loss(router_logits: list[torch.Tensor], top_k: int, mode: str) -> torch.Tensor:
    """Mixtral's pooled auxiliary loss, or the mean of each layer's own (2.0 = balanced, for top-2)."""
    if mode == "pooled":
        return load_balancing_loss(router_logits, top_k)
    return torch.stack([load_balancing_loss([logits], top_k) for logits in router_logits]).mean()


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warm-up, then cosine decay from peak to floor at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def save_folder(model: MixtralForCausalLM, out: Path, summary: dict[str, object]) -> None:
    """Write the Hugging Face folder: config.json, model.safetensors (bf16), generation_config.json."""
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    cfg.save(out / "config.json")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}, indent=2)
        + "\n"
    )
    (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")


def save_state(path: Path, model: MixtralForCausalLM, opt: torch.optim.Optimizer, step: int,
               log: list[dict[str, Any]], seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                "seconds": seconds}, tmp)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "mixtral_quant" / "assets" / "tiny-mixtral")
    ap.add_argument("--state", type=Path, default=ROOT / "exports" / "tiny-train" / "state.pt",
                    help="training state saved every --save-every steps (for --resume)")
    ap.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--balance", choices=("pooled", "per-layer"), default="pooled",
                    help="auxiliary loss over all layers' tokens pooled (Mixtral's) or per layer")
    ap.add_argument("--sources", type=parse_sources, default=dict(SOURCES),
                    help="passes per training source, e.g. sotu=0.2,python-docs=0.2 (default: "
                    + ",".join(f"{k}={v}" for k, v in SOURCES.items()) + ")")
    ap.add_argument("--init", type=Path, help="start from this saved model folder instead of random weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AMX)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--stop-after", type=int, default=0, help="stop (saving the state) after N steps")
    args = ap.parse_args()

    if args.init is not None:
        check_total_passes(args.init, args.sources)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    train, sources = training_sequences(sp, args.seq, args.seed, args.sources)
    held = {name: token_stream(sp, CORPORA / f"{name}.txt") for name in HELD_OUT}
    steps = len(train) // args.batch
    print(f"{len(train):,} sequences of {args.seq} ({steps} steps of {args.batch}); sources {sources}", flush=True)

    base = PRESETS["tiny"]
    assert base.moe is not None
    cfg = replace(base, moe=replace(base.moe, router_aux_loss_coef=args.aux_coef), torch_dtype="bfloat16")
    assert isinstance(cfg.moe, MoEArgs)
    model = MixtralForCausalLM(cfg)
    if args.init is not None:
        model.load_state_dict(load_model(args.init, dtype=torch.float32).state_dict())
    else:
        init_weights(model, cfg.initializer_range)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    log: list[dict[str, Any]] = []
    start, before = 0, 0.0
    if args.resume and args.state.is_file():
        saved = torch.load(args.state, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        start, log, before = saved["step"], saved["log"], saved["seconds"]
        print(f"resumed at step {start} from {args.state}", flush=True)
    t0 = time.time() - before
    for step in range(start, steps):
        lr = lr_at(step, steps, args.lr, args.warmup, args.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = train[step * args.batch : (step + 1) * args.batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(batch[:, :-1], output_router_logits=True)
            ce = F.cross_entropy(out.logits.float().view(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
            aux = balance_loss(out.router_logits, cfg.moe.num_experts_per_tok, args.balance)
            loss = ce + args.aux_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        entry: dict[str, Any] = {"step": step, "lr": lr, "ce": ce.item(), "aux": aux.item(),
                                 "elapsed_s": time.time() - t0}
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            for name, ids in held.items():
                entry[f"{name}_ppl_512"] = heldout_ppl(model, ids, 512, 16)
        log.append(entry)
        if (step + 1) % args.save_every == 0 or step + 1 == steps or step + 1 == args.stop_after:
            save_state(args.state, model, opt, step + 1, log, time.time() - t0)
        if step % 10 == 0 or "wiki-test_ppl_512" in entry:
            rate = (step + 1 - start) * args.batch * args.seq / (time.time() - t0 - before)
            extra = "".join(f" {n} ppl {entry[f'{n}_ppl_512']:.1f}" for n in HELD_OUT if f"{n}_ppl_512" in entry)
            print(f"step {step:5d}/{steps} lr {lr:.2e} ce {entry['ce']:.3f} aux {entry['aux']:.3f} "
                  f"{rate:.0f} tok/s{extra}", flush=True)
        if step + 1 == args.stop_after:
            print(f"stopped after step {step + 1}; --resume continues", flush=True)
            return

    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                 if k not in ("out", "state", "init", "sources")},
        "sources": sources,
        "steps_done": len(log),
        "train_tokens_seen": len(log) * args.batch * args.seq,
        "seconds": time.time() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "log": log,
    }
    if args.init is not None:
        summary["init"] = json.loads((args.init / "training_log.json").read_text())
    save_folder(model, args.out, summary)
    print(f"saved to {args.out} after {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
