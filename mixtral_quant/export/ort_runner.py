"""Run an exported folder with onnxruntime: prefill, then decode with past/present, greedy or sampled.

This is what ``generate --backend onnx`` calls. The session's own input list says how many layers
there are and the KV dtype and shape, so a folder from either target (fp32 or fp16) runs as is.

    decoder = OnnxDecoder(Path("exports/tiny-onnx"))
    tokens = generate(decoder, [[1, 415, 2936], [1, 22557]], Sampling(max_new_tokens=20), eos_id=2)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.export.common import ATTENTION_MASK, INPUT_IDS, LOGITS, MODEL_FILE, PAST_KEY, PAST_VALUE

Past = dict[str, np.ndarray]

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SamplingSettings(Protocol):
    """What generation reads from its settings (``mixtral_quant.generate.Sampling`` has these fields)."""

    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def seed(self) -> int: ...


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; else softmax(logits / temperature) cut to the top_p nucleus."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise MixtralQuantError(
                f"invalid sampling settings {self}: max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1"
            )


class OnnxDecoder:
    """One onnxruntime session over ``folder/model.onnx``; :meth:`step` runs one forward call."""

    def __init__(
        self, folder: Path, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            raise MixtralQuantError(f"no {MODEL_FILE} in {folder}: export it first (mixtral-quant export onnx)")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        first = inputs[PAST_KEY % 0]
        self.kv_dtype = np.dtype(_ORT_TYPES[first.type])
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.past_names = [name for i in range(self.num_layers) for name in (PAST_KEY % i, PAST_VALUE % i)]
        self.output_names = [o.name for o in self.session.get_outputs()]

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


def next_tokens(logits: np.ndarray, sampling: SamplingSettings, rng: np.random.Generator) -> np.ndarray:
    """One token per row from last-position logits [B, V]."""
    if sampling.temperature == 0.0:
        return logits.argmax(-1)
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        keep = np.cumsum(sorted_p, -1) - sorted_p < sampling.top_p  # the smallest prefix reaching top_p
        np.put_along_axis(probs, order, np.where(keep, sorted_p, 0.0), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def generate(
    decoder: OnnxDecoder,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingSettings = Sampling(),
    eos_id: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (left-padded into one batch); a row stops after its eos token."""
    ids, mask = left_pad(prompts, pad_id)
    rng = np.random.default_rng(sampling.seed)
    logits, past = decoder.step(ids, mask, decoder.empty_past(len(prompts)))
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for step in range(sampling.max_new_tokens):
        tokens = next_tokens(logits[:, -1].astype(np.float32), sampling, rng)
        for row, token in enumerate(tokens):
            if not done[row]:
                out[row].append(int(token))
        if eos_id is not None:
            done |= tokens == eos_id
        if done.all() or step == sampling.max_new_tokens - 1:
            break
        tokens = np.where(done, pad_id, tokens)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        logits, past = decoder.step(tokens[:, None], mask, past)
    return out
