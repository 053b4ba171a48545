"""End-to-end CLI: inspect, generate, quantize -> verify -> inspect -> eval with the regression gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtral_quant import cli
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.generate import Sampling, generate
from mixtral_quant.loading import load_model
from mixtral_quant.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.argv", ["mixtral-quant", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_shows_components_dtypes_and_shards(capsys, monkeypatch):
    code, out, _ = run(["inspect"], capsys, monkeypatch)
    assert code == 0
    for word in ("experts", "attention", "router", "embeddings", "norms", "BF16", "model.safetensors", "top-2"):
        assert word in out


def test_generate_prints_the_library_greedy_continuation(capsys, monkeypatch):
    code, out, _ = run(["generate", "-p", "The history of", "-n", "8", "--device", "cpu"], capsys, monkeypatch)
    assert code == 0
    tok = Tokenizer(DEFAULT_MODEL)
    ids = tok.encode("The history of")
    new = generate(load_model(DEFAULT_MODEL), ids, Sampling(max_new_tokens=8), eos_id=tok.eos_id)
    assert out.strip() == tok.decode(ids[1:] + [t for t in new if t != tok.eos_id]).strip()


def test_chat_format_matches_mistral_layout():
    tok = Tokenizer(DEFAULT_MODEL)
    ids = tok.chat([("Hi", "Hello"), ("Next", None)])
    expected = [1, *tok.encode("[INST] Hi [/INST]", bos=False), *tok.encode("Hello", bos=False), 2,
                *tok.encode("[INST] Next [/INST]", bos=False)]
    assert ids == expected
    assert tok.encode("Hello world", bos=False) == [22557, 1526]


def test_quantize_verify_inspect_eval_gate(tmp_path, capsys, monkeypatch):
    art = tmp_path / "w8"
    code, out, err = run(["quantize", "-r", "w8", "--samples", "2", "--seq-len", "64", "-o", str(art), "-q"],
                         capsys, monkeypatch)
    assert code == 0, err
    code, out, _ = run(["verify", str(art)], capsys, monkeypatch)
    assert code == 0 and "ok:" in out
    code, out, _ = run(["inspect", str(art)], capsys, monkeypatch)
    experts = next(line for line in out.splitlines() if line.startswith("experts"))
    assert 8.0 <= float(experts.split()[-1]) < 8.5  # int8 codes + one fp16 scale per row
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "calibration" / "corpora" / "wiki-test.txt").read_text()[:6000])
    report = tmp_path / "report"
    args = ["eval", str(art), "--dataset", str(text), "--ctx", "128", "--device", "cpu", "--report", str(report)]
    code, out, err = run(args, capsys, monkeypatch)
    assert code == 0, err
    measured = json.loads((report / "report.json").read_text())["variants"][0]
    bounds = tmp_path / "bounds.toml"
    bounds.write_text(f'[variants.w8]\nmax_ppl_ratio = {measured["ppl_ratio"] + 0.01}\n')
    assert run([*args, "--check", str(bounds)], capsys, monkeypatch)[0] == 0
    bounds.write_text(f'[variants.w8]\nmax_ppl_ratio = {measured["ppl_ratio"] - 1e-6}\n')
    code, out, err = run([*args, "--check", str(bounds)], capsys, monkeypatch)
    assert code == 1 and "max_ppl_ratio" in err


def test_missing_model_is_one_line_and_nonzero(capsys, monkeypatch):
    code, _out, err = run(["inspect", "/no/such/model"], capsys, monkeypatch)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error:")


def test_a_fresh_process_prints_nothing_but_the_answer() -> None:
    """In a new process (bitsandbytes imported for the first time by the command), stderr stays empty:
    bitsandbytes' import-time notes (an optional CPU kernel package on AVX-512-BF16 machines) and its
    per-call casting notes do not reach the user. The help lists the shipped recipes without importing
    bitsandbytes at all."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mixtral_quant", "inspect"], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0 and "experts" in done.stdout
    assert done.stderr == ""
    probe = "import sys, mixtral_quant.cli; print('bitsandbytes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


def test_inspect_names_the_quantization_settings() -> None:
    """inspect's "quantized" line reads the settings from the entry each method writes."""
    from mixtral_quant.inventory import describe_quantization
    from mixtral_quant.quant import MethodName, QuantConfig, get_method

    def line(method: MethodName, **fields: object) -> str:
        return describe_quantization(get_method(QuantConfig.for_method(method, **fields)).quantization_config())

    assert line(MethodName.GPTQ, act_order=True) == "gptq 4-bit, groups of 128, act-order (static groups)"
    assert line(MethodName.GPTQ, bits=3, group_size=-1, sym=False) == "gptq 3-bit, one group per row, asymmetric"
    assert line(MethodName.NF4, double_quant=False) == "bitsandbytes nf4, fp32 absmax, compute bfloat16"
    assert line(MethodName.INT8, int8_threshold=4.0) == "bitsandbytes LLM.int8, outlier threshold 4.0"
    assert line(MethodName.GPTQ_Q4_K, group_size=32) == "gguf-q4_k 4-bit, groups of 32"
    assert line(MethodName.W8) == "w8 8-bit"
