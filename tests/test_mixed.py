"""MoE-aware mixed precision: the allocation against brute force, the [mixed] recipe section, and a mixed
artifact quantized, stored, read back and loaded with a width per linear."""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_MIXTRAL, save_model

import mixtral_quant.mixed as mixed
from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader
from mixtral_quant.errors import ConfigError
from mixtral_quant.loading import load_model, new_model
from mixtral_quant.mixed import Choice, allocate
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.quant import read_scheme
from mixtral_quant.quant.gptq_method import dequantize_checkpoint
from mixtral_quant.quant.modules import DequantLinear
from mixtral_quant.recipe import load_recipe, parse_recipe

CFG = replace(SMALL_MIXTRAL, vocab_size=32000)  # the real tokenizer's vocabulary


def brute_force(items: dict[str, list[Choice]], budget: int) -> float:
    best = float("inf")
    for pick in itertools.product(*(items[n] for n in sorted(items))):
        if sum(c.nbytes for c in pick) <= budget:
            best = min(best, sum(c.cost for c in pick))
    return best


def random_items(rng: random.Random, n: int) -> dict[str, list[Choice]]:
    items = {}
    for i in range(n):
        base = rng.randrange(8, 40) * 16
        items[f"l{i}"] = [Choice(b, base * b + rng.randrange(0, 4) * 16, rng.random() / b**2) for b in (2, 3, 4, 8)]
    return items


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    items = random_items(rng, rng.randrange(2, 6))
    least = sum(min(c.nbytes for c in cs) for cs in items.values())
    most = sum(max(c.nbytes for c in cs) for cs in items.values())
    for budget in (least, (least + most) // 2, least + (most - least) // 5, most):
        got = allocate(items, budget)
        assert sum(c.nbytes for c in got.values()) <= budget
        assert sum(c.cost for c in got.values()) == pytest.approx(brute_force(items, budget), rel=1e-12)


def test_allocation_with_a_coarse_table_still_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the table capped, sizes round up to larger units: the result fits and is near the optimum."""
    items = random_items(random.Random(5), 5)
    budget = sum(cs[1].nbytes for cs in items.values())
    monkeypatch.setattr(mixed, "MAX_CELLS", 40)
    got = allocate(items, budget)
    assert sum(c.nbytes for c in got.values()) <= budget
    assert sum(c.cost for c in got.values()) >= brute_force(items, budget)


def test_allocation_refuses_a_budget_below_the_narrowest_widths() -> None:
    items = random_items(random.Random(1), 3)
    least = sum(min(c.nbytes for c in cs) for cs in items.values())
    with pytest.raises(ConfigError, match="below the smallest width"):
        allocate(items, least - 1)


BASE = """
name = "mixed"
[quant]
method = "{method}"
bits = 4
group_size = 32
[calibration]
samples = 8
seq_len = 64
"""


def test_mixed_section_is_read_and_checked() -> None:
    import tomllib

    def recipe(method: str, mixed_section: str) -> object:
        return parse_recipe(tomllib.loads(BASE.format(method=method) + mixed_section), "mixed")

    r = recipe("gptq", "[mixed]\nbudget_bits = 3.0\nchoices = [4, 2, 3]\nattention_bits = 8\n")
    assert r.mixed.choices == (2, 3, 4) and r.attention_bits == 8  # type: ignore[attr-defined]
    assert r.to_dict()["mixed"] == {"budget_bits": 3.0, "choices": [2, 3, 4], "attention_bits": 8}  # type: ignore[attr-defined]
    plain = recipe("gptq", "")
    assert "mixed" not in plain.to_dict()  # type: ignore[attr-defined]
    for method, section, message in (
        ("nf4", "[mixed]\nbudget_bits = 3.0\n", "works on gptq, rtn, awq, awq-gptq recipes"),
        ("gptq", "[mixed]\nchoices = [2, 4]\n", "needs budget_bits"),
        ("gptq", "[mixed]\nbudget_bits = 3.0\nchoices = [2, 5]\n", "cannot store 5-bit"),
        ("gptq", "[mixed]\nbudget_bits = 3.0\nchoices = [4, 4]\n", "different widths"),
        ("gptq", "[mixed]\nbudget_bits = 3.0\nchoices = []\n", "different widths"),
        ("gptq", "[mixed]\nbudget_bits = -1\n", "must be positive"),
        ("gptq", "[mixed]\nbudget_bits = 3.0\nwidth = 2\n", "unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            recipe(method, section)


def test_dynamic_rules_follow_gptqmodel() -> None:
    """First matching rule wins, '-:' leaves the module float, '+:' or no prefix override."""
    entry = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
             "dynamic": {r"-:.*\.gate$": {}, r"+:^model\.layers\.0\..*\.w2$": {"bits": 8},
                         r".*\.experts\.\d+\.w\d$": {"bits": 2}}}  # fmt: skip
    scheme = read_scheme(entry)
    assert scheme.config_for("model.layers.0.block_sparse_moe.gate") is None
    assert scheme.config_for("model.layers.0.block_sparse_moe.experts.1.w2").bits == 8  # type: ignore[union-attr]
    assert scheme.config_for("model.layers.1.block_sparse_moe.experts.1.w2").bits == 2  # type: ignore[union-attr]
    assert scheme.config_for("model.layers.1.self_attn.q_proj").bits == 4  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="cannot store 5-bit"):
        read_scheme({**entry, "dynamic": {".*": {"bits": 5}}})
    with pytest.raises(ConfigError, match="only bits, group_size"):
        read_scheme({**entry, "dynamic": {".*": {"sym": False}}})


MIXED = BASE + """
[mixed]
budget_bits = {budget}
choices = [2, 3, 4, 8]
"""


@pytest.fixture(scope="module", params=["gptq", "awq"])
def mixed_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The small model quantized by a [mixed] recipe on GPTQ, and on AWQ (whose folded norms and router
    are stored beside the codes)."""
    work = tmp_path_factory.mktemp(f"mixed-{request.param}")
    source = save_model(new_model(CFG, seed=7), work / "model")
    (source / "tokenizer.model").write_bytes((DEFAULT_MODEL / "tokenizer.model").read_bytes())
    recipe_file = work / "mixed.toml"
    recipe_file.write_text(MIXED.format(method=request.param, budget=3.0))
    return source, quantize_model(source, load_recipe(recipe_file), work / "out", progress=False)


def expert_bytes(artifact: Path) -> int:
    with CheckpointReader(artifact) as reader:
        return sum(reader.get(n).numel() * reader.get(n).element_size() for n in reader.names
                   if ".experts." in n)  # fmt: skip


def test_mixed_artifact_fits_its_budget_and_says_each_width(mixed_run: tuple[Path, Path]) -> None:
    _, artifact = mixed_run
    cal = json.loads((artifact / "calibration.json").read_text())["mixed"]
    qc = json.loads((artifact / "config.json").read_text())["quantization_config"]
    cfg = CFG
    params = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_experts * cfg.num_hidden_layers
    stored = expert_bytes(artifact)  # what the shards hold, counted here
    assert stored == cal["stored_bytes"] <= cal["budget_bytes"] == int(3.0 * params / 8)
    assert stored >= 0.99 * cal["budget_bytes"]
    widths = {n: m["bits"] for n, m in cal["modules"].items()}
    assert len(widths) == params // (cfg.hidden_size * cfg.intermediate_size) and len(set(widths.values())) > 1
    # every module that differs from the entry's bits has its own exact rule, and no other does
    scheme = read_scheme(qc)
    for name, bits in widths.items():
        assert scheme.config_for(name).bits == bits  # type: ignore[union-attr]
    assert len(qc["dynamic"]) == sum(b != qc["bits"] for b in widths.values())
    # the stored codes have that width: qweight rows are in_features * bits / 32
    with CheckpointReader(artifact) as reader:
        for name, bits in widths.items():
            in_features = cfg.intermediate_size if name.endswith("w2") else cfg.hidden_size
            assert reader.get(f"{name}.qweight").shape[0] == in_features * bits // 32, name
    # the allocation is the cheapest under the budget among the measured choices, per its own record
    for name, module in cal["modules"].items():
        assert module["predicted_cost"] == cal["costs"][name][str(module["bits"])]
        assert module["measured_cost"] >= 0


def test_mixed_artifact_loads_with_each_linear_at_its_width(mixed_run: tuple[Path, Path]) -> None:
    """load_model's linears are each linear's codes dequantized at the width its qweight shape says, and its
    logits those of the float model with those weights put in (and the artifact's float tensors: AWQ's
    folded norms and router)."""
    source, artifact = mixed_run
    model = load_model(artifact)
    reference = load_model(source)
    widths = set()
    with CheckpointReader(artifact) as reader:
        floats = reference.state_dict()
        for name in reader.names:
            if name in floats:
                floats[name].copy_(reader.get(name))
        for name, module in model.named_modules():
            if not isinstance(module, DequantLinear):
                continue
            tensors = {s: reader.get(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
            bits = tensors["qweight"].shape[0] * 32 // module.in_features
            widths.add(bits)
            weight = dequantize_checkpoint(tensors, bits)
            assert torch.equal(module.weight_float(), weight), name
            reference.get_submodule(name).weight.data.copy_(weight)
    assert len(widths) > 1
    quantized = sum(isinstance(m, DequantLinear) for m in model.modules())
    assert quantized == CFG.num_hidden_layers * (4 + 3 * CFG.num_experts)
    ids = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_mixed_artifact_exports_to_onnx_with_its_codes(mixed_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Each layer's experts become one QMoE at the widest width among them (4, or 8 when one expert has
    8 bits), narrower codes widened exactly; onnxruntime's logits follow our loaded model's within the
    error of QMoE's int8 activations where a layer runs 8-bit blocks (4.4e-3 in tests/test_export_onnx.py),
    else to 1e-4."""
    import numpy as np

    from mixtral_quant.export.mixtral import export_onnx
    from mixtral_quant.export.ort_runner import OnnxDecoder

    _, artifact = mixed_run
    out = export_onnx(artifact, tmp_path / "onnx", progress=False)
    info = json.loads((out / "export.json").read_text())
    cal = json.loads((artifact / "calibration.json").read_text())["mixed"]["modules"]
    for layer in range(CFG.num_hidden_layers):
        bits = {m["bits"] for n, m in cal.items() if n.startswith(f"model.layers.{layer}.")}
        wide = 8 if max(bits) > 4 else 4
        notes = info["layers"][layer]["experts"]
        assert f"QMoE {wide}-bit block 32" in notes, notes
        narrower = sorted(bits - {wide})
        if narrower:
            assert f"{'/'.join(map(str, narrower))}-bit codes widened to {wide} bits exactly" in notes, notes
    model = load_model(artifact)
    ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    decoder = OnnxDecoder(out)
    got, _ = decoder.step(ids.numpy(), np.ones_like(ids.numpy()), decoder.empty_past(1))
    with torch.no_grad():
        want = model(ids).logits.numpy()
    eight = any(m["bits"] == 8 for m in cal.values())  # 3.2e-6 measured with 2-, 3- and 4-bit experts only
    assert np.abs(got - want).max() < (2e-2 if eight else 1e-4), np.abs(got - want).max()


def test_dynamic_keys_are_exact_names() -> None:
    from mixtral_quant.quant import QuantConfig
    from mixtral_quant.quant.scheme import dynamic_entry

    base = QuantConfig.of("gptq", bits=4, group_size=32)
    d = dynamic_entry(base, {"model.layers.1.block_sparse_moe.experts.1.w2": 2, "model.layers.0.x": 4})
    assert list(d) == [r"+:^model\.layers\.1\.block_sparse_moe\.experts\.1\.w2$"]
    pattern = next(iter(d))[2:]
    assert re.match(pattern, "model.layers.1.block_sparse_moe.experts.1.w2")
    assert not re.match(pattern, "model.layers.1.block_sparse_moe.experts.11.w2")


def test_inspect_shows_each_experts_widths(mixed_run: tuple[Path, Path]) -> None:
    from mixtral_quant.inventory import format_inventory, inventory

    _, artifact = mixed_run
    inv = inventory(artifact)
    cal = json.loads((artifact / "calibration.json").read_text())["mixed"]["modules"]
    for (i, e), bits in inv.expert_widths.items():
        prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}"
        assert bits == tuple(cal[f"{prefix}.{w}"]["bits"] for w in ("w1", "w3", "w2"))
    text = format_inventory(inv)
    assert "mixed precision" in text and "bits per expert linear (w1/w3/w2), share of the router's" in text
    counts = json.loads((artifact / "calibration.json").read_text())["tokens_per_expert"][1]
    row = next(line for line in text.splitlines() if line.startswith("1 "))
    want = [["/".join(map(str, inv.expert_widths[(1, e)])), f"{100 * counts[e] / sum(counts):.1f}%"]
            for e in range(CFG.num_experts)]  # fmt: skip
    assert row.split()[1:] == [x for pair in want for x in pair]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_is_the_undominated_points(seed: int) -> None:
    from mixtral_quant.eval.report import pareto_front

    rng = random.Random(seed)
    points = [(rng.random() * 8, rng.random() * 100) for _ in range(rng.randrange(1, 15))]
    undominated = [i for i, (x, y) in enumerate(points)
                   if not any(j != i and a <= x and b <= y for j, (a, b) in enumerate(points))]  # fmt: skip
    assert pareto_front(points) == sorted(undominated, key=lambda i: points[i][0])


def test_html_plot_marks_mixed_models_and_the_front() -> None:
    from dataclasses import replace as copy_with

    from test_eval_report import synthetic_report

    from mixtral_quant.eval.report import html_page, ppl_vs_bits_svg

    report = synthetic_report()
    mixed_model = copy_with(report.variants[0], quantization={"quant_method": "gptq", "bits": 4,
                                                              "dynamic": {"+:^x$": {"bits": 2}}})  # fmt: skip
    report = copy_with(report, variants=[mixed_model, *report.variants[1:]])
    plot = ppl_vs_bits_svg(report)
    assert plot.count('<circle') == len(report.models)
    assert plot.count('fill="#e15759"') == 1  # the one mixed model
    assert 'class="pareto"' in plot and plot in html_page(report)


def test_mixed_artifact_exports_to_gguf_q4_0_with_its_codes(mixed_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Symmetric 2/3/4-bit experts in groups of 32 are Q4_0 exactly (narrower codes widened); gguf-py's
    dequantized experts equal each linear's own dequantized weight."""
    from mixtral_quant.export.gguf import GGUFOptions, GGUFType, export_gguf
    from mixtral_quant.export.gguf_read import gguf_weights

    _, artifact = mixed_run
    cal = json.loads((artifact / "calibration.json").read_text())["mixed"]["modules"]
    if any(m["bits"] == 8 for m in cal.values()):
        pytest.fail("the test's budget gave an expert 8 bits: Q4_0 cannot hold it exactly; lower the budget")
    result = export_gguf(artifact, tmp_path / "m.gguf", GGUFOptions(GGUFType.Q4_0), progress=False)
    assert result.record["mappings"]["experts"] == ["Q4_0 (exact)"]
    theirs = gguf_weights(result.path, CFG)
    with CheckpointReader(artifact) as reader:
        for name, module in cal.items():
            tensors = {s: reader.get(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
            want = dequantize_checkpoint(tensors, module["bits"]).numpy()
            assert np.array_equal(theirs[f"{name}.weight"], want), name


def test_mixed_run_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """The widths are part of the commit point: a run stopped after its first layer and resumed (no
    second measuring pass) ends with the bytes of an uninterrupted one."""
    from mixtral_quant.errors import MixtralQuantError

    source = save_model(new_model(CFG, seed=5), tmp_path / "model")
    (source / "tokenizer.model").write_bytes((DEFAULT_MODEL / "tokenizer.model").read_bytes())
    recipe_file = tmp_path / "mixed.toml"
    recipe_file.write_text(MIXED.format(method="rtn", budget=3.0))
    recipe = load_recipe(recipe_file)
    whole = quantize_model(source, recipe, tmp_path / "whole", progress=False)
    with pytest.raises(MixtralQuantError, match="stopped after layer 1"):
        quantize_model(source, recipe, tmp_path / "resumed", progress=False, stop_after=1)
    state = json.loads((tmp_path / "resumed.partial" / "state.json").read_text())
    assert state["layers_done"] == 1 and state["mixed"]["widths"]
    resumed = quantize_model(source, recipe, tmp_path / "resumed", progress=False, resume=True)
    for f in sorted(whole.iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name not in ("run_log.json", "manifest.json"):
            assert f.read_bytes() == (resumed / f.name).read_bytes(), f.name


def test_a_budget_below_the_narrowest_width_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """2-bit codes in groups of 32 store 2.56+ bits per parameter with their scales, zeros and g_idx."""
    source = save_model(new_model(CFG, seed=5), tmp_path / "model")
    (source / "tokenizer.model").write_bytes((DEFAULT_MODEL / "tokenizer.model").read_bytes())
    recipe_file = tmp_path / "mixed.toml"
    recipe_file.write_text(MIXED.format(method="gptq", budget=2.5))
    with pytest.raises(ConfigError, match=r"budget_bits 2.5 is below what 2-bit experts store \(2\.\d+ bits"):
        quantize_model(source, load_recipe(recipe_file), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.toml", "model"]


def test_stored_bytes_formula_is_what_quantize_stores(mixed_run: tuple[Path, Path]) -> None:
    from mixtral_quant.quant import QuantConfig
    from mixtral_quant.quant.gptq_method import GPTQLayout

    _, artifact = mixed_run
    cal = json.loads((artifact / "calibration.json").read_text())["mixed"]
    assert len(cal["bytes"]) == len(cal["modules"])
    for name, by_width in cal["bytes"].items():
        in_f, out_f = (CFG.intermediate_size, CFG.hidden_size) if name.endswith("w2") else (CFG.hidden_size,
                                                                                             CFG.intermediate_size)
        for bits, nbytes in by_width.items():
            config = QuantConfig.of("gptq", bits=int(bits), group_size=32)
            assert GPTQLayout.stored_bytes(config, in_f, out_f) == nbytes, (name, bits)
