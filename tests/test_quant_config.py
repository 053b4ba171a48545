"""QuantConfig validation, shape checks and the method registry."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mixtral_quant.errors import ConfigError, MixtralQuantError
from mixtral_quant.quant import MethodName, QuantConfig, get_method, read_quantization_config, registered


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"method": MethodName.GPTQ, "bits": 5}, "cannot store 5-bit"),
        ({"method": MethodName.NF4, "bits": 8}, "nf4 cannot store 8-bit"),
        ({"method": MethodName.INT8}, "int8 cannot store 4-bit"),
        ({"method": MethodName.GPTQ, "group_size": 100}, "group_size 100"),
        ({"method": MethodName.GPTQ, "group_size": 0}, "group_size 0"),
        ({"method": MethodName.GPTQ, "damp_percent": 0.0}, "damp_percent"),
        ({"method": MethodName.GPTQ, "lazy_block": 0}, "lazy_block"),
        ({"method": MethodName.NF4, "nf4_blocksize": 48}, "nf4_blocksize 48"),
        ({"method": MethodName.NF4, "compute_dtype": torch.int8}, "compute_dtype"),
        ({"method": "smoothquant"}, "unknown method 'smoothquant'"),
    ],
)
def test_bad_settings_are_config_errors(kw: dict[str, object], message: str) -> None:
    method = kw.pop("method")
    with pytest.raises(ConfigError, match=message):
        QuantConfig.of(method, **kw)  # type: ignore[arg-type]


def test_a_method_owns_its_settings() -> None:
    """Each method reads its own settings dataclass: another method's setting is refused by name, the
    flat fields go back and forth, and a config holding another method's settings is refused."""
    from mixtral_quant.quant.gptq import GPTQOptions
    from mixtral_quant.quant.nf4 import NF4Options

    with pytest.raises(ConfigError, match="gptq has no setting nf4_blocksize: its settings are bits, group_size, "
                                          "act_order, damp_auto_increase"):  # fmt: skip
        QuantConfig.of(MethodName.GPTQ, nf4_blocksize=64)
    with pytest.raises(ConfigError, match="w8 has no setting sym"):
        QuantConfig.of(MethodName.W8, bits=8, sym=True)
    with pytest.raises(ConfigError, match="nf4 takes NF4Options settings, not GPTQOptions"):
        QuantConfig(MethodName.NF4, options=GPTQOptions())
    cfg = QuantConfig.of(MethodName.GPTQ, bits=3, act_order=True, damp_percent=0.05)
    assert cfg.options == GPTQOptions(act_order=True, damp_percent=0.05)
    assert QuantConfig.of(cfg.method, **cfg.flat()) == cfg
    assert cfg.with_fields(group_size=32).options == cfg.options and cfg.with_fields(group_size=32).group_size == 32
    assert QuantConfig(MethodName.NF4).options == NF4Options()
    assert set(QuantConfig(MethodName.NF4).flat()) == {"bits", "group_size", "nf4_blocksize", "double_quant",
                                                       "compute_dtype"}  # fmt: skip


def test_method_value_is_accepted_and_native_bits_filled() -> None:
    assert QuantConfig("gptq").method is MethodName.GPTQ  # type: ignore[arg-type]
    assert QuantConfig.for_method(MethodName.W8).bits == 8
    assert QuantConfig.for_method(MethodName.GPTQ, bits=3).bits == 3


@pytest.mark.parametrize(
    ("kw", "shape", "message"),
    [
        ({"group_size": 128}, (64, 4160), "group_size 128 does not divide in_features 4160"),
        ({"bits": 3, "group_size": -1}, (64, 40), "in_features 40 cannot be packed at 3 bits"),
        ({"bits": 3, "group_size": -1}, (40, 64), "out_features 40 cannot be packed at 3 bits"),
        ({"bits": 4, "group_size": -1}, (12, 64), "out_features 12 cannot be packed at 4 bits"),
    ],
)
def test_validate_shape_names_the_sizes(kw: dict[str, object], shape: tuple[int, int], message: str) -> None:
    cfg = QuantConfig.of(MethodName.GPTQ, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        cfg.validate_shape(in_features=shape[1], out_features=shape[0])
    with pytest.raises(ConfigError, match=message):
        get_method(cfg).quantize(torch.zeros(shape))


def test_mixtral_shapes_are_valid() -> None:
    for bits in (2, 3, 4, 8):
        cfg = QuantConfig.of(MethodName.GPTQ, bits=bits)
        for out_features, in_features in ((14336, 4096), (4096, 14336), (1024, 4096)):
            cfg.validate_shape(in_features, out_features)


def test_non_finite_weight_is_refused() -> None:
    weight = torch.zeros(32, 64)
    weight[1, 2] = float("nan")
    with pytest.raises(MixtralQuantError, match="NaN"):
        get_method(QuantConfig.of(MethodName.RTN, group_size=32)).quantize(weight)


def test_registry_covers_every_method() -> None:
    assert set(registered()) == {m.value for m in MethodName}
    for name in MethodName:
        method = get_method(QuantConfig.for_method(name, group_size=32))
        assert method.config.method is name
        weight = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
        hessian = torch.eye(256) if method.needs_hessian else None
        result = method.quantize(weight, hessian)
        assert sorted(result.tensors) == sorted(method.tensor_names())
        assert method.dequantize(result.tensors).shape == (32, 256)
        assert result.info["method"] == name.value


@pytest.mark.parametrize("config", [
    QuantConfig.of(MethodName.GPTQ, bits=3, group_size=64, sym=False, act_order=True, static_groups=False,
                damp_percent=0.05),
    QuantConfig.of(MethodName.GPTQ, bits=8, group_size=-1),
    QuantConfig.of(MethodName.NF4, double_quant=False),
    QuantConfig.for_method(MethodName.INT8),
    QuantConfig.for_method(MethodName.W8),
    QuantConfig.of(MethodName.GPTQ_Q4_K, group_size=32, act_order=True, damp_percent=0.02),
])
def test_each_method_reads_back_the_quantization_config_it_writes(config: QuantConfig) -> None:
    """The entry a method writes into config.json reads back, through the registry, as the settings
    that wrote it (what loading needs: the method, bits, grid and GPTQ's recorded options)."""
    assert read_quantization_config(get_method(config).quantization_config()) == config


def test_rtn_reads_back_as_gptq_and_foreign_entries_are_refused() -> None:
    """RTN writes the GPTQ layout and GPTQModel's entry: it loads as GPTQ with the same grid."""
    rtn = QuantConfig.of(MethodName.RTN, bits=4, group_size=128, sym=False)
    assert read_quantization_config(get_method(rtn).quantization_config()) == replace(rtn, method=MethodName.GPTQ)
    for entry in ({"quant_method": "awq", "bits": 4}, {"quant_method": "bitsandbytes"}, ["gptq"]):
        with pytest.raises(ConfigError, match="quantization_config"):
            read_quantization_config(entry)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"malformed field .*bits must be an integer"):
        read_quantization_config({"quant_method": "gptq", "bits": "4"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_weight_refuses_non_finite_and_keeps_finite_weights_whose_sum_overflows(bad: float) -> None:
    from mixtral_quant.quant.base import check_weight

    cfg = QuantConfig.for_method(MethodName.NF4)
    huge = torch.full((32, 64), 3.0e38)  # every element finite, the sum is not
    assert check_weight(huge, cfg) == (32, 64)
    for base in (torch.zeros(32, 64), huge):
        w = base.clone()
        w[5, 7] = bad
        with pytest.raises(MixtralQuantError, match="NaN or inf"):
            check_weight(w, cfg)
