"""Train the embedded tiny Mixtral from scratch on CPU, reproducibly.

The shipped model is two phases; the second continues from the first's folder with a fresh
optimiser at a constant learning rate (its training log keeps the first phase's as ``previous``):

    python scripts/train_tiny.py --out /tmp/phase1 --steps 550 --warmup 40
    python scripts/train_tiny.py --out mixtral_quant/assets/tiny-mixtral --init-from /tmp/phase1 \
        --schedule constant --lr 1.5e-3 --warmup 20 --steps 2000 --seed 1

The model is Mixtral-8x7B's architecture scaled down (config preset ``tiny``): the real 32000-token
tokenizer, 8 experts with top-2 routing, 4 query heads per key/value head, rotary embeddings and a
sliding window of 256 (shorter than the 512-token evaluation context). It trains on the project's
corpora (calibration/corpora: wiki-train and the State of the Union addresses); the wiki-test articles
never enter training. Seeded data order and initialisation; AdamW with warm-up and cosine decay.
The weights are stored in bfloat16, as the real checkpoints are.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mixtral_quant.config import PRESETS, MoEArgs
from mixtral_quant.model import MixtralForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "calibration" / "corpora"
TOKENIZER = ROOT / "mixtral_quant" / "assets" / "tiny-mixtral" / "tokenizer.model"
TITLE = re.compile(r"^= .+ =$", re.M)


def documents(text: str) -> list[str]:
    """Split a corpus file into documents at its '= Title =' lines."""
    starts = [m.start() for m in TITLE.finditer(text)] or [0]
    starts.append(len(text))
    return [text[a:b].strip() for a, b in itertools.pairwise(starts) if text[a:b].strip()]


def token_stream(sp: spm.SentencePieceProcessor, paths: list[tuple[Path, int]]) -> torch.Tensor:
    """BOS + document + EOS for every document, each file repeated its weight times."""
    ids: list[int] = []
    for path, weight in paths:
        docs = documents(path.read_text())
        encoded = sp.encode(docs)
        for _ in range(weight):
            for doc in encoded:
                ids.extend([sp.bos_id(), *doc, sp.eos_id()])
    return torch.tensor(ids, dtype=torch.int64)


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


@torch.no_grad()
def rtn_rise(model: MixtralForCausalLM, ids: torch.Tensor, ctx: int, max_windows: int, base: float) -> dict[str, float]:
    """Percent perplexity rise from round-to-nearest g128 (experts and attention) at 4 and 3 bits."""
    from tiny_report import rtn  # scripts/ is on sys.path when this file runs as a script

    rise = {}
    for bits in (4, 3):
        q = rtn(copy.deepcopy(model), bits)
        rise[str(bits)] = 100 * (heldout_ppl(q, ids, ctx, max_windows) / base - 1)
    return rise


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float, schedule: str = "cosine") -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def save(model: MixtralForCausalLM, out: Path, summary: dict[str, object]) -> None:
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


def summary(args: argparse.Namespace, log: list[dict[str, Any]], stream: int, t0: float,
            previous: dict[str, Any] | None = None) -> dict[str, object]:
    return {
        "previous": previous,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "steps_done": len(log),
        "train_tokens_seen": len(log) * args.batch * args.seq,
        "train_stream_tokens": stream,
        "seconds": time.time() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "log": log,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "mixtral_quant" / "assets" / "tiny-mixtral")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--wiki-weight", type=int, default=3, help="times the Wikipedia training text is repeated per pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AMX)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop (and save) after N steps of the --steps schedule; the same bytes as that run's snapshot")
    ap.add_argument("--save-every", type=int, default=0, help="also save the folder every N steps (0: only at the end)")
    ap.add_argument("--init-from", type=Path, default=None, help="start from this folder's weights (a second phase)")
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--rtn-every", type=int, default=0,
                    help="also measure the perplexity rise of RTN g128 at 4 and 3 bits every N steps")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    train = token_stream(sp, [(CORPORA / "wiki-train.txt", args.wiki_weight), (CORPORA / "sotu.txt", 1)])
    test = token_stream(sp, [(CORPORA / "wiki-test.txt", 1)])
    print(f"train stream {len(train):,} tokens, wiki-test {len(test):,} tokens", flush=True)

    base = PRESETS["tiny"]
    assert base.moe is not None
    cfg = replace(base, moe=replace(base.moe, router_aux_loss_coef=args.aux_coef), torch_dtype="bfloat16")
    assert isinstance(cfg.moe, MoEArgs)
    model = MixtralForCausalLM(cfg)
    init_weights(model, cfg.initializer_range)
    previous = None
    if args.init_from is not None:
        model.load_state_dict({k: v.float() for k, v in load_file(str(args.init_from / "model.safetensors")).items()})
        previous = json.loads((args.init_from / "training_log.json").read_text())
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    log: list[dict[str, Any]] = []
    t0 = time.time()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr, args.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s : s + args.seq + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(batch[:, :-1], output_router_logits=True)
            ce = F.cross_entropy(out.logits.float().view(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
            assert out.aux_loss is not None
            loss = ce + args.aux_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        entry: dict[str, Any] = {"step": step, "lr": lr, "ce": ce.item(), "aux": out.aux_loss.item(),
                                 "elapsed_s": time.time() - t0}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            entry["wiki_test_ppl_512"] = heldout_ppl(model, test, 512, 24)
        if args.rtn_every and ((step + 1) % args.rtn_every == 0 or step + 1 == args.steps):
            base_ppl = entry.get("wiki_test_ppl_512") or heldout_ppl(model, test, 512, 24)
            entry["rtn_rise_percent"] = rtn_rise(model, test, 512, 24, base_ppl)
            print(f"step {step:5d} RTN g128 rise 4-bit {entry['rtn_rise_percent']['4']:.3f} % "
                  f"3-bit {entry['rtn_rise_percent']['3']:.3f} %", flush=True)
        log.append(entry)
        if args.stop_after and step + 1 >= args.stop_after:
            break
        if args.save_every and (step + 1) % args.save_every == 0:
            save(model, args.out, summary(args, log, len(train), t0, previous))
        if step % 10 == 0 or "wiki_test_ppl_512" in entry:
            rate = (step + 1) * args.batch * args.seq / (time.time() - t0)
            extra = f" wiki-test ppl {entry['wiki_test_ppl_512']:.1f}" if "wiki_test_ppl_512" in entry else ""
            print(f"step {step:5d} lr {lr:.2e} ce {entry['ce']:.3f} aux {entry['aux']:.3f} {rate:.0f} tok/s{extra}",
                  flush=True)

    save(model, args.out, summary(args, log, len(train), t0, previous))
    print(f"saved to {args.out} after {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
