"""The KV cache handed to the model, and the attention context built for each forward call.

One preallocated buffer per layer (gpt-fast's static cache): keys and values
[B, kv_heads, max_len, head_dim], written at ``length`` and read up to the new length. This is the
shape an exported ONNX graph takes as ``past_key_values.N.*`` and returns as ``present.N.*``.

Left-padded batches: the caller passes ``attention_mask`` [B, total_len] (1 = real token, 0 = pad)
covering the cache and the new tokens, as Hugging Face does. Positions count real tokens only, so
a padded row sees the same positions as the row run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MixtralConfig
from .errors import MixtralQuantError


class KVCache:
    """Keys and values of every layer, preallocated to ``max_len`` positions."""

    def __init__(
        self,
        cfg: MixtralConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0  # positions written (by every layer) so far

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise MixtralQuantError(
                f"the KV cache holds {self.max_len} positions; {self.length} used and {n_new} more asked: "
                "use a shorter prompt or fewer new tokens"
            )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [B, kv_heads, S, D] for ``layer``; return all of them so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


@dataclass
class AttentionContext:
    """What every layer of one forward call shares: rotary tables and the attention mask."""

    cos: torch.Tensor  # [B, S, D]
    sin: torch.Tensor  # [B, S, D]
    mask: torch.Tensor  # [B, 1, S, T] bool, True = may attend
    start: int  # first position of the new tokens in the cache (0 without a cache)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, D] for integer positions [B, S] (non-interleaved halves, as on the Hub)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions.float()[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_context(
    cfg: MixtralConfig,
    batch: int,
    seq_len: int,
    attention_mask: torch.Tensor | None,
    start: int,
    dtype: torch.dtype,
    device: torch.device,
) -> AttentionContext:
    """Positions, rotary tables and the causal / sliding-window / padding mask for new tokens.

    ``attention_mask`` is [B, start + seq_len] or None (no padding).
    """
    total = start + seq_len
    if attention_mask is None:
        key_ok = torch.ones(batch, total, dtype=torch.bool, device=device)
        positions = torch.arange(start, total, device=device).expand(batch, seq_len)
    else:
        if attention_mask.shape != (batch, total):
            raise MixtralQuantError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, total)} "
                "(cached + new positions)"
            )
        key_ok = attention_mask.to(device=device, dtype=torch.bool)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:total].to(device)
    q_idx = torch.arange(start, total, device=device)[:, None]  # [S, 1]
    k_idx = torch.arange(total, device=device)[None, :]  # [1, T]
    allowed = k_idx <= q_idx
    if cfg.sliding_window is not None:
        allowed = allowed & (q_idx - k_idx < cfg.sliding_window)
    mask = allowed[None, None] & key_ok[:, None, None, :]  # [B, 1, S, T]
    # A padding query would see nothing (softmax of nothing is NaN): let it see itself.
    mask = mask | (k_idx == q_idx)[None, None]
    cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta, dtype)
    return AttentionContext(cos=cos, sin=sin, mask=mask, start=start)
