"""Throughput on the evaluation device: prefill and greedy decode with the KV cache.

* prefill tokens/s: one forward call over a ``ctx``-long prompt (batch 1), ``ctx / seconds``;
* decode tokens/s: after prefilling a short prompt into a :class:`KVCache`, ``steps`` greedy steps
  of one token each, ``steps / seconds`` (the prompt's prefill is not timed).

Each is run once untimed (warm-up), then ``repeats`` times; the median is reported. On CUDA the
device is synchronised before each clock read. Numbers are for comparing variants measured in the
same run on the same machine, not absolute claims.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mixtral_quant.cache import KVCache
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.model import MixtralForCausalLM


@dataclass(frozen=True)
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_tokens: int  # prompt length of the prefill measurement
    decode_prompt_tokens: int  # prompt prefilled (untimed) before the decode steps
    decode_steps: int
    repeats: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_speed(
    model: MixtralForCausalLM,
    tokens: torch.Tensor,
    ctx: int,
    device: torch.device | str,
    decode_steps: int = 32,
    decode_prompt: int = 128,
    repeats: int = 3,
) -> SpeedResult:
    """Prefill and decode throughput of ``model`` (already on ``device``) on the dataset's first tokens."""
    device = torch.device(device)
    if repeats < 1 or decode_steps < 1:
        raise MixtralQuantError("speed measurement needs at least one repeat and one decode step")
    n_prefill = min(ctx, len(tokens))
    prompt = tokens[:n_prefill].to(device)[None]  # [1, S]
    n_decode_prompt = max(1, min(decode_prompt, ctx - decode_steps, len(tokens)))
    decode_ids = tokens[:n_decode_prompt].to(device)[None]
    dtype = model.model.embed_tokens.weight.dtype

    def prefill() -> None:
        model(prompt, last_only=True)

    def decode() -> float:
        cache = KVCache(model.cfg, 1, n_decode_prompt + decode_steps, dtype=dtype, device=device)
        nxt = model(decode_ids, cache=cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]

        def steps() -> None:
            token = nxt
            for _ in range(decode_steps):
                token = model(token, cache=cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)

        return _seconds(steps, device)

    prefill()  # warm-up
    prefill_s = statistics.median(_seconds(prefill, device) for _ in range(repeats))
    decode()  # warm-up
    decode_s = statistics.median(decode() for _ in range(repeats))
    return SpeedResult(
        prefill_tokens_per_s=n_prefill / prefill_s,
        decode_tokens_per_s=decode_steps / decode_s,
        prefill_tokens=n_prefill,
        decode_prompt_tokens=n_decode_prompt,
        decode_steps=decode_steps,
        repeats=repeats,
        device=str(device),
    )
