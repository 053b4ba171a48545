"""What a config implies, by arithmetic alone: the checkpoint's tensor names and shapes, parameter counts
by component, and whether a model of that size can be held in memory.

Nothing here builds a module, so a config.json that claims 10^9 experts or 10^5 layers is measured and
refused in microseconds instead of exhausting memory while modules are created.
"""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import torch

from .config import MixtralConfig
from .errors import ConfigError, MixtralQuantError

# A config past this many parameters is not a model anyone can run (Mixtral-8x22B has 1.4e11).
MAX_PARAMETERS = 10**13


def layer_shapes(cfg: MixtralConfig, i: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Hub names and shapes of decoder layer ``i``'s tensors."""
    m, d = cfg.hidden_size, cfg.head_dim
    p = f"model.layers.{i}."
    yield p + "input_layernorm.weight", (m,)
    yield p + "post_attention_layernorm.weight", (m,)
    yield p + "self_attn.q_proj.weight", (cfg.num_attention_heads * d, m)
    yield p + "self_attn.k_proj.weight", (cfg.num_key_value_heads * d, m)
    yield p + "self_attn.v_proj.weight", (cfg.num_key_value_heads * d, m)
    yield p + "self_attn.o_proj.weight", (m, cfg.num_attention_heads * d)
    f = cfg.intermediate_size
    if cfg.moe is None:
        yield p + "mlp.gate_proj.weight", (f, m)
        yield p + "mlp.up_proj.weight", (f, m)
        yield p + "mlp.down_proj.weight", (m, f)
        return
    yield p + "block_sparse_moe.gate.weight", (cfg.moe.num_local_experts, m)
    for e in range(cfg.moe.num_local_experts):
        q = f"{p}block_sparse_moe.experts.{e}."
        yield q + "w1.weight", (f, m)
        yield q + "w2.weight", (m, f)
        yield q + "w3.weight", (f, m)


def tensor_shapes(cfg: MixtralConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the 16-bit checkpoint (Hub names): what ``MixtralForCausalLM(cfg).state_dict()``
    holds, computed without building it."""
    yield "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_hidden_layers):
        yield from layer_shapes(cfg, i)
    yield "model.norm.weight", (cfg.hidden_size,)
    yield "lm_head.weight", (cfg.vocab_size, cfg.hidden_size)


def tensor_count(cfg: MixtralConfig) -> int:
    per_layer = 6 + (3 if cfg.moe is None else 1 + 3 * cfg.moe.num_local_experts)
    return 3 + cfg.num_hidden_layers * per_layer


def parameter_counts(cfg: MixtralConfig) -> dict[str, int]:
    """Parameters of the 16-bit model by component (lm_head counted once when tied)."""
    m, f, d, n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_hidden_layers
    experts = 1 if cfg.moe is None else cfg.moe.num_local_experts
    return {
        "experts": n * experts * 3 * m * f,
        "attention": n * 2 * m * d * (cfg.num_attention_heads + cfg.num_key_value_heads),
        "router": 0 if cfg.moe is None else n * cfg.moe.num_local_experts * m,
        "embeddings": cfg.vocab_size * m * (1 if cfg.tie_word_embeddings else 2),
        "norms": (2 * n + 1) * m,
    }


def check_size(cfg: MixtralConfig) -> None:
    """ConfigError for a config that describes more parameters than any model has."""
    total = sum(parameter_counts(cfg).values())
    if total > MAX_PARAMETERS:
        raise ConfigError(f"config.json describes {total:.3g} parameters ({cfg.num_hidden_layers} layers, "
                          f"{cfg.num_experts} experts): not a model this tool can hold")


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can take on ``device`` now."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def check_fits(what: str, nbytes: int, device: torch.device, hint: str) -> None:
    """MixtralQuantError before allocating ``nbytes`` that ``device`` does not have free."""
    free = free_bytes(device)
    if nbytes > free:
        raise MixtralQuantError(f"{what} needs {nbytes / 2**30:.1f} GiB but {device.type} has "
                                f"{free / 2**30:.1f} GiB free: {hint}")
