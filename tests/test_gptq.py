"""GPTQ maths and the GPTQ/RTN methods on a small linear layer (64 out, 256 in)."""

from __future__ import annotations

import pytest
import torch

from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.quant import HessianAccumulator, MethodName, QuantConfig, get_method
from mixtral_quant.quant.gptq import (
    HessianNotPositiveDefinite,
    dequantize_gptq,
    gptq_quantize,
    rtn_quantize,
)
from mixtral_quant.quant.packing import unpack_qweight, unpack_qzeros

OUT, IN, TOKENS = 64, 256, 512


def _cfg(**kw: object) -> QuantConfig:
    return QuantConfig.of(MethodName.GPTQ, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight [OUT, IN], correlated inputs X [TOKENS, IN] with uneven channel scales, Hessian."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT, IN, generator=g) * 0.05
    mix = torch.randn(IN, IN, generator=g) / IN**0.5 + torch.eye(IN)
    x = torch.randn(TOKENS, IN, generator=g) @ mix * torch.linspace(0.2, 3.0, IN)
    acc = HessianAccumulator(IN)
    acc.add(x)
    return weight, x, acc.hessian


def _output_error(x: torch.Tensor, weight: torch.Tensor, deq: torch.Tensor) -> float:
    return float(((x @ weight.t() - x @ deq.t()) ** 2).sum())


def test_hessian_is_two_over_n_xtx_over_all_batches() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, IN, generator=g)
    acc = HessianAccumulator(IN)
    acc.add(x[:100].reshape(4, 25, IN))  # [batch, seq, in] is flattened to tokens
    acc.add(x[100:101])
    acc.add(x[101:101])  # no tokens: no change
    acc.add(x[101:].to(torch.bfloat16))  # any float dtype, accumulated in float32
    assert acc.count == 300 and acc.hessian.dtype == torch.float32
    x_seen = torch.cat([x[:101], x[101:].to(torch.bfloat16).float()]).double()
    expected = 2.0 / 300 * x_seen.t() @ x_seen
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)


def test_hessian_rejects_wrong_width() -> None:
    with pytest.raises(MixtralQuantError, match="expected 256"):
        HessianAccumulator(IN).add(torch.zeros(3, 128))


@pytest.mark.parametrize(
    "kw",
    [
        {"sym": True, "static_groups": True},
        {"sym": False, "static_groups": False},
        {"sym": True, "static_groups": True, "act_order": True},
        {"bits": 3, "group_size": -1, "static_groups": False},
    ],
)
def test_gptq_with_identity_hessian_is_rtn(layer: tuple[torch.Tensor, ...], kw: dict[str, object]) -> None:
    weight = layer[0]
    cfg = _cfg(**kw)
    gq, rq = gptq_quantize(weight, torch.eye(IN) * 3.0, cfg), rtn_quantize(weight, cfg)
    for a, b in zip(gq[:4], rq[:4], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output(layer: tuple[torch.Tensor, ...], bits: int, act_order: bool) -> None:
    weight, x, hessian = layer
    cfg = _cfg(bits=bits, act_order=act_order)
    gptq = get_method(cfg).quantize(weight, hessian)
    rtn = get_method(QuantConfig.of(MethodName.RTN, bits=bits)).quantize(weight)
    gptq_err = _output_error(x, weight, get_method(cfg).dequantize(gptq.tensors))
    rtn_err = _output_error(x, weight, get_method(cfg).dequantize(rtn.tensors))
    assert gptq.info["method"] == "gptq"
    assert gptq_err < 0.8 * rtn_err


def test_act_order_with_static_groups_keeps_g_idx_in_order(layer: tuple[torch.Tensor, ...]) -> None:
    weight, _, hessian = layer
    qw = gptq_quantize(weight, hessian, _cfg(act_order=True, static_groups=True, group_size=64))
    assert torch.equal(qw.g_idx, torch.arange(IN, dtype=torch.int32) // 64)


def test_act_order_with_dynamic_groups_follows_the_permutation(layer: tuple[torch.Tensor, ...]) -> None:
    weight, _, hessian = layer
    qw = gptq_quantize(weight, hessian, _cfg(act_order=True, static_groups=False, group_size=64))
    perm = torch.argsort(hessian.diagonal(), descending=True)
    assert torch.equal(qw.g_idx[perm].long(), torch.arange(IN) // 64)  # sweep order fills groups in turn
    assert torch.bincount(qw.g_idx.long()).tolist() == [64] * 4


@pytest.mark.parametrize(
    "kw",
    [
        {"bits": 4},
        {"bits": 3, "sym": False},
        {"bits": 2, "group_size": 32, "act_order": True, "static_groups": False},
        {"bits": 8, "group_size": -1, "sym": False, "act_order": True},
    ],
)
def test_stored_tensors_are_exactly_the_quantized_weight(
    layer: tuple[torch.Tensor, ...], kw: dict[str, object]
) -> None:
    weight, _, hessian = layer
    cfg = _cfg(**kw)
    qw = gptq_quantize(weight, hessian, cfg)
    stored = get_method(cfg).quantize(weight, hessian).tensors
    # the REFERENCE.md formula, written out: W[o, i] = scales[g, o] * (q[i, o] - (qzeros_v1[g, o] + 1))
    q = unpack_qweight(stored["qweight"], cfg.bits).float()
    z = unpack_qzeros(stored["qzeros"], cfg.bits).float()
    g = stored["g_idx"].long()
    by_formula = (stored["scales"].float()[g] * (q - (z[g] + 1))).t()
    direct = dequantize_gptq(qw.qint, qw.scales, qw.zeros, qw.g_idx)
    assert torch.equal(by_formula, direct)
    assert torch.equal(get_method(cfg).dequantize(stored), direct)


def _indefinite_hessian(min_eigenvalue: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(IN, IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    eig = torch.ones(IN, dtype=torch.float64)
    eig[0] = min_eigenvalue
    return (q @ torch.diag(eig) @ q.t()).float()


def test_indefinite_hessian_raises_damping_and_records_it(layer: tuple[torch.Tensor, ...]) -> None:
    qw = gptq_quantize(layer[0], _indefinite_hessian(-0.5), _cfg())
    assert qw.info["damp_retries"] == 2  # 0.01 and 0.1 of the mean diagonal fail, 1.0 succeeds
    assert qw.info["damp_percent"] == pytest.approx(1.0)


def test_hessian_beyond_damping_raises_or_falls_back(layer: tuple[torch.Tensor, ...]) -> None:
    weight, hessian = layer[0], _indefinite_hessian(-1e4)
    with pytest.raises(HessianNotPositiveDefinite, match="not positive definite"):
        gptq_quantize(weight, hessian, _cfg())
    result = get_method(_cfg()).quantize(weight, hessian)
    assert result.info["method"] == "rtn"
    assert "not positive definite" in str(result.info["fallback"])
    with pytest.raises(HessianNotPositiveDefinite):
        gptq_quantize(weight, _indefinite_hessian(-0.5), _cfg(damp_auto_increase=False))


def test_missing_or_empty_hessian_falls_back_to_rtn(layer: tuple[torch.Tensor, ...]) -> None:
    weight = layer[0]
    rtn = get_method(QuantConfig.of(MethodName.RTN)).quantize(weight).tensors
    for hessian in (None, torch.zeros(IN, IN)):
        result = get_method(_cfg()).quantize(weight, hessian)
        assert "fallback" in result.info
        assert all(torch.equal(result.tensors[k], rtn[k]) for k in rtn)


def test_dead_columns_are_zeroed(layer: tuple[torch.Tensor, ...]) -> None:
    weight, x, _ = layer
    x = x.clone()
    x[:, [5, 77]] = 0
    acc = HessianAccumulator(IN)
    acc.add(x)
    before, weight_before = acc.hessian.clone(), weight.clone()
    qw = gptq_quantize(weight, acc.hessian, _cfg(act_order=True))
    assert torch.equal(acc.hessian, before)  # the fix of the dead diagonal is undone
    assert torch.equal(weight, weight_before)  # the weight given is read, never zeroed in place
    assert qw.info["dead_columns"] == 2
    deq = dequantize_gptq(qw.qint, qw.scales, qw.zeros, qw.g_idx)
    assert torch.equal(deq[:, [5, 77]], torch.zeros(OUT, 2))


def test_sym_and_asym_grids(layer: tuple[torch.Tensor, ...]) -> None:
    weight, x, hessian = layer
    shifted = weight + 0.04  # mostly positive groups: an asymmetric grid fits them better
    sym = gptq_quantize(shifted, hessian, _cfg(sym=True))
    asym = gptq_quantize(shifted, hessian, _cfg(sym=False))
    assert torch.equal(sym.zeros, torch.full_like(sym.zeros, 8))
    assert asym.zeros.min() >= 1 and asym.zeros.max() <= 15  # zero - 1 is storable in gptq v1
    assert len(asym.zeros.unique()) > 1
    deq = {name: dequantize_gptq(q.qint, q.scales, q.zeros, q.g_idx) for name, q in (("s", sym), ("a", asym))}
    assert _output_error(x, shifted, deq["a"]) < _output_error(x, shifted, deq["s"])


def test_asym_all_positive_group_keeps_its_range() -> None:
    weight = torch.linspace(0.0, 1.0, 32).repeat(32, 1)  # every group's minimum is 0
    qw = rtn_quantize(weight, QuantConfig.of(MethodName.RTN, bits=4, group_size=32, sym=False))
    assert torch.equal(qw.zeros, torch.ones_like(qw.zeros))
    deq = dequantize_gptq(qw.qint, qw.scales, qw.zeros, qw.g_idx)
    assert (deq - weight).abs().max() <= qw.scales.max() / 2 + 1e-6


@pytest.mark.parametrize(("bits", "group_size"), [(2, 32), (3, 128), (4, 128), (4, -1), (8, 64)])
def test_stored_shapes_and_dtypes(layer: tuple[torch.Tensor, ...], bits: int, group_size: int) -> None:
    weight, _, hessian = layer
    method = get_method(_cfg(bits=bits, group_size=group_size))
    tensors = method.quantize(weight.to(torch.bfloat16), hessian).tensors
    groups = 1 if group_size == -1 else IN // group_size
    expected = {
        "qweight": (torch.int32, (IN * bits // 32, OUT)),
        "qzeros": (torch.int32, (groups, OUT * bits // 32)),
        "scales": (torch.float16, (groups, OUT)),
        "g_idx": (torch.int32, (IN,)),
    }
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == expected
    assert sorted(method.tensor_names()) == sorted(expected)


@pytest.mark.parametrize("bits", [3, 4])
def test_module_runs_the_stored_weight(layer: tuple[torch.Tensor, ...], bits: int) -> None:
    """The runtime module computes with the stored weight (3-bit codes repacked whole in memory, 10 per
    word) and gives back the stored bytes: state_dict() equals the quantizer's tensors exactly."""
    weight, x, hessian = layer
    method = get_method(_cfg(bits=bits))
    tensors = method.quantize(weight, hessian).tensors
    module = method.make_module(tensors, IN, OUT)
    state = module.state_dict()
    assert sorted(state) == sorted(tensors) and all(torch.equal(state[k], tensors[k]) for k in tensors)
    assert torch.equal(module.weight_float(), method.dequantize(tensors))
    torch.testing.assert_close(module(x[:8]), x[:8] @ method.dequantize(tensors).t())
    assert module(x[:2].to(torch.bfloat16)).dtype == torch.bfloat16


def test_gptq_quantization_config() -> None:
    cfg = get_method(_cfg(bits=4, act_order=True)).quantization_config()
    assert cfg["quant_method"] == "gptq" and cfg["format"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"]) == (4, 128, True, True)
    assert cfg["pack_dtype"] == "int32" and cfg["static_groups"] is True


@pytest.mark.parametrize("kw", [{}, {"act_order": True}, {"act_order": True, "static_groups": True},
                                {"sym": False, "bits": 3}])  # fmt: skip
def test_stacked_linears_get_the_codes_of_one_by_one(layer: tuple[torch.Tensor, ...], kw: dict[str, object]) -> None:
    """Linears sharing one input (q/k/v: rows of different counts) quantized as one stacked matrix:
    codes, grid and g_idx equal to quantizing each alone, and so do the stored tensors."""
    from mixtral_quant.quant.gptq import gptq_quantize_stacked

    weight, _, h = layer
    g = torch.Generator().manual_seed(5)
    parts = [weight, torch.randn(32, IN, generator=g) * 0.05, torch.randn(96, IN, generator=g).to(torch.bfloat16)]
    cfg = _cfg(**kw)
    alone = [gptq_quantize(w, h, cfg) for w in parts]
    stacked = gptq_quantize_stacked(parts, h, cfg)
    for a, b in zip(alone, stacked, strict=True):
        assert a.qint.shape == b.qint.shape
        for field in ("qint", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        loss_a, loss_b = a.info.pop("gptq_loss"), b.info.pop("gptq_loss")
        assert a.info == b.info and loss_a == pytest.approx(loss_b, rel=1e-6)  # a float sum's last bits
    method = get_method(cfg)
    one = [method.quantize(w.float(), h) for w in parts]
    for r, s in zip(one, method.quantize_stacked(parts, h), strict=True):  # type: ignore[attr-defined]
        assert r.tensors.keys() == s.tensors.keys() and all(torch.equal(r.tensors[k], s.tensors[k]) for k in r.tensors)


@pytest.mark.parametrize("permuted", [False, True])
def test_inverse_cholesky_factor_equals_the_references(layer: tuple[torch.Tensor, ...], permuted: bool) -> None:
    """The upper factor from one Cholesky of the reversed (and permuted) Hessian and a triangular
    inverse by halves, read in bands, equals the reference's (Cholesky, cholesky_inverse, upper
    Cholesky of the permuted Hessian) in float64; the inverse by halves equals torch's on an odd size
    with small leaves, and the Hessian given is left as it was."""
    from mixtral_quant.quant.gptq import _damped_inverse_cholesky, invert_lower_

    _, _, h = layer
    h64 = h.double()
    before = h64.clone()
    perm = torch.randperm(IN, generator=torch.Generator().manual_seed(5)) if permuted else torch.arange(IN)
    factor, damp, _ = _damped_inverse_cholesky(h64, perm, _cfg())
    assert torch.equal(h64, before)
    upper = torch.cat([torch.cat([torch.zeros(b, i, dtype=torch.float64), factor.rows(i, i + b)], dim=1)
                       for i, b in ((0, 7), (7, IN - 7))])  # two bands, one of a size that is no block
    hp = h64[perm][:, perm]
    damped = hp + damp * h64.diagonal().mean() * torch.eye(IN, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
    g = torch.Generator().manual_seed(3)
    lower = torch.randn(301, 301, generator=g, dtype=torch.float64).tril() + 20 * torch.eye(301, dtype=torch.float64)
    inverse = lower.t().contiguous().t()  # column-major, as the sweep's buffer
    invert_lower_(inverse, leaf=16)
    assert torch.allclose(inverse, torch.linalg.inv(lower), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_dynamic_groups_sorted_once_at_load(layer: tuple[torch.Tensor, ...], bits: int) -> None:
    """An act-order weight with dynamic groups (g_idx not i // size): the module sorts its inputs by
    group once, at load (its runtime codes are the stored codes in group order: no per-call gather of
    the grid), with the same outputs and dequantized weight as the stored tensors, and state_dict()
    gives back the stored bytes exactly."""
    from mixtral_quant.quant.gptq import trivial_group_size
    from mixtral_quant.quant.modules import DequantLinear
    from mixtral_quant.quant.packing import unpack_qweight, unpack_runtime

    weight, x, hessian = layer
    method = get_method(_cfg(bits=bits, group_size=64, act_order=True, static_groups=False))
    tensors = method.quantize(weight, hessian).tensors
    assert trivial_group_size(tensors["g_idx"], IN // 64) is None
    module = method.make_module(tensors, IN, OUT)
    assert isinstance(module, DequantLinear)
    order = module.input_order
    assert order is not None and torch.equal(order, torch.argsort(tensors["g_idx"].long(), stable=True))
    assert trivial_group_size(tensors["g_idx"][order], IN // 64) == 64
    runtime = unpack_runtime(module.get_buffer("codes"), bits, IN)
    assert torch.equal(runtime, unpack_qweight(tensors["qweight"], bits)[order])
    state = module.state_dict()
    assert sorted(state) == sorted(tensors) and all(torch.equal(state[k], tensors[k]) for k in tensors)
    deq = method.dequantize(tensors)
    assert torch.equal(module.weight_float(), deq)
    torch.testing.assert_close(module(x[:8]), x[:8] @ deq.t())
    static = get_method(_cfg(bits=bits, group_size=64, act_order=True, static_groups=True))
    assert static.make_module(static.quantize(weight, hessian).tensors, IN, OUT).input_order is None


@pytest.mark.parametrize("bits", [3, 4])
def test_round_to_nearest_in_bands_equals_the_whole_matrix(bits: int) -> None:
    """RTN straight into the stored tensors, a band of rows at a time from the bf16 weight (two full
    bands and a short one), gives the bytes of the whole float32 matrix at once, and a band read back
    equals those rows of the whole dequantized weight."""
    from mixtral_quant.quant.base import ROW_BAND as BAND
    from mixtral_quant.quant.gptq_method import dequantize_rows, rtn_checkpoint, to_checkpoint

    out_features = 2 * BAND + 96
    g = torch.Generator().manual_seed(11)
    weight = (torch.randn(out_features, 256, generator=g) * 0.05).to(torch.bfloat16)
    cfg = QuantConfig.of(MethodName.RTN, bits=bits, group_size=128)
    banded, _ = rtn_checkpoint(weight, cfg)
    whole = to_checkpoint(rtn_quantize(weight.float(), cfg), bits)
    assert banded.keys() == whole.keys()
    for name in whole:
        assert banded[name].dtype == whole[name].dtype and torch.equal(banded[name], whole[name]), name
    deq = get_method(cfg).dequantize(whole)
    for start, stop in ((0, 32), (BAND - 32, 2 * BAND + 96)):
        assert torch.equal(dequantize_rows(whole, bits, start, stop), deq[start:stop])
