"""Throughput on the evaluation device: prefill and greedy decode with the KV cache.

* prefill tokens/s: one forward call over a ``ctx``-long prompt (batch 1), ``ctx / seconds``;
* decode tokens/s: after prefilling a short prompt into a :class:`KVCache`, ``steps`` greedy steps
  of one token each, ``steps / seconds`` (the prompt's prefill is not timed).

:func:`measure_speeds` takes every model of a run together: after one untimed warm-up of each, a
round times each model once in turn (prefill, then decode), and each figure is the median over
``repeats`` rounds. A slow spell of the machine then touches every model alike instead of whichever
was being measured, so the ratios between models of one run are what is compared. On CUDA the device
is synchronised before each clock read. Numbers are for comparing variants measured in the same run on
the same machine, not absolute claims.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

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


@dataclass(frozen=True)
class _Plan:
    prompt: torch.Tensor  # [1, S] the prefill prompt
    decode_ids: torch.Tensor  # [1, P] the prompt prefilled (untimed) before the decode steps
    steps: int


def _plan(tokens: torch.Tensor, ctx: int, device: torch.device, decode_steps: int, decode_prompt: int) -> _Plan:
    n_prefill = min(ctx, len(tokens))
    n_decode_prompt = max(1, min(decode_prompt, ctx - decode_steps, len(tokens)))
    return _Plan(tokens[:n_prefill].to(device)[None], tokens[:n_decode_prompt].to(device)[None], decode_steps)


@torch.no_grad()
def _prefill_seconds(model: MixtralForCausalLM, plan: _Plan, device: torch.device) -> float:
    return _seconds(lambda: model(plan.prompt, last_only=True), device)


@torch.no_grad()
def _decode_seconds(model: MixtralForCausalLM, plan: _Plan, device: torch.device) -> float:
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(model.cfg, 1, plan.decode_ids.shape[1] + plan.steps, dtype=dtype, device=device)
    nxt = model(plan.decode_ids, cache=cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]

    def steps() -> None:
        token = nxt
        for _ in range(plan.steps):
            token = model(token, cache=cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)

    return _seconds(steps, device)


def warm_up(model: MixtralForCausalLM, tokens: torch.Tensor, ctx: int, device: torch.device | str) -> None:
    """One untimed prefill of the speed prompt (a full-length window's forward: the peak of a window)."""
    device = torch.device(device)
    _prefill_seconds(model, _plan(tokens, ctx, device, 1, 1), device)


def measure_speeds(
    models: list[MixtralForCausalLM],
    tokens: torch.Tensor,
    ctx: int,
    device: torch.device | str,
    decode_steps: int = 32,
    decode_prompt: int = 128,
    repeats: int = 5,
    progress: bool = False,
) -> list[SpeedResult]:
    """Prefill and decode throughput of each of ``models`` (already on ``device``), in interleaved rounds."""
    device = torch.device(device)
    if repeats < 1 or decode_steps < 1:
        raise MixtralQuantError("speed measurement needs at least one repeat and one decode step")
    plan = _plan(tokens, ctx, device, decode_steps, decode_prompt)
    for model in models:  # warm-up
        _prefill_seconds(model, plan, device)
        _decode_seconds(model, plan, device)
    prefill: list[list[float]] = [[] for _ in models]
    decode: list[list[float]] = [[] for _ in models]
    for _ in tqdm(range(repeats), desc="speed", unit="round", leave=False, disable=not progress or not models):
        for k, model in enumerate(models):
            prefill[k].append(_prefill_seconds(model, plan, device))
            decode[k].append(_decode_seconds(model, plan, device))
    return [
        SpeedResult(
            prefill_tokens_per_s=plan.prompt.shape[1] / statistics.median(p),
            decode_tokens_per_s=decode_steps / statistics.median(d),
            prefill_tokens=plan.prompt.shape[1],
            decode_prompt_tokens=plan.decode_ids.shape[1],
            decode_steps=decode_steps,
            repeats=repeats,
            device=str(device),
        )
        for p, d in zip(prefill, decode, strict=True)
    ]
