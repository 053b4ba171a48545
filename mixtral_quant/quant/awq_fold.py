"""Folding per-channel scales into Mixtral so that the float function stays the same: the first step
of activation-aware weight quantization (AWQ; Lin et al., "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", 2023).

AWQ multiplies a linear's input channels by ``s`` (``W' = W diag(s)``, so salient channels keep more
precision on the quantization grid) and divides its input by ``s``, folding the division into the op
that produced the input. In Mixtral every such op is itself linear in the channel:

- ``input_layernorm`` (RMSNorm: ``g * x / rms(x)``) feeds q/k/v: ``g / s`` there, ``W * s`` in each;
- ``post_attention_layernorm`` feeds the router and every expert's w1/w3: ``g / s``, and ``W * s`` in each
  of them, the router included, so its logits, and the experts it picks, stay the same;
- w3's output is one factor of the SwiGLU product that w2 reads: rows of w3 ``/ s``, columns of w2 ``* s``;
- v's output reaches o through attention, which is linear in v: rows of v ``/ s`` (``s`` per key/value
  channel) and the columns of o that each query head reads from that key/value head ``* s``.

The functions change the modules' weights in place and return nothing; the scales must be positive.
"""

from __future__ import annotations

import torch
from torch import nn

from mixtral_quant.errors import ConfigError
from mixtral_quant.model import Attention, Expert, RMSNorm


def _check(s: torch.Tensor, width: int, where: str) -> torch.Tensor:
    if s.ndim != 1 or s.numel() != width:
        raise ConfigError(f"{where}: scales must be a vector of {width}, got shape {tuple(s.shape)}")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ConfigError(f"{where}: scales must be positive and finite")
    return s


@torch.no_grad()
def fold_norm(norm: RMSNorm, readers: list[nn.Linear], s: torch.Tensor) -> None:
    """The norm's output divided by ``s``, the columns of every linear that reads it multiplied by ``s``."""
    _check(s, norm.weight.numel(), "fold_norm")
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in readers:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def fold_up_down(expert: Expert, s: torch.Tensor) -> None:
    """w3's output channels divided by ``s``, w2's input columns multiplied by ``s``."""
    _check(s, expert.w3.out_features, "fold_up_down")
    expert.w3.weight.div_(s.to(expert.w3.weight.dtype)[:, None])
    expert.w2.weight.mul_(s.to(expert.w2.weight.dtype)[None, :])


@torch.no_grad()
def fold_value_output(attn: Attention, s: torch.Tensor) -> None:
    """v's output channels (``[kv_heads * head_dim]``) divided by ``s``; o's columns multiplied by the
    scale of the key/value channel each query head reads (query head h reads key/value head h // n_rep)."""
    cfg = attn.cfg
    _check(s, cfg.num_key_value_heads * cfg.head_dim, "fold_value_output")
    attn.v_proj.weight.div_(s.to(attn.v_proj.weight.dtype)[:, None])
    per_query = s.view(cfg.num_key_value_heads, cfg.head_dim).repeat_interleave(cfg.n_rep, dim=0).reshape(-1)
    attn.o_proj.weight.mul_(per_query.to(attn.o_proj.weight.dtype)[None, :])
