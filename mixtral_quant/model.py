"""The reference Mixtral (and Mistral) in PyTorch.

Module names are the Hugging Face Hub names, so ``state_dict()`` keys are exactly what a Hub
checkpoint holds (``model.layers.N.block_sparse_moe.experts.E.w1.weight`` ...). Experts are separate
``nn.Linear`` modules, so every quantizer that targets ``nn.Linear`` sees them.

Shape legend: B batch, S new tokens, T keys (cached + new), H query heads, G key/value heads,
D head dim, M model (hidden) dim, I expert (intermediate) dim, E experts, K active experts, N tokens (B*S).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import AttentionContext, KVCache, attention_context
from .config import MixtralConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings and an optional sliding window."""

    def __init__(self, cfg: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        d, h, g, m = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
        self.q_proj = nn.Linear(m, h * d, bias=False)
        self.k_proj = nn.Linear(m, g * d, bias=False)
        self.v_proj = nn.Linear(m, g * d, bias=False)
        self.o_proj = nn.Linear(h * d, m, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(b, s, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)  # [B, G, S, D]
        v = self.v_proj(x).view(b, s, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)  # [B, G, S, D]
        cos, sin = ctx.cos[:, None], ctx.sin[:, None]  # [B, 1, S, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, G, T, D]
        k = k.repeat_interleave(cfg.n_rep, dim=1)  # [B, H, T, D]
        v = v.repeat_interleave(cfg.n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)  # [B, H, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class Expert(nn.Module):
    """One SwiGLU expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)  # gate
        self.w2 = nn.Linear(intermediate, hidden, bias=False)  # down
        self.w3 = nn.Linear(hidden, intermediate, bias=False)  # up

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """w2's input: the SwiGLU product."""
        return F.silu(self.w1(x)) * self.w3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.hidden(x))


class DenseMLP(nn.Module):
    """Mistral's MLP, the same SwiGLU under Hub names gate/up/down_proj."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all experts, keep the top k, renormalise to sum 1.

    router_logits [N, E] -> weights [N, K] (float32), experts [N, K] (int64).
    """
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def dispatch(experts: torch.Tensor, n_experts: int) -> dict[int, torch.Tensor]:
    """``experts [N, K]`` (each token's chosen experts) -> for every expert chosen at least once, its
    (token, k) slots in token order (indices into ``experts.flatten()``; ``slot // K`` is the token)."""
    slot = experts.flatten()  # [N*K] expert of each (token, k) slot
    order = torch.argsort(slot, stable=True)
    counts = torch.bincount(slot, minlength=n_experts).tolist()
    starts = [0, *itertools.accumulate(counts)]
    return {e: order[starts[e] : starts[e] + n] for e, n in enumerate(counts) if n}


class SparseMoE(nn.Module):
    """Router + experts; tokens are grouped by expert so each expert runs once per call."""

    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.top_k = cfg.moe.num_experts_per_tok
        self.jitter = cfg.moe.router_jitter_noise
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe.num_local_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(cfg.hidden_size, cfg.intermediate_size) for _ in range(cfg.moe.num_local_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, m = x.shape
        flat = x.reshape(-1, m)  # [N, M]
        if self.training and self.jitter > 0:
            flat = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(flat)  # [N, E]
        weights, experts = route(logits, self.top_k)  # [N, K]
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, sel in dispatch(experts, len(self.experts)).items():
            tok = sel // self.top_k  # tokens routed to expert e
            y = self.experts[e](flat[tok]) * weights.flatten()[sel, None]
            out.index_add_(0, tok, y)
        return out.view(b, s, m), logits

    def routed_tokens(self, flat: torch.Tensor) -> dict[int, torch.Tensor]:
        """For ``flat [N, M]`` (MoE inputs), the rows routed to each expert that gets any, in the order
        :meth:`forward` hands them to it: the inputs of an expert without running the others."""
        _, experts = route(self.gate(flat), self.top_k)
        return {e: sel // self.top_k for e, sel in dispatch(experts, len(self.experts)).items()}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MixtralConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe: SparseMoE | None = None
        self.mlp: DenseMLP | None = None
        if cfg.moe is not None:
            self.block_sparse_moe = SparseMoE(cfg)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        h = self.post_attention_layernorm(x)
        if self.block_sparse_moe is not None:
            y, logits = self.block_sparse_moe(h)
            return x + y, logits
        assert self.mlp is not None
        return x + self.mlp(h), None


class MixtralModel(nn.Module):
    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V] (or [B, 1, V] with last_only)
    router_logits: list[torch.Tensor]  # per MoE layer [N, E]; empty unless asked
    aux_loss: torch.Tensor | None = None


class MixtralForCausalLM(nn.Module):
    """Mixtral (cfg.moe set) or Mistral (cfg.moe None) with a language-model head."""

    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = MixtralModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache | None
    ) -> AttentionContext:
        b, s = input_ids.shape
        start = cache.length if cache is not None else 0
        dtype = self.model.embed_tokens.weight.dtype
        return attention_context(self.cfg, b, s, attention_mask, start, dtype, input_ids.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_router_logits: bool = False,
        last_only: bool = False,
    ) -> CausalLMOutput:
        """input_ids [B, S]; attention_mask [B, cached + S] (1 real, 0 pad) or None."""
        if cache is not None:
            cache.check_room(input_ids.shape[1])
        ctx = self.context(input_ids, attention_mask, cache)
        x = self.model.embed_tokens(input_ids)  # [B, S, M]
        router_logits: list[torch.Tensor] = []
        for layer in self.model.layers:
            x, logits = layer(x, ctx, cache)
            if output_router_logits and logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_only:
            x = x[:, -1:]
        out = CausalLMOutput(logits=self.lm_head(self.model.norm(x)), router_logits=router_logits)
        if output_router_logits and router_logits and self.cfg.moe is not None:
            mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1] :]
            out.aux_loss = load_balancing_loss(router_logits, self.cfg.moe.num_experts_per_tok, mask)
        return out


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss as Mixtral trains with it: E * sum_e f_e * P_e.

    f_e is the share of (token, slot) assignments that go to expert e, P_e the mean router
    probability of e, both over all layers' tokens (padding excluded when a mask is given).
    """
    logits = torch.cat(router_logits, dim=0)  # [L*N, E]
    n_exp = logits.shape[-1]
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    assigned = F.one_hot(chosen, n_exp).float()  # [L*N, K, E]
    if attention_mask is None:
        f = assigned.mean(dim=0)  # [K, E]
        p = probs.mean(dim=0)  # [E]
    else:
        w = attention_mask.reshape(-1).float().repeat(len(router_logits))  # [L*N]
        f = (assigned * w[:, None, None]).sum(0) / w.sum()
        p = (probs * w[:, None]).sum(0) / w.sum()
    return (f * p[None]).sum() * n_exp


COMPONENTS = ("experts", "attention", "router", "embeddings", "norms")


def parameter_groups(model: MixtralForCausalLM) -> dict[str, int]:
    """Parameter counts by component: experts (or mlp), attention, router, embeddings, norms."""
    return by_component((name, p.numel()) for name, p in model.named_parameters())


def by_component(named: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Sum (tensor name, count) pairs per component; every component is present (0 if empty)."""
    out = dict.fromkeys(COMPONENTS, 0)
    for name, n in named:
        out[component_of(name)] += n
    return out


def component_of(name: str) -> str:
    """Which component a Hub tensor name belongs to."""
    if ".experts." in name or ".mlp." in name:
        return "experts"
    if ".self_attn." in name:
        return "attention"
    if ".block_sparse_moe.gate" in name:
        return "router"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    return "norms"
