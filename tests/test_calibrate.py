"""Every shipped recipe on the embedded tiny Mixtral: quantized by dtype, close to fp16, GPTQ beats RTN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral_quant.cache import attention_context
from mixtral_quant.checkpoint import DEFAULT_MODEL, CheckpointReader
from mixtral_quant.loading import load_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import load_recipe, shipped_recipes
from mixtral_quant.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Mean KL(fp16 || variant) per token on held-out text, measured on the tiny model with margin.
KL_BOUND = {4: 0.05, 3: 0.15, 8: 0.005}
FLOAT = {torch.float32, torch.float16, torch.bfloat16}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name in shipped_recipes():
        out[name] = quantize_model(DEFAULT_MODEL, load_recipe(name, samples=16, seq_len=256), root / name,
                                   progress=False)
    return out


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    text = (ROOT / "calibration" / "corpora" / "wiki-test.txt").read_text()[:20000]
    ids = Tokenizer(DEFAULT_MODEL).encode(text)
    return torch.tensor(ids[: 4 * 256]).view(4, 256)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return load_model(DEFAULT_MODEL)


def test_every_recipe_quantizes_experts_and_attention_by_dtype(artifacts):
    base_names = CheckpointReader(DEFAULT_MODEL).names
    linears = [n.removesuffix(".weight") for n in base_names if (".experts." in n or ".self_attn." in n)]
    for name, folder in artifacts.items():
        with CheckpointReader(folder) as r:
            for prefix in linears:
                stored = [n for n in r.names if n.startswith(prefix + ".")]
                assert stored, f"{name}: {prefix} missing"
                big = max(stored, key=lambda n: r.nbytes(n))
                assert r.dtype(big) in ("I32", "U8", "I8"), f"{name}: {big} is {r.dtype(big)}"
            for n in r.names:  # router, embeddings, norms stay 16-bit
                if ".block_sparse_moe.gate." in n or "embed_tokens" in n or "norm" in n or n == "lm_head.weight":
                    assert r.dtype(n) == "BF16", f"{name}: {n} is {r.dtype(n)}"


@torch.no_grad()
def test_every_recipe_loads_and_stays_close_to_fp16(artifacts, base, heldout):
    ref = F.log_softmax(base(heldout).logits, dim=-1)
    for name, folder in artifacts.items():
        model = load_model(folder)
        quantized = [m for n, m in model.named_modules() if n.endswith(".w1") or n.endswith("q_proj")]
        assert all(type(m) is not torch.nn.Linear for m in quantized), name
        logp = F.log_softmax(model(heldout).logits, dim=-1)
        kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        bits = load_recipe(name).quant.bits
        assert kl < KL_BOUND[bits], f"{name}: KL {kl:.4f} >= {KL_BOUND[bits]}"
        assert kl > 0, f"{name}: quantization changed nothing"


@torch.no_grad()
def layer_output_error(folder: Path, base: torch.nn.Module, ids: torch.Tensor) -> float:
    """Sum over layers of ||L_q(x) - L(x)||^2 / ||L(x) - x||^2, x the fp model's input to each layer."""
    model = load_model(folder)
    cfg = base.cfg
    ctx = attention_context(cfg, ids.shape[0], ids.shape[1], None, 0, torch.float32, ids.device)
    x = base.model.embed_tokens(ids)
    total = 0.0
    for fp_layer, q_layer in zip(base.model.layers, model.model.layers, strict=True):
        y, _ = fp_layer(x, ctx)
        yq, _ = q_layer(x, ctx)
        total += ((yq - y).pow(2).sum() / (y - x).pow(2).sum()).item()
        x = y
    return total


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_layer_error_below_round_to_nearest(artifacts, base, heldout, bits):
    gptq = layer_output_error(artifacts[f"gptq-w{bits}g128"], base, heldout)
    rtn = layer_output_error(artifacts[f"rtn-w{bits}g128"], base, heldout)
    assert gptq < rtn, f"{bits}-bit: GPTQ {gptq:.4g} vs RTN {rtn:.4g}"


def test_dense_mistral_goes_through_the_same_pipeline(tmp_path):
    import shutil
    from dataclasses import replace

    from conftest import SMALL_MISTRAL, save_model

    from mixtral_quant.loading import new_model

    cfg = replace(SMALL_MISTRAL, vocab_size=32000, hidden_size=128, intermediate_size=256, initializer_range=0.02)
    src = save_model(new_model(cfg, seed=11), tmp_path / "mistral")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", src / "tokenizer.model")
    art = quantize_model(src, load_recipe("gptq-w4g128", samples=4, seq_len=64), tmp_path / "q", progress=False)
    with CheckpointReader(art) as r:
        for i in range(cfg.num_hidden_layers):
            for p in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"):
                assert r.dtype(f"model.layers.{i}.{p}.qweight") == "I32"
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        ref, out = load_model(src)(ids).logits, load_model(art)(ids).logits
    # random weights at 4 bits: the logit error is about a fifth of the logits' spread (RTN's is the same)
    assert 0 < (out - ref).std() < 0.3 * ref.std()


def test_layer_kept_in_its_stored_dtype_quantizes_to_the_same_bytes():
    """quantize keeps a bf16 layer's linears in bf16 (half the resident bytes of a float32 copy);
    widening is exact, so the layer's output and GPTQ's tensors equal those of the float32 layer."""
    from mixtral_quant.calibrate import LayerQuantizer
    from mixtral_quant.checkpoint import load_config
    from mixtral_quant.loading import StoredLinear, load_layer

    cfg = load_config(DEFAULT_MODEL)
    recipe = load_recipe("gptq-w4g128", samples=4, seq_len=64)
    with CheckpointReader(DEFAULT_MODEL) as reader:
        wide = load_layer(reader, cfg, 1)
        narrow = load_layer(reader, cfg, 1, keep_linears_stored=True)
        assert reader.dtype("model.layers.1.block_sparse_moe.experts.0.w2.weight") == "BF16"
    stored = [m for m in narrow.modules() if isinstance(m, StoredLinear)]
    assert cfg.moe is not None
    assert len(stored) == 4 + 1 + 3 * cfg.moe.num_local_experts  # attention, router, experts
    assert all(m.weight.dtype == torch.bfloat16 for m in stored)
    assert narrow.input_layernorm.weight.dtype == torch.float32
    wide_bytes = sum(p.numel() * p.element_size() for p in wide.parameters())
    narrow_bytes = sum(p.numel() * p.element_size() for p in narrow.parameters())
    assert narrow_bytes < 0.51 * wide_bytes
    h = torch.randn(4, 64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    ctx = attention_context(cfg, 4, 64, None, 0, torch.float32, torch.device("cpu"))
    assert torch.equal(wide(h, ctx)[0], narrow(h, ctx)[0])
    cpu = torch.device("cpu")
    qa, qb = LayerQuantizer(wide, cfg, recipe, cpu), LayerQuantizer(narrow, cfg, recipe, cpu)
    out_a, out_b = qa.run(h), qb.run(h)
    assert torch.equal(out_a, out_b)
    assert qa.tensors.keys() == qb.tensors.keys()
    assert all(torch.equal(qa.tensors[k], qb.tensors[k]) for k in qa.tensors)


def test_expert_hessians_captured_in_budgeted_groups_give_the_same_bytes(monkeypatch):
    """A Hessian budget of one expert per pass (what bounds memory at Mixtral-8x7B's shapes) changes
    how many passes run, not one byte of the result."""
    from mixtral_quant.calibrate import LayerQuantizer
    from mixtral_quant.checkpoint import load_config
    from mixtral_quant.loading import load_layer

    cfg = load_config(DEFAULT_MODEL)
    recipe = load_recipe("gptq-w4g128-noact", samples=4, seq_len=64)
    h = torch.randn(4, 64, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    runs = {}
    for budget in (1, 1 << 40):
        with CheckpointReader(DEFAULT_MODEL) as reader:
            layer = load_layer(reader, cfg, 2, keep_linears_stored=True)
        lq = LayerQuantizer(layer, cfg, recipe, torch.device("cpu"), hessian_budget=budget)
        sizes: list[int] = []

        def counted(h, experts, inputs, capture=lq.inputs.capture_routed, sizes=sizes):
            sizes.append(len(experts))
            return capture(h, experts, inputs)

        monkeypatch.setattr(lq.inputs, "capture_routed", counted)
        runs[budget] = (lq.run(h), lq.tensors, sizes, lq.report.fallbacks)
    (out_a, t_a, sizes_a, fb_a), (out_b, t_b, sizes_b, fb_b) = runs[1], runs[1 << 40]
    routed = 8 - sum(1 for m in fb_a if m.endswith(".w2"))
    assert sizes_a == [1] * (2 * routed)  # one expert per pass for w1 and for w2
    assert sizes_b == [routed, routed]
    assert fb_a == fb_b
    assert torch.equal(out_a, out_b)
    assert t_a.keys() == t_b.keys() and all(torch.equal(t_a[k], t_b[k]) for k in t_a)


@pytest.mark.parametrize("recipe", ["gptq-w4g128", "nf4"])
def test_experts_are_read_one_at_a_time_and_give_the_bytes_of_a_whole_layer(recipe, tmp_path, monkeypatch):
    """quantize reads an expert's float weights just before quantizing it: at no point are two experts'
    float weights in memory (a Mixtral-8x7B layer is then never whole: 2.9 GB in bf16), and the artifact
    has the bytes of a run that loads each layer whole."""
    from torch.nn import Linear

    from mixtral_quant import pipeline
    from mixtral_quant.calibrate import LayerQuantizer
    from mixtral_quant.loading import StoredLinear

    most: list[int] = []
    compute = LayerQuantizer.compute

    def watched(self, names, hessian, fallback=None):
        done = compute(self, names, hessian, fallback)  # read and quantized, not yet replaced
        floats = [n for n, m in self.layer.named_modules() if ".experts." in n and type(m) in (Linear, StoredLinear)
                  and not m.weight.is_meta]  # fmt: skip
        most.append(len({n.rsplit(".", 1)[0] for n in floats}))
        return done

    monkeypatch.setattr(LayerQuantizer, "compute", watched)
    r = load_recipe(recipe, samples=4, seq_len=64)
    lazy = quantize_model(DEFAULT_MODEL, r, tmp_path / "lazy", progress=False)
    assert most and max(most) == 1  # the expert being quantized, nothing more
    monkeypatch.setattr(pipeline, "_is_expert_linear", lambda name: False)
    most.clear()
    whole = quantize_model(DEFAULT_MODEL, r, tmp_path / "whole", progress=False)
    assert max(most) == 8  # every expert was read with its layer
    for shard in sorted(whole.glob("model-*.safetensors")):
        assert (lazy / shard.name).read_bytes() == shard.read_bytes()


def test_routed_inputs_are_what_hooks_on_the_running_moe_see():
    """capture_routed computes each expert's inputs (w1's and w2's) from the router's choice without
    running the other experts: its Hessians equal, bit for bit, those of hooks on the experts while
    the whole MoE block runs over the same chunks, and it runs each expert once per chunk, not all."""
    from mixtral_quant.calibrate import LayerQuantizer
    from mixtral_quant.checkpoint import load_config
    from mixtral_quant.layer_inputs import expert_input
    from mixtral_quant.loading import load_layer
    from mixtral_quant.model import Expert

    cfg = load_config(DEFAULT_MODEL)
    with CheckpointReader(DEFAULT_MODEL) as reader:
        layer = load_layer(reader, cfg, 1, keep_linears_stored=True)
    lq = LayerQuantizer(layer, cfg, load_recipe("gptq-w4g128", samples=4, seq_len=64), torch.device("cpu"), chunk=3)
    h = torch.randn(7, 64, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    moe = layer.block_sparse_moe
    assert moe is not None
    for linear, inputs in (("w1", expert_input), ("w2", Expert.hidden)):
        hooked = lq.inputs.capture(h, {str(e): getattr(x, linear) for e, x in enumerate(moe.experts)}, moe)
        calls: list[int] = []
        handles = [x.w1.register_forward_hook(lambda *_, e=e, c=calls: c.append(e)) for e, x in enumerate(moe.experts)]
        direct = lq.inputs.capture_routed(h, [1, 4], inputs)
        for handle in handles:
            handle.remove()
        assert sorted(direct) == ["1", "4"]
        assert set(calls) == ({1, 4} if linear == "w2" else set())  # only the experts asked for run
        for e in ("1", "4"):
            assert direct[e].count == hooked[e].count > 0
            assert torch.equal(direct[e].hessian, hooked[e].hessian)


@pytest.mark.parametrize("recipe", ["gptq-w4g128", "gptq-w3g128"])
def test_shared_input_linears_stacked_give_the_bytes_of_one_by_one(recipe, tmp_path, monkeypatch):
    """q/k/v and each expert's w1/w3 go through GPTQ as one stacked matrix (one Hessian, one damped
    inverse Cholesky): the shipped recipe's artifact is byte-identical to quantizing them one by one."""
    from mixtral_quant.quant.gptq_method import GPTQ

    r = load_recipe(recipe, samples=4, seq_len=64)
    stacked = quantize_model(DEFAULT_MODEL, r, tmp_path / "stacked", progress=False)
    stacked_fn = GPTQ.quantize_stacked
    monkeypatch.setattr(GPTQ, "quantize_stacked", lambda self, ws, h: [stacked_fn(self, [w], h)[0] for w in ws])
    alone = quantize_model(DEFAULT_MODEL, r, tmp_path / "alone", progress=False)
    files = sorted(p.name for p in stacked.iterdir() if p.suffix == ".safetensors")
    assert files and files == sorted(p.name for p in alone.iterdir() if p.suffix == ".safetensors")
    for name in files:
        assert (stacked / name).read_bytes() == (alone / name).read_bytes(), name
    assert (stacked / "calibration.json").is_file()


@pytest.mark.parametrize("fallback", ["rtn", "all-tokens"])
def test_expert_sources_follow_the_policy(fallback: str) -> None:
    """1000 calibration tokens, top-2 (2000 slots): an expert under 0.5 % of the tokens (5) falls back."""
    from mixtral_quant.calibrate import HessianSource, expert_sources
    from mixtral_quant.recipe import ExpertCalibration, ExpertPolicy, Fallback

    counts = [995, 4, 5, 996]
    fb = Fallback(fallback)
    source, notes = expert_sources(counts, 1000, ExpertCalibration(ExpertPolicy.ROUTED, 0.005, fb), hessians=True)
    routed, every = HessianSource.ROUTED, HessianSource.ALL_TOKENS
    assert source == {0: routed, 1: every if fb is Fallback.ALL_TOKENS else None, 2: routed, 3: routed}
    assert notes[1] == f"{fallback}: 4 of 1000 tokens < 0.50%" and notes[0] is notes[2] is notes[3] is None
    all_tokens, _ = expert_sources(counts, 1000, ExpertCalibration(ExpertPolicy.ALL_TOKENS, 0.005, fb), hessians=True)
    assert set(all_tokens.values()) == {every}
    no_hessian, _ = expert_sources(counts, 1000, ExpertCalibration(ExpertPolicy.ROUTED, 0.005, fb), hessians=False)
    assert set(no_hessian.values()) == {None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_hessian", [False, True])
def test_relative_error_in_bands_is_the_formula(dtype: torch.dtype, with_hessian: bool) -> None:
    """The driver's error, summed over bands of rows from the stored weight and a band reader, equals
    ||X(W-Q)^T||^2 / ||XW^T||^2 (or ||W-Q||^2 / ||W||^2) computed at once in float64; a float32
    weight is read, not changed."""
    from mixtral_quant.calibrate import relative_error
    from mixtral_quant.quant.base import ROW_BAND as ERROR_BAND

    g = torch.Generator().manual_seed(4)
    w = (torch.randn(ERROR_BAND + 64, 96, generator=g) * 0.1).to(dtype)
    q = w.float() + torch.randn(w.shape, generator=g) * 0.01
    x = torch.randn(300, 96, generator=g)
    h = 2 * x.t() @ x / 300 if with_hessian else None
    before = w.clone()
    got = relative_error(w, lambda a, b: q[a:b], h)
    w64, d64 = w.double(), (w.double() - q.double())
    if h is None:
        want = float(d64.square().sum() / w64.square().sum())
    else:
        h64 = h.double()
        want = float(torch.einsum("oi,ij,oj->", d64, h64, d64) / torch.einsum("oi,ij,oj->", w64, h64, w64))
    assert got == pytest.approx(want, rel=1e-5)
    assert torch.equal(w, before)
