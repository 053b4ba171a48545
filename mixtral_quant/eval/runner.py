"""``mixtral-quant eval``: evaluate variants against a baseline, write reports, apply the gate.

1. Every model (the baseline first, then each variant) is loaded; in plain mode its peak memory is
   that of the load and one full-length window's forward, as the increase over what was in use before.
   Then the prefill and decode speed of all of them is measured in interleaved rounds (:mod:`speed`).
2. One lockstep pass over the windows: each window goes once through the baseline and once
   through every variant; perplexity, KL, top-1 changes and router agreement all come from those
   logits (:class:`NLLAccumulator`, :class:`ComparisonAccumulator`).
3. Stored bytes are counted by component on disk and in memory (:mod:`memory`).

Layer-sequential mode (``layer_sequential=True``, or None and the models would not fit: their
weights together at the evaluation dtype over 80 % of the free device memory) reads every model one
decoder layer at a time from its checkpoint (:class:`CheckpointLayers`), each checkpoint once for
all variants: every model's windows go through its layers, then the heads' logits meet window by
window. Speed is then not measured, "in memory" is the sum of the parts as they were loaded, and
the peak is that of the one pass over all models. The same code serves CPU and CUDA; only the
device and the peak-memory probe differ.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import mixtral_quant
from mixtral_quant.artifact import check_source
from mixtral_quant.checkpoint import CheckpointReader, load_config, quantization_config
from mixtral_quant.config import MixtralConfig, function_differences
from mixtral_quant.device import resolve_device
from mixtral_quant.distributed import SINGLE, Ranks, ranks_from_env
from mixtral_quant.errors import CheckpointError, MixtralQuantError
from mixtral_quant.eval.compare import Comparison, ComparisonAccumulator
from mixtral_quant.eval.data import load_dataset, tokenizer_for
from mixtral_quant.eval.memory import COMPONENTS, PeakMeasure, PeakMemory, memory_bytes, memory_report
from mixtral_quant.eval.perplexity import (
    LayerSource,
    NLLAccumulator,
    PerplexityResult,
    Window,
    WindowOutput,
    plan_windows,
    window_outputs,
)
from mixtral_quant.eval.report import (
    BoundResult,
    EvalReport,
    ModelResult,
    bound_results,
    check_names,
    check_report_folder,
    gate_table,
    load_bounds,
    write_reports,
)
from mixtral_quant.eval.speed import SpeedResult, measure_speeds, warm_up
from mixtral_quant.loading import load_model
from mixtral_quant.model import DecoderLayer, MixtralForCausalLM, RMSNorm
from mixtral_quant.quant import read_scheme
from mixtral_quant.sizes import free_bytes
from mixtral_quant.stored_linear import quantized_tensors

FIT_SHARE = 0.8  # of free device memory all models' weights together may take in plain mode


class RegressionError(MixtralQuantError):
    """Bounds were violated; ``table`` lists every bound with its measured value."""

    def __init__(self, results: list[BoundResult], report: EvalReport) -> None:
        self.table = gate_table(results)
        self.violations = [r for r in results if not r.passed]
        self.report = report
        super().__init__(f"{len(self.violations)} evaluation bound(s) violated:\n{self.table}")


class CheckpointLayers:
    """A :class:`LayerSource` that reads one part of a checkpoint at a time (quantized linears too)."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        self.reader = CheckpointReader(folder)
        self._cfg = load_config(folder)
        qc = quantization_config(folder)
        self.scheme = read_scheme(qc) if qc else None  # each linear's method (a mixed artifact's differ)
        self._dtype = dtype
        self.loaded = dict.fromkeys(COMPONENTS, 0)  # bytes of every part handed out (once per part)
        self.used: set[str] = set()
        self._counted: set[str] = set()
        self._prefix: dict[int, str] = {}  # id of a part handed out -> its Hub name prefix

    @property
    def cfg(self) -> MixtralConfig:
        return self._cfg

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _get(self, name: str, device: torch.device, cast: bool) -> torch.Tensor:
        self.used.add(name)
        return self.reader.get(name, self._dtype if cast else None, device)

    def _fill(self, module: nn.Module, prefix: str, device: torch.device) -> nn.Module:
        for name, sub in list(module.named_modules()):
            full = f"{prefix}.{name}" if name else prefix
            tensors = None
            method = self.scheme.method_for(full) if self.scheme is not None and isinstance(sub, nn.Linear) else None
            if isinstance(sub, nn.Linear):
                tensors = quantized_tensors(self.reader, method, full, lambda n: self._get(n, device, cast=False))
            if tensors is not None:
                assert method is not None and isinstance(sub, nn.Linear)
                quantized = method.make_module(tensors, sub.in_features, sub.out_features)
                if not name:  # the part is the linear itself
                    module = quantized
                    break
                module.set_submodule(name, quantized)
                continue
            for pname, p in list(sub.named_parameters(recurse=False)):
                t = self._get(f"{full}.{pname}", device, cast=True)
                if tuple(t.shape) != tuple(p.shape):
                    shapes = f"{tuple(t.shape)}, expected {tuple(p.shape)}"
                    raise CheckpointError(f"tensor {full}.{pname} in {self.reader.folder} has shape {shapes}")
                setattr(sub, pname, nn.Parameter(t, requires_grad=False))
        self._prefix[id(module)] = prefix
        return module.to(device).eval()

    def embedding(self, device: torch.device) -> nn.Module:
        with torch.device("meta"):
            e = nn.Embedding(self.cfg.vocab_size, self.cfg.hidden_size)
        return self._fill(e, "model.embed_tokens", device)

    def layer(self, index: int, device: torch.device) -> nn.Module:
        with torch.device("meta"):
            layer = DecoderLayer(self.cfg, index)
        return self._fill(layer, f"model.layers.{index}", device)

    def head(self, device: torch.device) -> nn.Module:
        with torch.device("meta"):
            norm = RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps)
            lm_head = nn.Linear(self.cfg.hidden_size, self.cfg.vocab_size, bias=False)
        tied = self.cfg.tie_word_embeddings and "lm_head.weight" not in self.reader.where
        out = self._fill(lm_head, "model.embed_tokens" if tied else "lm_head", device)
        return nn.Sequential(self._fill(norm, "model.norm", device), out)

    def release(self, module: nn.Module) -> None:
        """Count the part's bytes (after use: bitsandbytes repacks on its first CPU call) the first
        time it comes back; the part itself is freed when the caller drops it."""
        parts = module if isinstance(module, nn.Sequential) else [module]
        for part in parts:
            prefix = self._prefix.pop(id(part))
            if prefix not in self._counted:
                self._counted.add(prefix)
                for c, n in memory_bytes(part, prefix).items():
                    self.loaded[c] += n

    def check_all_used(self) -> None:
        unused = sorted(set(self.reader.names) - self.used)
        if unused:
            raise CheckpointError(f"{self.reader.folder} holds tensors the model has no place for: {unused[:5]}")


@dataclass(frozen=True)
class _Run:
    """The settings every model of one evaluation shares."""

    tokens: torch.Tensor
    windows: list[Window]
    ctx: int
    stride: int
    device: torch.device
    dtype: torch.dtype
    layer_sequential: bool
    progress: bool


@dataclass
class _Loaded:
    """One model under evaluation: resident (plain mode) or read layer by layer."""

    name: str
    path: Path
    model: MixtralForCausalLM | None
    source: CheckpointLayers | None
    peak: PeakMeasure | None = None
    speed: SpeedResult | None = None

    @property
    def cfg(self) -> MixtralConfig:
        return self.model.cfg if self.model is not None else self._source.cfg

    @property
    def _source(self) -> CheckpointLayers:
        assert self.source is not None
        return self.source

    def outputs(self, run: _Run, router: bool) -> Iterator[WindowOutput]:
        target: MixtralForCausalLM | LayerSource = self.model if self.model is not None else self._source
        return window_outputs(
            target, run.tokens, run.windows, run.device, self.model is None, router, progress=run.progress
        )


def _weights_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes a checkpoint's weights take once loaded at ``dtype`` (float tensors converted)."""
    size = torch.empty(0, dtype=dtype).element_size()
    with CheckpointReader(folder) as r:
        floats = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
        return sum(r.nbytes(n) * size // floats[r.dtype(n)] if r.dtype(n) in floats else r.nbytes(n) for n in r.names)


def _disk_tensors(folder: Path) -> list[tuple[str, int]]:
    with CheckpointReader(folder) as r:
        return [(n, r.nbytes(n)) for n in r.names]


def _unique_names(variants: list[Path], baseline: Path) -> list[str]:
    names = [p.name for p in variants]
    dupes = sorted({n for n in names if names.count(n) > 1} | ({baseline.name} & set(names)))
    if dupes:
        raise MixtralQuantError(f"models share folder names {dupes}: variants are named by folder, rename them")
    return names


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def evaluate(
    variants: list[Path],
    baseline: Path,
    dataset: str = "wiki-test",
    ctx: int = 2048,
    stride: int | None = None,
    device: str = "auto",
    report_dir: Path | None = None,
    check: Path | None = None,
    layer_sequential: bool | None = None,
    progress: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    no_verify: bool = False,
    max_tokens: int | None = None,
    ranks: Ranks | None = None,
) -> EvalReport:
    """Evaluate ``variants`` against ``baseline`` (model folders); see the module docstring.

    ``stride`` None means ``ctx`` (windows do not overlap); ``max_tokens`` scores only the head of
    the dataset (its first N tokens, BOS included). Reports are written to ``report_dir``
    when given; with ``check`` (a bounds TOML) a violated bound raises :class:`RegressionError`
    after the reports are written.

    Under torchrun (``ranks`` None: from the environment) the windows are divided among the ranks
    (window ``k`` on rank ``k % world``) and each model's speed is measured by rank ``index % world``;
    every window's sums are gathered and added in window order, so the report's figures are those of
    one process at the same thread count. Rank 0 writes the reports.
    """
    dev = resolve_device(device)
    ranks = ranks if ranks is not None else ranks_from_env(dev)
    progress = progress and ranks.main
    variants, baseline = [Path(v) for v in variants], Path(baseline)
    names = _unique_names(variants, baseline)
    base_cfg = load_config(baseline)
    for v in [baseline, *variants]:  # fail before hours of evaluation, not after
        check_source(v, quantized=bool(quantization_config(v)), no_verify=no_verify)
        diff = function_differences(base_cfg, load_config(v))
        if diff:
            raise MixtralQuantError(f"{v} is not a variant of the baseline {baseline}: {'; '.join(diff)}")
    if ctx > base_cfg.max_position_embeddings:
        raise MixtralQuantError(f"--ctx {ctx} is beyond the model's max_position_embeddings "
                                f"{base_cfg.max_position_embeddings}")
    bounds = load_bounds(Path(check)) if check is not None else None
    if bounds is not None:
        check_names(bounds, names)
    if max_tokens is not None and max_tokens < 2:
        raise MixtralQuantError(f"--max-tokens {max_tokens}: scoring needs at least 2 tokens (BOS and one more)")
    if report_dir is not None:
        check_report_folder(Path(report_dir))  # likewise for a folder that cannot be made or is not ours
    data = load_dataset(dataset, tokenizer_for(baseline)).head(max_tokens)
    windows = plan_windows(len(data.tokens), ctx, stride)
    folders = [baseline, *variants]
    if layer_sequential is None:
        free = free_bytes(dev)
        layer_sequential = sum(_weights_bytes(f, dtype) for f in folders) > FIT_SHARE * free
    run = _Run(data.tokens, windows[ranks.rank :: ranks.world], ctx, stride or ctx, dev, dtype, layer_sequential,
               progress)  # fmt: skip
    bar = tqdm(folders, desc="loading", unit="model", disable=not progress)
    models = []
    for k, folder in enumerate(bar):
        bar.set_postfix_str(folder.name)
        models.append(_load(folder, run, measure=ranks.mine(k)))
    timed = [m for k, m in enumerate(models) if ranks.mine(k) and m.model is not None]
    speeds = measure_speeds([m.model for m in timed if m.model is not None], run.tokens, run.ctx, run.device,
                            progress=run.progress)  # fmt: skip
    for m, speed in zip(timed, speeds, strict=True):
        m.speed = speed
    if ranks.world > 1:  # each model's speed and peak from the rank that measured it
        measured = ranks.gather({k: (m.peak, m.speed) for k, m in enumerate(models) if ranks.mine(k)},
                                "gathering the speed measurements")
        for k, m in enumerate(models):
            m.peak, m.speed = measured[ranks.owner(k)][k]
    with PeakMemory(dev) as pass_peak:
        ppls, comparisons = _lockstep(models, run, ranks)
    results = [
        _result(m, ppl, ppl.ppl / ppls[0].ppl, cmp, pass_peak.result)
        for m, ppl, cmp in zip(models, ppls, [None, *comparisons], strict=True)
    ]
    del models
    _release(dev)
    report = EvalReport(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        tool_version=mixtral_quant.__version__,
        dataset=data.to_dict(),
        settings={
            "ctx": ctx,
            "stride": run.stride,
            "device": str(dev),
            "dtype": str(dtype).removeprefix("torch."),
            "layer_sequential": layer_sequential,
            "torch": torch.__version__,
            "ranks": ranks.world,
        },
        baseline=results[0],
        variants=results[1:],
    )
    if bounds is not None:
        report.gate = bound_results(report, bounds)
    if report_dir is not None and ranks.main:
        write_reports(report, Path(report_dir))
    if report.gate is not None and not all(r.passed for r in report.gate):
        raise RegressionError(report.gate, report)
    return report


def _load(folder: Path, run: _Run, measure: bool = True) -> _Loaded:
    """A model ready for the lockstep pass; in plain mode (and ``measure``) the peak of its load and of
    one full-length window's forward."""
    vocab, top = load_config(folder).vocab_size, int(run.tokens.max())
    if top >= vocab:
        raise MixtralQuantError(f"{folder} has a {vocab}-token vocabulary, the tokenizer yields id {top}")
    if run.layer_sequential:
        return _Loaded(folder.name, folder, None, CheckpointLayers(folder, run.dtype))
    with PeakMemory(run.device) as peak:
        model = load_model(folder, dtype=run.dtype, device=run.device, no_verify=True)  # verified up front
        if measure:
            warm_up(model, run.tokens, run.ctx, run.device)
    return _Loaded(folder.name, folder, model, None, peak.result if measure else None)


def _lockstep(models: list[_Loaded], run: _Run, ranks: Ranks = SINGLE
              ) -> tuple[list[PerplexityResult], list[Comparison]]:  # fmt: skip
    """One pass over this rank's windows: each model's forward once per window, the baseline
    (``models[0]``) compared with every variant on the same logits; then every rank's window sums."""
    moe = models[0].cfg.moe
    router = moe is not None and len(models) > 1
    streams = [m.outputs(run, router) for m in models]
    nll = [NLLAccumulator(run.tokens) for _ in models]
    cmp = [ComparisonAccumulator(moe.num_experts_per_tok if moe is not None else None) for _ in models[1:]]
    for outs in tqdm(zip(*streams, strict=True), total=len(run.windows), desc="windows", unit="window",
                     leave=False, disable=not run.progress):  # fmt: skip
        for acc, out in zip(nll, outs, strict=True):
            acc.add(out)
        for c, out in zip(cmp, outs[1:], strict=True):
            c.add(outs[0], out)
    if ranks.world > 1:
        everyone = ranks.gather(([a.parts for a in nll], [c.parts for c in cmp]), "gathering the window sums")
        for k, a in enumerate(nll):
            a.combine(parts[0][k] for parts in everyone)
        for k, c in enumerate(cmp):
            c.combine(parts[1][k] for parts in everyone)
    return [a.result(run.ctx, run.stride, run.layer_sequential) for a in nll], [c.result() for c in cmp]


def _result(
    m: _Loaded, ppl: PerplexityResult, ratio: float, cmp: Comparison | None, pass_peak: PeakMeasure | None
) -> ModelResult:
    """The report entry of one model after the pass (memory counted, notes written)."""
    notes: list[str] = []
    if m.model is not None:
        in_memory, peak = memory_bytes(m.model), m.peak
    else:
        assert m.source is not None
        m.source.check_all_used()
        in_memory, peak = m.source.loaded, pass_peak
        notes.append("layer-sequential: memory_bytes is the sum of the parts as they were loaded; peak is that "
                     "of the one pass over all models; speed not measured")
    return ModelResult(
        name=m.name,
        path=str(m.path),
        role="variant" if cmp is not None else "baseline",
        model_type=m.cfg.model_type,
        quantization=quantization_config(m.path),
        perplexity=ppl,
        ppl_ratio=ratio,
        memory=memory_report(m.cfg, in_memory, _disk_tensors(m.path), peak, notes),
        speed=m.speed,
        comparison=cmp,
    )
