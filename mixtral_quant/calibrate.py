"""The layer-sequential calibration driver: the one place where model, checkpoint and methods meet.

For each decoder layer (IST-DASLab ``llama_sequential``): read its weights from disk, quantize the
attention projections (q/k/v, then o), then the experts (w1/w3, then w2), each from the inputs the
already-quantized parts produce, and run the quantized layer to make the next layer's inputs. The
layer's shard is written as soon as it is done, with the activations that feed the next layer, so
an interrupted run resumes from the last finished layer and ends with the same bytes.

Experts (MoE-aware): with policy ``routed`` each expert's Hessian comes from the tokens the router
sends it; an expert with fewer than ``min_token_share`` of the tokens takes the recipe's fallback
(round-to-nearest, or every calibration token). With policy ``all-tokens`` every token goes through
every expert for the Hessian (llm-compressor's MoE calibration) while the layer's output still uses
only routed tokens. Token counts and fallbacks are recorded in the artifact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .awq_layer import fold_attention, fold_experts
from .config import MixtralConfig
from .distributed import SINGLE, Ranks
from .errors import MixtralQuantError
from .layer_inputs import LayerInputs, expert_input
from .model import DecoderLayer, Expert
from .quant import HessianAccumulator, get_method
from .quant.base import ROW_BAND, Method, QuantResult
from .recipe import ExpertCalibration, ExpertPolicy, Fallback, Recipe
from .textfile import read_text
from .tokenizer import Tokenizer


def calibration_tokens(recipe: Recipe, tokenizer: Tokenizer) -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seq_len`` tokens from the corpus, chosen by ``seed``."""
    cal = recipe.calibration
    path = cal.path()
    if not path.is_file():
        raise MixtralQuantError(f"calibration corpus {cal.corpus!r} not found (no {path})")
    ids = corpus_ids(path, tokenizer)
    windows = len(ids) // cal.seq_len
    if windows < cal.samples:
        raise MixtralQuantError(
            f"calibration text {path.name} has {len(ids)} tokens: too short for {cal.samples} sequences of "
            f"{cal.seq_len}; lower samples or seq_len, or use a longer corpus"
        )
    gen = torch.Generator().manual_seed(cal.seed)
    pick = torch.randperm(windows, generator=gen)[: cal.samples].sort().values
    return torch.stack([ids[w * cal.seq_len : (w + 1) * cal.seq_len] for w in pick.tolist()])


_CORPUS_IDS: dict[tuple[tuple[str, int, int], ...], torch.Tensor] = {}


def corpus_ids(path: Path, tokenizer: Tokenizer) -> torch.Tensor:
    """The token ids of a calibration text, tokenized once per process for each text and tokenizer file
    (path, size and modification time) and kept: a run of several recipes (demo, benchmarks) reads the
    corpus once. The most recent text only, so memory holds one corpus."""
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in (path, tokenizer.path))
    if key not in _CORPUS_IDS:
        _CORPUS_IDS.clear()
        _CORPUS_IDS[key] = torch.tensor(tokenizer.encode(read_text(path, "calibration corpus")), dtype=torch.int64)
    return _CORPUS_IDS[key]


class HessianSource(str, Enum):
    ROUTED = "routed"  # the tokens the router sends the expert
    ALL_TOKENS = "all-tokens"  # every calibration token


def expert_sources(tokens_per_expert: list[int], total: int, policy: ExpertCalibration, hessians: bool
                   ) -> tuple[dict[int, HessianSource | None], dict[int, str | None]]:
    """Where each expert's Hessian comes from, and why when it is a fallback.

    ROUTED (the tokens the router sends it), ALL_TOKENS (every calibration token: the all-tokens policy,
    or the all-tokens fallback of an expert with fewer than ``min_token_share`` of the tokens) or None
    (round-to-nearest fallback; every expert of a method without a Hessian). ``total``: calibration tokens."""
    source: dict[int, HessianSource | None] = {}
    notes: dict[int, str | None] = {}
    for e, n in enumerate(tokens_per_expert):
        if policy.policy is ExpertPolicy.ALL_TOKENS:
            source[e], notes[e] = HessianSource.ALL_TOKENS, None
        elif n < policy.min_token_share * total:
            source[e] = HessianSource.ALL_TOKENS if policy.fallback is Fallback.ALL_TOKENS else None
            notes[e] = f"{policy.fallback.value}: {n} of {total} tokens < {policy.min_token_share:.2%}"
        else:
            source[e], notes[e] = HessianSource.ROUTED, None
    if not hessians:
        source = dict.fromkeys(source)
    return source, notes


@dataclass
class LayerReport:
    layer: int
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative output (or weight) error
    tokens_per_expert: list[int] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)  # module -> why it did not get routed GPTQ
    damp: dict[str, float] = field(default_factory=dict)  # module -> damping when raised above the recipe's
    seconds: float = 0.0
    awq_alpha: dict[str, float] = field(default_factory=dict)  # AWQ folding point -> the alpha its search chose


@dataclass
class Quantized:
    """What quantizing some linears of a layer produced: their stored tensors and report entries; the
    unit a rank hands the others in an expert-parallel run."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # linear -> suffix -> tensor
    errors: dict[str, float] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    damp: dict[str, float] = field(default_factory=dict)


HESSIAN_BUDGET = 1 << 30  # bytes of expert Hessians captured in one pass (Mixtral-8x7B's w2: 822 MB each)


class LayerQuantizer:
    """Quantizes one decoder layer in place, module group by module group: decides what each linear is
    quantized from (the expert policy, the Hessian budget), quantizes it, installs its runtime module
    and reports; running the layer and capturing Hessians is :class:`LayerInputs`' job (``inputs``).

    A layer may come without its experts' weights (``fetch`` reads them): each expert's float weights
    are then read just before it is quantized and dropped once it is, so the layer is never whole in
    memory (a rank reads only its own experts).

    Expert Hessians are captured a group of experts per pass over the activations, as many as fit
    in ``hessian_budget`` bytes, and freed once their experts are quantized: at Mixtral-8x7B's
    shapes the eight w2 Hessians (14336 x 14336 float32) would otherwise take 6.6 GB at once; with
    the default 1 GiB, one is held per pass (all eight w1/w3 Hessians, 67 MB each, in one). Each
    expert's inputs do not depend on the other experts' w2, so any grouping gives the same bytes.

    Expert-parallel (``ranks`` of a torch.distributed run): expert ``e`` (w1/w3, then w2) belongs to
    rank ``e % world``, the attention projections (or a dense MLP) to rank ``layer % world``; the owner
    captures the Hessians and quantizes, then hands its :class:`Quantized` to every rank, which installs
    it. The MoE block's inputs and the layer's outputs are computed a chunk of sequences per rank and
    gathered; AWQ's scale search and the token counts run on every rank. The bytes are those of one
    process at the same thread count.
    """

    def __init__(self, layer: DecoderLayer, cfg: MixtralConfig, recipe: Recipe, device: torch.device,
                 chunk: int = 8, hessian_budget: int = HESSIAN_BUDGET, ranks: Ranks = SINGLE,
                 fetch: Callable[[list[str]], None] | None = None, widths: Mapping[str, int] | None = None
                 ) -> None:  # fmt: skip
        self.layer, self.cfg, self.recipe, self.device, self.ranks = layer, cfg, recipe, device, ranks
        self.widths = dict(widths or {})  # linear -> bits where a [mixed] recipe sets it
        self._methods: dict[int, Method] = {}
        self.fetch = fetch  # reads linears the layer was loaded without (still on the meta device)
        self.inputs = LayerInputs(layer, cfg, device, chunk)
        self.hessian_budget = hessian_budget
        self.method: Method = get_method(recipe.quant)
        self.tensors: dict[str, torch.Tensor] = {}
        self.changed: set[str] = set()  # float tensors (relative names) the method rewrote: AWQ's folds
        self.report = LayerReport(layer.self_attn.layer_idx)

    # -- quantizing one linear ----------------------------------------------------------------------
    def quantize(self, names: list[str], hessian: HessianAccumulator | None, fallback: str | None = None
                 ) -> Quantized:  # fmt: skip
        """Quantize linears that share one input (q/k/v, an expert's w1/w3) and install them. GPTQ
        takes them as one stacked matrix (one Cholesky, one sweep: the same codes as one by one).
        ``fallback``: the expert policy's note for a linear that does not get its own routed tokens'
        Hessian; with no Hessian at all the method takes its own fallback and the note says why."""
        done = self.compute(names, hessian, fallback)
        self.apply(done)
        return done

    def method_for(self, name: str) -> Method:
        """The method quantizing linear ``name``: the recipe's, at the width a [mixed] recipe gave it."""
        bits = self.widths.get(name)
        if bits is None or bits == self.recipe.quant.bits:
            return self.method
        if bits not in self._methods:
            self._methods[bits] = get_method(self.recipe.quant.with_fields(bits=bits))
        return self._methods[bits]

    def compute(self, names: list[str], hessian: HessianAccumulator | None, fallback: str | None = None
                ) -> Quantized:  # fmt: skip
        """The stored tensors and report entries of ``names`` (see :meth:`quantize`), nothing installed."""
        unread = [n for n in names if self._linear(n).weight.is_meta]
        if unread:
            assert self.fetch is not None, f"{unread} were never read"
            self.fetch(unread)
        if len({id(self.method_for(n)) for n in names}) > 1:  # widths differ: no stacked sweep
            done = Quantized()
            for n in names:
                one = self.compute([n], hessian, fallback)
                done.tensors.update(one.tensors)
                done.errors.update(one.errors)
                done.fallbacks.update(one.fallbacks)
                done.damp.update(one.damp)
            return done
        modules = [self._linear(n) for n in names]
        method = self.method_for(names[0])
        done = Quantized()
        note = fallback if fallback is not None and method.needs_hessian else None
        if note is not None:
            done.fallbacks.update(dict.fromkeys(names, note))
        h = hessian.hessian if hessian is not None else None
        stacked = getattr(method, "quantize_stacked", None)
        if stacked is not None and h is not None and len(names) > 1:
            results: list[QuantResult] = stacked([m.weight.data for m in modules], h)
        else:  # quantize_widened(w, h) is quantize(w.float(), h) without the whole float32 copy
            widened = getattr(method, "quantize_widened", None)
            if widened is not None:
                results = [widened(m.weight.data, h) for m in modules]
            else:
                results = [method.quantize(m.weight.data.float(), h) if method.needs_hessian
                           else method.quantize(m.weight.data.float()) for m in modules]  # fmt: skip
        configured_damp = self.recipe.quant.flat().get("damp_percent")
        for name, module, result in zip(names, modules, results, strict=True):
            if result.info.get("fallback"):
                done.fallbacks[name] = str(result.info["fallback"])
            if "damp_percent" in result.info and float(result.info["damp_percent"]) > float(configured_damp or 0):
                done.damp[name] = float(result.info["damp_percent"])
            done.errors[name] = relative_error(module.weight.data, dequantized_rows(method, result.tensors), h)
            done.tensors[name] = {k: t.detach().cpu() for k, t in result.tensors.items()}
            if note is not None and h is None:  # the policy's reason, not the method's "no Hessian"
                done.fallbacks[name] = note
        return done

    def apply(self, done: Quantized) -> None:
        """Record quantized linears (computed here or on another rank) and put their runtime modules in
        the layer."""
        self.report.fallbacks.update(done.fallbacks)
        self.report.damp.update(done.damp)
        self.report.errors.update(done.errors)
        for name, tensors in done.tensors.items():
            module = self._linear(name)
            for suffix, t in tensors.items():
                self.tensors[f"{name}.{suffix}"] = t
            runtime = self.method_for(name).make_module(tensors, module.in_features, module.out_features)
            runtime = runtime.to(self.device)
            self.layer.set_submodule(name, runtime)

    def _linear(self, name: str) -> nn.Linear:
        module = self.layer.get_submodule(name)
        assert isinstance(module, nn.Linear)
        return module

    # -- the layer ----------------------------------------------------------------------------------
    def run(self, h: torch.Tensor) -> torch.Tensor:
        t0 = time.time()
        hessians = self.recipe.needs_calibration  # the method declares it needs each input Hessian
        fake_quant = getattr(self.method, "fake_quant", None)  # a method that searches input scales (AWQ)
        if self.recipe.quantizes("attention"):
            if fake_quant is not None:
                fold_attention(self, h, fake_quant)
            self.owned_by_layer(partial(self.quantize_attention, h, hessians), "attention")
        # the MLP's inputs, once per stage: attention is final from here on
        mlp_in = self.spread(h, self.inputs.mlp_input, "the MoE block's inputs")
        self.count_tokens(mlp_in)
        if self.recipe.quantizes("experts"):
            if self.layer.block_sparse_moe is not None:
                if fake_quant is not None:
                    mlp_in = fold_experts(self, mlp_in, fake_quant)  # the inputs under the folded norm
                self.quantize_experts(mlp_in, hessians)
            else:
                self.owned_by_layer(partial(self.quantize_dense_mlp, mlp_in, hessians), "the MLP")
        del mlp_in
        out = self.spread(h, lambda x: self.layer(x, self.inputs.ctx(x.shape[0], x.shape[1]))[0], "outputs")
        self.report.seconds = time.time() - t0
        return out

    def spread(self, h: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> torch.Tensor:
        """``fn`` over the chunks of ``h``, concatenated; with several ranks chunk ``j`` is computed on rank
        ``j % world`` and every rank gets them all (the same chunks as one process: the same bytes)."""
        if self.ranks.world == 1:
            return torch.cat(self.inputs.each_chunk(h, fn))
        size = self.inputs.chunk
        starts = range(0, h.shape[0], size)
        mine = {j: fn(h[s : s + size].to(self.device)).to("cpu") for j, s in enumerate(starts) if self.ranks.mine(j)}
        everyone = self.ranks.gather(mine, f"gathering layer {self.report.layer}'s {what}")
        return torch.cat([everyone[self.ranks.owner(j)][j] for j in range(len(starts))])

    def owned_by_layer(self, work: Callable[[], list[Quantized]], what: str) -> None:
        """Run ``work`` (which quantizes and installs) on the rank that owns this layer's ``what``; the
        others install what it hands them."""
        owner = self.ranks.owner(self.report.layer)
        done = work() if self.ranks.mine(self.report.layer) else None
        shared = self.ranks.share(done, owner, f"handing out layer {self.report.layer}'s {what}")
        if not self.ranks.mine(self.report.layer):
            for part in shared:
                self.apply(part)

    def quantize_attention(self, h: torch.Tensor, hessians: bool) -> list[Quantized]:
        """q/k/v from the layer's inputs, then o from the quantized q/k/v's attention output."""
        qkv = self.inputs.hessian_of(h, self.layer.input_layernorm) if hessians else None
        done = [self.quantize([f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")], qkv)]
        o = self.layer.self_attn.o_proj
        acc = self.inputs.capture(h, {"o": o}, self.inputs.attn_out)["o"] if hessians else None
        return [*done, self.quantize(["self_attn.o_proj"], acc)]

    def count_tokens(self, mlp_in: torch.Tensor) -> None:
        moe = self.layer.block_sparse_moe
        if moe is None:
            self.report.tokens_per_expert = [mlp_in.shape[0] * mlp_in.shape[1]]
            return
        counts = torch.zeros(len(moe.experts), dtype=torch.int64)

        def count(x: torch.Tensor) -> None:
            logits = moe.gate(x.reshape(-1, x.shape[-1]))
            counts.add_(torch.bincount(logits.topk(moe.top_k, dim=-1).indices.flatten().cpu(), minlength=len(counts)))

        self.inputs.each_chunk(mlp_in, count)
        self.report.tokens_per_expert = counts.tolist()

    def quantize_experts(self, h: torch.Tensor, hessians: bool) -> None:
        """w1/w3 of every expert, then w2 from the quantized w1/w3's outputs; ``h`` is the MoE block's
        input (after the post-attention norm).

        Each expert's Hessian source: ROUTED (its routed tokens), ALL_TOKENS (every calibration token:
        the all-tokens policy, or the all-tokens fallback of a starved expert) or None (RTN fallback).
        """
        moe = self.layer.block_sparse_moe
        assert moe is not None
        experts: list[Expert] = list(moe.experts)  # type: ignore[arg-type]
        source, notes = expert_sources(self.report.tokens_per_expert, h.shape[0] * h.shape[1],
                                       self.recipe.experts, hessians)

        mine = [e for e in range(len(experts)) if self.ranks.mine(e)]
        all_tokens = any(source[e] is HessianSource.ALL_TOKENS for e in mine)
        shared = self.inputs.hessian_of(h, _same) if all_tokens else None
        routed = [e for e in mine if source[e] is HessianSource.ROUTED]
        captured: dict[str, HessianAccumulator] = {}
        up: dict[int, Quantized] = {}
        for e in mine:
            if source[e] is HessianSource.ROUTED and str(e) not in captured:
                captured = self._capture_group(h, experts, routed, e, "w1")
            acc = shared if source[e] is HessianSource.ALL_TOKENS else captured.pop(str(e), None)
            up[e] = self.quantize([f"block_sparse_moe.experts.{e}.{w}" for w in ("w1", "w3")], acc, notes[e])
        del shared
        down: dict[int, Quantized] = {}
        for e in mine:
            if source[e] is HessianSource.ROUTED and str(e) not in captured:
                captured = self._capture_group(h, experts, routed, e, "w2")
            if source[e] is HessianSource.ALL_TOKENS:
                acc = self.inputs.hessian_of(h, experts[e].hidden)
            else:
                acc = captured.pop(str(e), None)
            down[e] = self.quantize([f"block_sparse_moe.experts.{e}.w2"], acc, notes[e])
            del acc
        if self.ranks.world > 1:
            self.apply_others(self.ranks.gather((up, down), f"gathering layer {self.report.layer}'s experts"))

    def apply_others(self, parts: list[tuple[dict[int, Quantized], dict[int, Quantized]]]) -> None:
        """Install the experts the other ranks quantized: every w1/w3, then every w2, in expert order."""
        theirs = [p for r, p in enumerate(parts) if r != self.ranks.rank]
        for stage in (0, 1):
            done = {e: d for p in theirs for e, d in p[stage].items()}
            for e in sorted(done):
                self.apply(done[e])

    def _capture_group(self, h: torch.Tensor, experts: list[Expert], routed: list[int], first: int,
                       linear: str) -> dict[str, HessianAccumulator]:  # fmt: skip
        """Hessians of ``linear`` for ``first`` and the routed experts after it, as many as fit in the
        budget together (float32 ``[in, in]`` each), from one pass over the MoE block's inputs."""
        in_features = getattr(experts[first], linear).in_features
        per_pass = max(1, self.hessian_budget // (4 * in_features * in_features))
        start = routed.index(first)
        inputs = expert_input if linear == "w1" else Expert.hidden
        return self.inputs.capture_routed(h, routed[start : start + per_pass], inputs)

    def quantize_dense_mlp(self, h: torch.Tensor, hessians: bool) -> list[Quantized]:
        """gate/up, then down, of a dense MLP whose input (after the post-attention norm) is ``h``."""
        mlp = self.layer.mlp
        assert mlp is not None
        acc = self.inputs.hessian_of(h, _same) if hessians else None
        done = [self.quantize(["mlp.gate_proj", "mlp.up_proj"], acc)]
        down = self.inputs.capture(h, {"d": mlp.down_proj}, mlp)["d"] if hessians else None
        return [*done, self.quantize(["mlp.down_proj"], down)]


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def dequantized_rows(method: Method, tensors: Mapping[str, torch.Tensor]) -> Callable[[int, int], torch.Tensor]:
    """``rows(start, stop)``: float32 rows of the stored weight; a band at a time when the method reads
    bands back (``dequantize_rows``), else sliced from one whole dequantized copy."""
    banded = getattr(method, "dequantize_rows", None)
    if banded is not None:
        return partial(banded, tensors)
    whole = method.dequantize(tensors)
    return lambda start, stop: whole[start:stop]


def relative_error(w: torch.Tensor, rows: Callable[[int, int], torch.Tensor], hessian: torch.Tensor | None) -> float:
    """||X(W-Q)^T||^2 / ||XW^T||^2 from the Hessian when there is one, else ||W-Q||^2 / ||W||^2, with
    ``W`` as stored (any float dtype) and ``rows(start, stop)`` the dequantized ``Q``'s rows, summed
    over bands of :data:`ROW_BAND` output rows so that no whole-weight float32 temporary is made.

    Rounded to 6 significant digits: the last bits of a float32 sum follow the thread count, and a
    report should not change when a resumed run uses another one."""
    num = torch.zeros((), dtype=torch.float64, device=w.device)
    den = torch.zeros((), dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[0], ROW_BAND):
        stop = min(start + ROW_BAND, w.shape[0])
        wb = w[start:stop].float()
        d = wb - rows(start, stop).to(wb.device)
        if hessian is None:
            num += d.pow_(2).sum(dtype=torch.float64)
            den += wb.square().sum(dtype=torch.float64)  # wb may be a view of a float32 w
        else:
            num += ((d @ hessian) * d).sum(dtype=torch.float64)
            den += ((wb @ hessian) * wb).sum(dtype=torch.float64)
    ratio = num / den.clamp(min=1e-30)
    return float(f"{ratio.item():.6g}")
