"""Reports (JSON / Markdown / HTML), the regression gate, and the runner end to end on tiny checkpoints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtral_quant.artifact import write_manifest
from mixtral_quant.checkpoint import write_checkpoint
from mixtral_quant.config import PRESETS, MoEArgs
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.eval.compare import Comparison
from mixtral_quant.eval.data import WIKI_TEST
from mixtral_quant.eval.memory import COMPONENTS, MemoryReport, PeakKind, PeakMeasure, bits_per_parameter, memory_bytes
from mixtral_quant.eval.perplexity import PerplexityResult
from mixtral_quant.eval.report import (
    SCHEMA_VERSION,
    EvalReport,
    ModelResult,
    bound_results,
    check,
    gate_table,
    load_bounds,
    write_reports,
)
from mixtral_quant.eval.runner import RegressionError, evaluate
from mixtral_quant.model import MixtralForCausalLM, parameter_groups
from mixtral_quant.quant import MethodName, QuantConfig, get_method
from mixtral_quant.sizes import parameter_counts


def model_result(
    name: str, ppl: float, stored: int, agreement: list[float] | None, role: str = "variant"
) -> ModelResult:
    params = dict.fromkeys(COMPONENTS, 1000)
    disk = dict.fromkeys(COMPONENTS, stored // len(COMPONENTS))
    memory = MemoryReport(disk, disk, params, {**dict.fromkeys(COMPONENTS, 8.0), "total": 8.0},
                          PeakMeasure(10, 20, 10, PeakKind.CPU_RSS_HIGH_WATER))  # fmt: skip
    comparison = None if role == "baseline" else Comparison(0.01, 0.02, agreement, 100, 2)
    return ModelResult(
        name, f"/m/{name}", role, "mixtral", None,
        PerplexityResult(ppl, 100 * 2.0, 100, 2, 64, 64, "bos", False), ppl / 10.0, memory, None, comparison,
    )  # fmt: skip


def synthetic_report() -> EvalReport:
    dataset = {"name": "t", "source": "t.txt", "sha256": "0" * 64, "tokens": 101, "tokenizer": "x"}
    dataset["tokenization"] = "BOS"
    settings = {"ctx": 64, "stride": 64, "device": "cpu", "dtype": "float32", "layer_sequential": False, "torch": "2"}
    return EvalReport(
        "2025-01-01T00:00:00+00:00", "0.1.0", dataset, settings,
        model_result("base", 10.0, 5000, None, "baseline"),
        [model_result("q4", 10.5, 1500, [0.9, 0.8]), model_result("<dense>", 11.0, 2000, None)],
    )  # fmt: skip


def write_bounds(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reports_are_written_and_parse(tmp_path: Path) -> None:
    report = synthetic_report()
    paths = write_reports(report, tmp_path / "out")
    data = json.loads(paths[0].read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert [v["name"] for v in data["variants"]] == ["q4", "<dense>"]
    assert data["variants"][0]["comparison"]["router_agreement"] == [0.9, 0.8]
    assert data["baseline"]["memory"]["peak"]["kind"] == "cpu_rss_high_water_mark"
    md = paths[1].read_text()
    assert re.search(r"^\| base \(baseline\) \| 10\.0000 \|", md, re.M)
    assert re.search(r"^\| q4 \| 10\.5000 \| 1\.0500 \|", md, re.M)
    page = paths[2].read_text()
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 2 and "&lt;dense&gt;" in page
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    assert not list(tmp_path.glob("out/.*"))  # no temporary files left behind


def test_gate(tmp_path: Path) -> None:
    report = synthetic_report()
    loose = write_bounds(tmp_path / "a.toml", "[variants.q4]\nmax_ppl_ratio = 1.06\nmax_weight_bytes = 1500\n"
                         "min_router_agreement = 0.8\n")  # fmt: skip
    assert check(report, load_bounds(loose)) == []
    tight = write_bounds(tmp_path / "b.toml", "[variants.q4]\nmax_ppl_ratio = 1.04\nmax_weight_bytes = 1499\n"
                         "min_router_agreement = 0.81\n[variants.'<dense>']\nmin_router_agreement = 0.5\n")  # fmt: skip
    violations = check(report, load_bounds(tight))
    assert {(v.variant, v.bound) for v in violations} == {
        ("q4", "max_ppl_ratio"), ("q4", "max_weight_bytes"), ("q4", "min_router_agreement"),
        ("<dense>", "min_router_agreement"),
    }  # fmt: skip
    table = gate_table(bound_results(report, load_bounds(tight)))
    assert "FAIL" in table and "n/a (no MoE)" in table and "1.05" in table


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[variants.nope]\nmax_ppl_ratio = 1.1\n", "unknown variants"),
        ("[variants.q4]\nmax_ppl = 1.1\n", "unknown keys"),
        ("[q4]\nmax_ppl_ratio = 1.1\n", r"\[variants.NAME\]"),
        ("[variants.q4]\nmax_ppl_ratio = 'x'\n", "must be a number"),
        ("[variants.q4\n", "not valid TOML"),
    ],
)
def test_bad_bounds_are_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(MixtralQuantError, match=match):
        check(synthetic_report(), load_bounds(write_bounds(tmp_path / "b.toml", text)))


CFG = replace(
    PRESETS["tiny"], hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, sliding_window=32, moe=MoEArgs(num_local_experts=4, num_experts_per_tok=2),
)  # fmt: skip


def save_models(root: Path) -> tuple[Path, Path]:
    """A float checkpoint and its W8 variant (every linear but router and head quantized)."""
    torch.manual_seed(0)
    state = MixtralForCausalLM(CFG).state_dict()
    base, w8 = root / "base", root / "w8"
    base.mkdir()
    CFG.save(base / "config.json")
    write_checkpoint(state.items(), base)
    method = get_method(QuantConfig.for_method(MethodName.W8))
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.dim() == 2 and ".layers." in name and ".gate." not in name:
            tensors |= {f"{name.removesuffix('.weight')}.{k}": v for k, v in method.quantize(t).tensors.items()}
        else:
            tensors[name] = t
    w8.mkdir()
    CFG.save(w8 / "config.json", extra={"quantization_config": method.quantization_config()})
    write_checkpoint(tensors.items(), w8)
    write_manifest(w8, {})  # an artifact as the tool writes it: quantized folders are verified
    return base, w8


def test_runner_end_to_end(tmp_path: Path) -> None:
    base, w8 = save_models(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(WIKI_TEST.read_text()[:2500])
    bounds = write_bounds(tmp_path / "ok.toml", "[variants.w8]\nmax_ppl_ratio = 1.01\nmin_router_agreement = 0.5\n")
    kwargs: dict[str, Any] = {"dataset": str(text), "ctx": 64, "stride": 48, "device": "auto", "progress": False}
    report = evaluate([w8], base, report_dir=tmp_path / "r", check=bounds, **kwargs)
    assert report.settings["device"] == "cpu" and report.gate and all(r.passed for r in report.gate)
    variant = report.variant("w8")
    assert variant.comparison is not None and variant.comparison.router_agreement is not None
    assert 0 < variant.comparison.kl_mean < 0.01 and len(variant.comparison.router_agreement) == 2
    assert variant.memory.bits_per_parameter["experts"] == pytest.approx(8.0, abs=0.5)
    assert report.baseline.speed is not None and report.baseline.speed.decode_tokens_per_s > 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["gate"][0]["passed"] is True

    layered = evaluate([w8], base, layer_sequential=True, **kwargs)
    assert layered.variant("w8").perplexity.ppl == pytest.approx(variant.perplexity.ppl, rel=1e-6)
    layered_cmp = layered.variant("w8").comparison
    assert layered_cmp is not None and layered_cmp.kl_mean == pytest.approx(variant.comparison.kl_mean, rel=1e-4)
    assert layered_cmp.router_agreement == variant.comparison.router_agreement
    assert layered.baseline.speed is None

    limit = variant.memory.weight_bytes - 1
    tight = write_bounds(tmp_path / "tight.toml", f"[variants.w8]\nmax_weight_bytes = {limit}\n")
    with pytest.raises(RegressionError, match="max_weight_bytes") as err:
        evaluate([w8], base, report_dir=tmp_path / "r2", check=tight, **kwargs)
    assert "FAIL" in err.value.table and (tmp_path / "r2" / "report.html").is_file()
    with pytest.raises(MixtralQuantError, match="unknown variants"):
        evaluate([w8], base, check=write_bounds(tmp_path / "x.toml", "[variants.w4]\nmax_ppl_ratio = 2\n"), **kwargs)


def test_memory_accounting() -> None:
    torch.manual_seed(0)
    model = MixtralForCausalLM(CFG)
    params = parameter_counts(CFG)  # the formula, checked against the model's own parameters
    assert params == parameter_groups(model)
    assert memory_bytes(model) == {c: 4 * n for c, n in params.items()}
    assert bits_per_parameter(memory_bytes(model.to(torch.bfloat16)), params)["total"] == 16.0
    method = get_method(QuantConfig.for_method(MethodName.NF4))
    name = "model.layers.0.block_sparse_moe.experts.0.w1"
    stored = method.quantize(model.get_parameter(f"{name}.weight").data).tensors
    model.set_submodule(name, method.make_module(stored, 64, 128))
    json_state = stored["weight.quant_state.bitsandbytes__nf4"].numel()  # lives as Python fields in memory
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values()) - json_state
    assert memory_bytes(model)["experts"] == 2 * params["experts"] - 2 * 64 * 128 + stored_bytes
    # In a fresh process: in a long test session freed pages stay resident and hide a new block.
    code = (
        "import torch\nfrom mixtral_quant.eval.memory import PeakMemory\n"
        "with PeakMemory('cpu') as peak:\n    block = torch.ones(64 * 2**20 // 4)\n    del block\n"
        "print(peak.result.delta_bytes)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) >= 60 * 2**20  # 64 MiB, touched


def test_max_tokens_scores_the_head_of_the_dataset(tmp_path: Path) -> None:
    """``max_tokens`` N: the report scores the first N tokens, with the same perplexity as the whole
    run over a text that holds only those tokens (computed without the option), and says so."""
    from mixtral_quant.eval.data import load_dataset, tokenizer_for
    from mixtral_quant.eval.perplexity import model_perplexity
    from mixtral_quant.loading import load_model

    base, w8 = save_models(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(WIKI_TEST.read_text()[:6000])
    full = load_dataset(str(text), tokenizer_for(base)).tokens
    n = 300
    assert len(full) > 2 * n
    report = evaluate([w8], base, dataset=str(text), ctx=64, device="cpu", progress=False, max_tokens=n)
    assert report.dataset["tokens"] == n and report.dataset["tokens_in_text"] == len(full)
    direct = model_perplexity(load_model(base), full[:n], ctx=64)
    assert report.baseline.perplexity.ppl == pytest.approx(direct.ppl, rel=1e-6)
    assert report.baseline.perplexity.tokens_scored == direct.tokens_scored
    with pytest.raises(MixtralQuantError, match="at least 2 tokens"):
        evaluate([w8], base, dataset=str(text), ctx=64, device="cpu", progress=False, max_tokens=1)


def test_one_lockstep_pass_over_the_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval of 3 variants: every model's forward runs once per window (the baseline's included, not
    once per variant), the figures equal those computed model by model, and in layer-sequential mode
    every tensor of the baseline checkpoint is read once for all variants."""
    import shutil
    from collections import Counter

    from mixtral_quant.checkpoint import CheckpointReader
    from mixtral_quant.eval import runner
    from mixtral_quant.eval.compare import compare
    from mixtral_quant.eval.data import load_dataset, tokenizer_for
    from mixtral_quant.eval.perplexity import model_perplexity, plan_windows, window_outputs
    from mixtral_quant.loading import load_model

    base, w8 = save_models(tmp_path)
    variants = [w8, tmp_path / "w8-b", tmp_path / "w8-c"]
    for v in variants[1:]:
        shutil.copytree(w8, v)
    text = tmp_path / "text.txt"
    text.write_text(WIKI_TEST.read_text()[:2500])
    tokens = load_dataset(str(text), tokenizer_for(base)).tokens
    windows = plan_windows(len(tokens), 64, 48)
    calls: Counter[int] = Counter()
    forward = MixtralForCausalLM.forward

    def counted(self: MixtralForCausalLM, *args: Any, **kwargs: Any) -> Any:
        calls[id(self)] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MixtralForCausalLM, "forward", counted)
    monkeypatch.setattr(runner, "measure_speeds", lambda models, *a, **k: [None] * len(models))  # not the pass's
    monkeypatch.setattr(runner, "warm_up", lambda *a, **k: None)
    kwargs: dict[str, Any] = {"dataset": str(text), "ctx": 64, "stride": 48, "device": "cpu", "progress": False}
    report = evaluate(variants, base, **kwargs)
    assert len(calls) == 4 and set(calls.values()) == {len(windows)}

    monkeypatch.setattr(MixtralForCausalLM, "forward", forward)
    ref, var = load_model(base), load_model(w8)
    assert report.baseline.perplexity.ppl == pytest.approx(model_perplexity(ref, tokens, 64, 48).ppl, rel=1e-6)
    assert report.variant("w8-c").perplexity.ppl == pytest.approx(model_perplexity(var, tokens, 64, 48).ppl, rel=1e-6)
    streams = (window_outputs(m, tokens, windows, "cpu", False, router_logits=True) for m in (ref, var))
    direct = compare(*streams, top_k=2)
    for name in ("w8", "w8-b", "w8-c"):
        got = report.variant(name).comparison
        assert got is not None and got.kl_mean == pytest.approx(direct.kl_mean, rel=1e-5)
        assert got.router_agreement == direct.router_agreement and got.top1_changed == direct.top1_changed

    reads: Counter[tuple[str, str]] = Counter()
    get = CheckpointReader.get

    def counted_get(self: CheckpointReader, name: str, *args: Any, **kw: Any) -> torch.Tensor:
        reads[(str(self.folder), name)] += 1
        return get(self, name, *args, **kw)

    monkeypatch.setattr(CheckpointReader, "get", counted_get)
    layered = evaluate(variants, base, layer_sequential=True, **kwargs)
    base_reads = {name: n for (folder, name), n in reads.items() if folder == str(base)}
    with CheckpointReader(base) as r:
        assert base_reads == dict.fromkeys(r.names, 1)
    assert layered.variant("w8-b").perplexity.ppl == pytest.approx(report.variant("w8-b").perplexity.ppl, rel=1e-6)


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "mistral-7b", "tiny"])
def test_parameter_formula_is_the_models_count(preset: str) -> None:
    """bits/param divides by sizes.parameter_counts: it equals the parameters of the model built on meta."""
    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    assert parameter_counts(cfg) == parameter_groups(model)


def test_speeds_are_measured_in_interleaved_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """After one warm-up of each model, every round times each model once in turn (prefill, then decode);
    each figure is the median over the rounds of that model's times."""
    from mixtral_quant.eval import speed

    order: list[tuple[str, int]] = []
    times = {"prefill": [[0.5, 0.1, 0.2, 0.3], [1.0, 0.4, 0.8, 0.6]],  # warm-up, then 3 rounds, per model
             "decode": [[9.0, 2.0, 4.0, 1.0], [9.0, 8.0, 4.0, 6.0]]}

    def timer(kind: str) -> Any:
        def timed(model: Any, plan: Any, device: Any) -> float:
            order.append((kind, model))
            return times[kind][model][sum(1 for k, m in order if (k, m) == (kind, model)) - 1]
        return timed

    monkeypatch.setattr(speed, "_prefill_seconds", timer("prefill"))
    monkeypatch.setattr(speed, "_decode_seconds", timer("decode"))
    results = speed.measure_speeds([0, 1], torch.arange(300), 64, "cpu", decode_steps=8, repeats=3)  # type: ignore[list-item]
    assert order == [(k, m) for _ in range(4) for m in (0, 1) for k in ("prefill", "decode")]
    assert [r.prefill_tokens_per_s for r in results] == [64 / 0.2, 64 / 0.6]
    assert [r.decode_tokens_per_s for r in results] == [8 / 2.0, 8 / 6.0]
    assert results[0].prefill_tokens == 64 and results[0].decode_prompt_tokens == 56 and results[0].repeats == 3
