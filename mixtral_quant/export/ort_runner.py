"""Run an exported folder with onnxruntime: prefill, then decode with past/present, greedy or sampled.

This is what ``generate --backend onnx`` calls (:func:`generate_onnx`). The session's own input
list says how many layers there are and the KV dtype and shape, so a folder from either target
(fp32 or fp16) runs as is; export.json, when present, gives the context length.

    decoder = OnnxDecoder(Path("exports/tiny-onnx"))
    tokens = generate(decoder, [[1, 415, 2936], [1, 22557]], Sampling(max_new_tokens=20), eos_id=2)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mixtral_quant.artifact import MANIFEST, verify
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.export.common import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
)
from mixtral_quant.export.graph import check_external_data
from mixtral_quant.export.record import read_export_info
from mixtral_quant.generate import Sampling, sample_next

Past = dict[str, np.ndarray]
DEFAULT_SAMPLING = Sampling()  # greedy, 64 new tokens

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxDecoder:
    """One onnxruntime session over ``folder/model.onnx``; :meth:`step` runs one forward call."""

    def __init__(
        self, folder: Path, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            raise MixtralQuantError(f"no {MODEL_FILE} in {folder}: export it first (mixtral-quant export onnx)")
        if (path.parent / MANIFEST).is_file():
            verify(path.parent)  # a modified file is refused by name
        check_external_data(path)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as e:  # onnxruntime's own exception types; the first line says what is wrong
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MixtralQuantError(f"onnxruntime cannot load {path}: {first}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        first = inputs[PAST_KEY % 0]
        self.kv_dtype = np.dtype(_ORT_TYPES[first.type])
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.past_names = [name for i in range(self.num_layers) for name in (PAST_KEY % i, PAST_VALUE % i)]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.vocab_size = int(next(o for o in self.session.get_outputs() if o.name == LOGITS).shape[-1])
        info = read_export_info(Path(folder))
        self.context: int | None = None if info is None else info.get("max_position_embeddings")

    def check_length(self, total: int) -> None:
        """MixtralQuantError when ``total`` positions exceed the exported rotary tables."""
        if self.context is not None and total > self.context:
            raise MixtralQuantError(
                f"{total} positions (prompt + new tokens) exceed the model's context of {self.context}: "
                "shorten the prompt or lower --max-new-tokens"
            )

    def empty_past(self, batch: int) -> Past:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, self.kv_dtype) for name in self.past_names}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """logits float32 [B, S, V] and the new past, for ids [B, S] and mask [B, past + S]."""
        feeds = {INPUT_IDS: input_ids.astype(np.int64), ATTENTION_MASK: attention_mask.astype(np.int64), **past}
        results = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        present = {name: results[name.replace("past_key_values.", "present.")] for name in self.past_names}
        return results[LOGITS], present


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask [B, longest], padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MixtralQuantError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def generate(
    decoder: OnnxDecoder,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling = DEFAULT_SAMPLING,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (left-padded into one batch); a row stops after its eos token.

    Tokens are chosen by :func:`mixtral_quant.generate.sample_next` with the same seeding as the
    PyTorch backend, so both backends sample the same tokens from the same logits.
    """
    ids, mask = left_pad(prompts, pad_id)
    decoder.check_length(ids.shape[1] + sampling.max_new_tokens)
    if ids.min() < 0 or ids.max() >= decoder.vocab_size:
        raise MixtralQuantError(
            f"token id {int(ids.max())} is outside the model's vocabulary of {decoder.vocab_size}: "
            "is the tokenizer the model's own?"
        )
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    logits, past = decoder.step(ids, mask, decoder.empty_past(len(prompts)))
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for step in range(sampling.max_new_tokens):
        tokens = sample_next(torch.from_numpy(logits[:, -1]), sampling, gen).numpy()
        for row, token in enumerate(tokens):
            if not done[row]:
                out[row].append(int(token))
        if eos_id is not None:
            done |= tokens == eos_id
        if done.all() or step == sampling.max_new_tokens - 1:
            break
        tokens = np.where(done, pad_id, tokens)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        logits, past = decoder.step(tokens[:, None].astype(np.int64), mask, past)
    return out


def generate_onnx(
    folder: Path, prompt: list[int], sampling: Sampling = DEFAULT_SAMPLING, eos_id: int | None = None
) -> list[int]:
    """New token ids after ``prompt`` from an exported folder (EOS included when reached)."""
    return generate(OnnxDecoder(folder), [prompt], sampling, eos_id)[0]
