"""onnxruntime-genai files for an exported folder: genai_config.json and the Hugging Face tokenizer files.

With them the folder runs as is (onnxruntime-genai 0.18):

    model = og.Model("exports/tiny-onnx")
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")  # genai's encode adds no BOS by default
    ids = tokenizer.encode("The capital of France is")  # the same ids as mixtral_quant.tokenizer.Tokenizer

What genai reads, found by running it:

- genai_config.json names the graph's inputs and outputs and the model's sizes; ``search`` holds defaults
  that ``GeneratorParams.set_search_options`` overrides (``max_length`` up to ``context_length``).
  ``past_present_share_buffer`` is true only for the ORT target: GroupQueryAttention writes into genai's
  shared max-length KV buffer, the standard target's Concat needs past and present apart. With it on,
  genai allocates the KV cache for ``max_length`` positions up front, so the default here is capped
  at :data:`DEFAULT_MAX_LENGTH` rather than Mixtral's 131072-position context.
- og.Tokenizer needs both tokenizer.json and tokenizer_config.json (either alone fails to load). It
  encodes with onnxruntime-extensions' own BPE over tokenizer.json, not with the tokenizers library; its
  C API cuts the text at the first NUL character. Decoding matches sentencepiece from BOS on (generated
  sequences start there), but keeps the leading space of a sequence without BOS.
- genai 0.18 treats every token of a 2-D prompt batch as real (all-ones attention mask): left padding
  with ``pad_token_id`` is not masked, so batch prompts of equal length only. ``pad_token_id`` fills
  finished rows; it is the config's pad token, else EOS (the model builder's rule).

The tokenizer files come from :mod:`mixtral_quant.hf_tokenizer` (built from tokenizer.model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixtral_quant.config import MixtralConfig
from mixtral_quant.export.common import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    Target,
)
from mixtral_quant.hf_tokenizer import write_tokenizer_files

GENAI_CONFIG = "genai_config.json"
DEFAULT_MAX_LENGTH = 4096  # search.max_length when the context is longer; set_search_options goes up to context


def genai_config(cfg: MixtralConfig, target: Target, max_length: int | None = None) -> dict[str, Any]:
    """genai_config.json for the graph :func:`~mixtral_quant.export.export_onnx` writes."""
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL_FILE,
        "head_size": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "inputs": {
            "input_ids": INPUT_IDS,
            "attention_mask": ATTENTION_MASK,
            "past_key_names": PAST_KEY,
            "past_value_names": PAST_VALUE,
        },
        "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
    }
    model = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id,
        "context_length": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "type": "mistral",
        "decoder": decoder,
    }
    search = {
        "max_length": max_length or min(cfg.max_position_embeddings, DEFAULT_MAX_LENGTH),
        "min_length": 0,
        "past_present_share_buffer": target is Target.ORT,
        "do_sample": False,
        "top_k": 50,
        "top_p": 1.0,
        "temperature": 1.0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "early_stopping": True,
    }
    return {"model": model, "search": search}


# Tokenizer ------------------------------------------------------------------------------------------
def write_genai_files(cfg: MixtralConfig, out_dir: Path, target: Target) -> list[Path]:
    """Write genai_config.json into an export folder and, from its tokenizer.model, the tokenizer.json
    and tokenizer_config.json it lacks (files copied from the variant are kept). Returns what was written."""
    out_dir = Path(out_dir)
    written = [out_dir / GENAI_CONFIG]
    written[0].write_text(json.dumps(genai_config(cfg, target), indent=2) + "\n")
    return written + write_tokenizer_files(out_dir, cfg.max_position_embeddings)
