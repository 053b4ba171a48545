"""Sliding-window perplexity, the Hugging Face way, in two execution modes that give the same numbers.

Windows of ``ctx`` tokens start every ``stride`` tokens (the last one may be shorter). Each window
scores only the tokens no earlier window scored; a token needs its predecessor inside the window,
so the first window scores all but its first token, and with ``stride == ctx`` (no overlap) every
window's first token goes unscored, exactly as in the Hugging Face perplexity guide
(``target_ids[:, :-trg_len] = -100`` with the label shift). perplexity = exp(NLL sum / tokens scored).

Modes:

* plain: one ``model(ids)`` call per window (the whole model resident on the device);
* layer-sequential, for models larger than the device: every window goes through the embedding,
  then every window through layer 0, then layer 1, ... with one layer's weights on the device at a
  time (a :class:`LayerSource` loads and releases them). The hidden states of all windows stay on
  the CPU, or in a memory-mapped file under ``spill_dir``. Router logits (when asked) are kept on
  the CPU too.

Both modes yield :class:`WindowOutput` (final logits and router logits of one window) in window
order, so perplexity and the baseline/variant comparison consume either mode the same way.

Shape legend: S tokens of a window, V vocabulary, M hidden size, E experts.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixtral_quant.cache import attention_context
from mixtral_quant.config import MixtralConfig
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.model import MixtralForCausalLM

BOS_HANDLING = "one BOS before the whole text; later windows start mid-text without BOS; BOS is never scored"


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go through the model; targets ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from

    def scored_rows(self) -> slice:
        """Rows of the window's logits [S, V] that predict the scored targets."""
        return slice(self.score_from - 1 - self.begin, self.end - 1 - self.begin)


def plan_windows(n_tokens: int, ctx: int, stride: int | None = None) -> list[Window]:
    """Hugging Face sliding windows over ``n_tokens`` tokens (``stride`` None: ``ctx``, no overlap)."""
    stride = ctx if stride is None else stride
    if ctx < 2:
        raise MixtralQuantError(f"context length {ctx} is too short: use at least 2 tokens")
    if not 0 < stride <= ctx:
        raise MixtralQuantError(f"stride {stride} is invalid: it must lie in 1..ctx ({ctx})")
    if n_tokens < 2:
        raise MixtralQuantError(f"the dataset has {n_tokens} tokens: perplexity needs at least 2")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        start = max(prev_end, begin + 1)
        if end > start:
            windows.append(Window(begin, end, start))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class WindowOutput:
    window: Window
    logits: torch.Tensor  # [S, V]
    router_logits: list[torch.Tensor]  # per MoE layer [S, E]; empty unless asked


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float  # natural log, summed over scored tokens
    tokens_scored: int
    windows: int
    ctx: int
    stride: int
    bos: str
    layer_sequential: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NLLAccumulator:
    """Sums the negative log-likelihood of each window's scored targets (in float64).

    Each window's sum is kept (``parts``) and added up in window order by :meth:`result`, so windows
    scored on several ranks (:meth:`combine`) give the same float as one process scoring them all."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens
        self.parts: list[tuple[int, float, int]] = []  # per window: (begin, nll sum, tokens scored)

    def add(self, out: WindowOutput) -> None:
        w = out.window
        logits = out.logits[w.scored_rows()].float()  # [n, V]
        targets = self.tokens[w.score_from : w.end].to(logits.device)
        self.parts.append((w.begin, float(F.cross_entropy(logits, targets, reduction="sum").double()), w.n_scored))

    def combine(self, parts: Iterable[list[tuple[int, float, int]]]) -> None:
        """Take every rank's windows (``parts`` of each, in any order) in place of this one's."""
        self.parts = [p for ps in parts for p in ps]

    def result(self, ctx: int, stride: int, layer_sequential: bool) -> PerplexityResult:
        nll, count = 0.0, 0
        for _, part, n in sorted(self.parts):
            nll += part
            count += n
        return PerplexityResult(
            ppl=math.exp(nll / count),
            nll_sum=nll,
            tokens_scored=count,
            windows=len(self.parts),
            ctx=ctx,
            stride=stride,
            bos=BOS_HANDLING,
            layer_sequential=layer_sequential,
        )


# Plain mode -----------------------------------------------------------------------------------


@torch.no_grad()
def forward_windows(
    model: MixtralForCausalLM,
    tokens: torch.Tensor,
    windows: Iterable[Window],
    device: torch.device | str,
    router_logits: bool = False,
) -> Iterator[WindowOutput]:
    """One forward call per window on ``device`` (where the model already is)."""
    for w in windows:
        ids = tokens[w.begin : w.end].to(device)[None]  # [1, S]
        out = model(ids, output_router_logits=router_logits)
        yield WindowOutput(w, out.logits[0], out.router_logits)


# Layer-sequential mode ------------------------------------------------------------------------


class LayerSource(Protocol):
    """Hands out one part of a model at a time, on a device, and takes it back."""

    @property
    def cfg(self) -> MixtralConfig: ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of hidden states (the embedding's)."""
        ...

    def embedding(self, device: torch.device) -> nn.Module:
        """ids [1, S] -> hidden [1, S, M]."""
        ...

    def layer(self, index: int, device: torch.device) -> nn.Module:
        """A DecoderLayer: (x, ctx, None) -> (x, router logits | None)."""
        ...

    def head(self, device: torch.device) -> nn.Module:
        """Final norm then lm_head: hidden [1, S, M] -> logits [1, S, V]."""
        ...

    def release(self, module: nn.Module) -> None:
        """Free the device memory of a part handed out before."""
        ...


class ModelLayers:
    """A :class:`LayerSource` over an in-memory model: each part moves to the device and back."""

    def __init__(self, model: MixtralForCausalLM) -> None:
        self.model = model
        self._home: dict[int, torch.device] = {}

    @property
    def cfg(self) -> MixtralConfig:
        return self.model.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    def _lend(self, module: nn.Module, device: torch.device) -> nn.Module:
        tensors = [*module.parameters(), *module.buffers()]
        self._home[id(module)] = tensors[0].device if tensors else device
        return module.to(device)

    def embedding(self, device: torch.device) -> nn.Module:
        return self._lend(self.model.model.embed_tokens, device)

    def layer(self, index: int, device: torch.device) -> nn.Module:
        return self._lend(self.model.model.layers[index], device)

    def head(self, device: torch.device) -> nn.Module:
        return self._lend(nn.Sequential(self.model.model.norm, self.model.lm_head), device)

    def release(self, module: nn.Module) -> None:
        module.to(self._home.pop(id(module)))


class HiddenStore:
    """Hidden states of every window [S_w, M], on the CPU or in a memory-mapped file."""

    def __init__(self, lengths: list[int], hidden: int, dtype: torch.dtype, path: Path | None = None) -> None:
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + n)
        size = self.offsets[-1] * hidden
        if path is None:
            flat = torch.empty(size, dtype=dtype)
        else:
            flat = torch.from_file(str(path), shared=True, size=size, dtype=dtype)
        self.data = flat.view(self.offsets[-1], hidden)

    def get(self, i: int) -> torch.Tensor:
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def set(self, i: int, x: torch.Tensor) -> None:
        self.data[self.offsets[i] : self.offsets[i + 1]].copy_(x)


@torch.no_grad()
def forward_windows_layerwise(
    source: LayerSource,
    tokens: torch.Tensor,
    windows: list[Window],
    device: torch.device | str,
    router_logits: bool = False,
    spill_dir: Path | None = None,
    progress: bool = False,
) -> Iterator[WindowOutput]:
    """All windows through the embedding, then through each layer in turn, then the head."""
    device = torch.device(device)
    cfg = source.cfg
    routers: list[list[torch.Tensor]] = [[] for _ in windows]
    spill = tempfile.TemporaryDirectory(dir=spill_dir, prefix="hidden-") if spill_dir else nullcontext(None)
    with spill as folder:
        path = Path(folder) / "hidden.bin" if folder else None
        store = HiddenStore([w.end - w.begin for w in windows], cfg.hidden_size, source.dtype, path)
        embed = source.embedding(device)
        for i, w in enumerate(windows):
            store.set(i, embed(tokens[w.begin : w.end].to(device)))
        source.release(embed)
        del embed
        bar = tqdm(range(cfg.num_hidden_layers), desc="layers", disable=not progress, leave=False)
        for index in bar:
            layer = source.layer(index, device)
            for i, w in enumerate(windows):
                x = store.get(i).to(device)[None]  # [1, S, M]
                ctx = attention_context(cfg, 1, w.end - w.begin, None, 0, source.dtype, device)
                y, logits = layer(x, ctx, None)
                store.set(i, y[0])
                if router_logits and logits is not None:
                    routers[i].append(logits.to("cpu"))
            source.release(layer)
            del layer  # before the next layer arrives
        head = source.head(device)
        try:
            for i, w in enumerate(windows):
                logits = head(store.get(i).to(device)[None])[0]  # [S, V]
                yield WindowOutput(w, logits, [r.to(device) for r in routers[i]])
                routers[i] = []
        finally:
            source.release(head)


# Entry point ----------------------------------------------------------------------------------


def perplexity(
    outputs: Iterable[WindowOutput],
    tokens: torch.Tensor,
    ctx: int,
    stride: int,
    layer_sequential: bool,
    progress: bool = False,
    total: int | None = None,
) -> PerplexityResult:
    """Perplexity from the window outputs of either mode."""
    acc = NLLAccumulator(tokens)
    for out in tqdm(outputs, total=total, desc="windows", disable=not progress, leave=False):
        acc.add(out)
    return acc.result(ctx, stride, layer_sequential)


def model_perplexity(
    model: MixtralForCausalLM,
    tokens: torch.Tensor,
    ctx: int,
    stride: int | None = None,
    device: torch.device | str = "cpu",
    layer_sequential: bool = False,
    spill_dir: Path | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of an in-memory model (plain, or layer-sequential moving one module at a time)."""
    windows = plan_windows(len(tokens), ctx, stride)
    outputs = window_outputs(model, tokens, windows, device, layer_sequential, spill_dir=spill_dir, progress=progress)
    return perplexity(outputs, tokens, ctx, stride or ctx, layer_sequential, progress, len(windows))


def window_outputs(
    model: MixtralForCausalLM | LayerSource,
    tokens: torch.Tensor,
    windows: list[Window],
    device: torch.device | str,
    layer_sequential: bool,
    router_logits: bool = False,
    spill_dir: Path | None = None,
    progress: bool = False,
) -> Iterator[WindowOutput]:
    """Window outputs of a model or layer source in the mode asked (a layer source is always layer-sequential)."""
    if isinstance(model, MixtralForCausalLM) and not layer_sequential:
        return forward_windows(model, tokens, windows, device, router_logits)
    source = ModelLayers(model) if isinstance(model, MixtralForCausalLM) else model
    return forward_windows_layerwise(source, tokens, windows, device, router_logits, spill_dir, progress)
