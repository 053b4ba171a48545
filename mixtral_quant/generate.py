"""Token generation with the KV cache: greedy or sampled (temperature, top-p), stopping at EOS."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cache import KVCache
from .errors import MixtralQuantError
from .model import MixtralForCausalLM


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MixtralQuantError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or not 0 < self.top_p <= 1:
            raise MixtralQuantError(f"temperature must be a finite number >= 0 and top_p in (0, 1], got "
                                    f"{self.temperature} and {self.top_p}")


def sample_next(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # smallest prefix reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: MixtralForCausalLM, prompt: list[int], sampling: Sampling = Sampling(), eos_id: int | None = None
) -> list[int]:
    """New token ids after ``prompt`` (EOS included when reached)."""
    cfg = model.cfg
    if not prompt:
        raise MixtralQuantError("the prompt is empty")
    total = len(prompt) + sampling.max_new_tokens
    if total > cfg.max_position_embeddings:
        raise MixtralQuantError(
            f"prompt of {len(prompt)} tokens + {sampling.max_new_tokens} new exceeds the model's context of "
            f"{cfg.max_position_embeddings} tokens: shorten the prompt or lower --max-new-tokens"
        )
    device = model.lm_head.weight.device if hasattr(model.lm_head, "weight") else torch.device("cpu")
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(cfg, 1, total, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    ids = torch.tensor([prompt], device=device)
    out: list[int] = []
    for _ in range(sampling.max_new_tokens):
        logits = model(ids, cache=cache, last_only=True).logits[:, -1]
        nxt = sample_next(logits, sampling, gen)
        out.append(int(nxt.item()))
        if eos_id is not None and out[-1] == eos_id:
            break
        ids = nxt[:, None]
    return out
