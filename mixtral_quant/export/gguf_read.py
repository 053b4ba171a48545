"""A GGUF file read back into our float layout: every tensor dequantized with gguf-py, q/k rows
returned to the Hugging Face rotary order, experts unstacked. Used to evaluate GGUF files (ours and
llama-quantize's) with our own eval, and to check an export against its source."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from mixtral_quant.config import MixtralConfig
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.export.gguf_blocks import unrope_rows

COPIED = ("generation_config.json", "tokenizer.model", "tokenizer_config.json")


def gguf_weights(path: Path, cfg: MixtralConfig) -> dict[str, np.ndarray]:
    """float32 tensors under our (Hugging Face) names from the GGUF file ``path`` of a model with ``cfg``."""
    reader = gguf.GGUFReader(path)
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    out = {"model.embed_tokens.weight": raw.pop("token_embd.weight"),
           "model.norm.weight": raw.pop("output_norm.weight"), "lm_head.weight": raw.pop("output.weight")}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    experts = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
    for name, w in raw.items():
        _, layer, kind, _ = name.split(".")
        p = f"model.layers.{layer}"
        if kind in heads:
            w = unrope_rows(w, heads[kind])
        if kind in experts:
            for e, we in enumerate(w):
                out[f"{p}.block_sparse_moe.experts.{e}.{experts[kind]}.weight"] = we
        elif kind in names:
            out[f"{p}.{names[kind]}.weight"] = w
        else:
            raise MixtralQuantError(f"{path} holds a tensor this reader does not know: {name}")
    return out


def gguf_to_folder(path: Path, template: Path, out: Path) -> Path:
    """Write the GGUF ``path`` as a float32 model folder ``out`` (config and tokenizer from ``template``;
    the folder is float, so the template's quantization_config is left out)."""
    from mixtral_quant.checkpoint import load_config, write_float_folder

    weights = gguf_weights(path, load_config(template))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    return write_float_folder(out, tensors, template, COPIED)
