"""Bad input to the ONNX export and its runner, through the command line: a damaged checkpoint (NaN,
Inf, 8-bit float tensors) and a damaged export.json end as one line ``error: ...``, exit status 1,
the input folder's bytes unchanged and no output folder, as in test_bad_input.py."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SMALL_MIXTRAL, save_model
from safetensors.torch import load_file, save_file
from test_bad_input import assert_one_line_error, run_cli, tree_hash

from mixtral_quant.artifact import MANIFEST
from mixtral_quant.checkpoint import DEFAULT_MODEL, SINGLE_FILE, CheckpointReader
from mixtral_quant.errors import CheckpointError, IntegrityError
from mixtral_quant.export import EXPORT_INFO, export_onnx
from mixtral_quant.export.ort_runner import OnnxDecoder
from mixtral_quant.loading import load_model, new_model

CFG = replace(SMALL_MIXTRAL, vocab_size=32000)  # the real tokenizer's ids reach 31999
EXPERT = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_model(new_model(CFG, seed=3), tmp_path_factory.mktemp("src") / "model")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture
def model(source: Path, tmp_path: Path) -> Path:
    """A copy of the source under ``tmp_path/in`` that a case may damage."""
    return Path(shutil.copytree(source, tmp_path / "in" / "model"))


def edit_tensor(folder: Path, name: str, fn: object) -> None:
    tensors = load_file(folder / SINGLE_FILE)
    tensors[name] = fn(tensors[name])  # type: ignore[operator]
    save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})


def run_refused(argv: list[str | Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str], *words: str) -> None:
    """One-line error naming ``words``; the input keeps its bytes; no output or work folder appears."""
    before = tree_hash(tmp_path / "in")
    code, _, err = run_cli(argv, monkeypatch, capsys)
    assert_one_line_error(code, err, *words)
    assert tree_hash(tmp_path / "in") == before, "the input folder changed"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(("target", "value", "word"), [("ort", float("nan"), "NaN"), ("standard", float("inf"), "Inf")])
def test_export_refuses_non_finite_weights(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], target: str, value: float,
                                           word: str) -> None:
    """The exporter refuses what the torch loader refuses, with the same message."""
    def damage(t: torch.Tensor) -> torch.Tensor:
        t[5, 7] = value
        return t

    edit_tensor(model, EXPERT, damage)
    with pytest.raises(CheckpointError, match="NaN or Inf") as loader_error:
        load_model(model)
    assert EXPERT in str(loader_error.value)
    argv: list[str | Path] = ["export", "onnx", model, "-o", tmp_path / "out", "--target", target, "-q"]
    run_refused(argv, tmp_path, monkeypatch, capsys, EXPERT, word, SINGLE_FILE)


F8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu}


@pytest.mark.parametrize("command", ["export", "generate"])
@pytest.mark.parametrize("dtype", list(F8))
def test_8bit_float_tensors_are_refused_by_name(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], dtype: str, command: str) -> None:
    """An 8-bit float weight means nothing without scales this tool does not read: every reader names
    the tensor and its dtype (F8_E4M3 used to crash in isfinite, F8_E5M2/F8_E8M0 passed silently)."""
    edit_tensor(model, EXPERT, lambda t: t.abs().to(F8[dtype]))
    with CheckpointReader(model) as reader:
        assert reader.dtype(EXPERT) == dtype  # the file really holds the 8-bit format
        with pytest.raises(CheckpointError, match=dtype):
            reader.get(EXPERT)
        assert reader.get("model.norm.weight").dtype == torch.float32  # other tensors still read
    argv: list[str | Path] = (["export", "onnx", model, "-o", tmp_path / "out", "-q"] if command == "export"
                              else ["generate", model, "-p", "hello", "-n", "2", "--device", "cpu"])
    run_refused(argv, tmp_path, monkeypatch, capsys, EXPERT, dtype, "BF16")


@pytest.fixture(scope="module")
def exported(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(source, tmp_path_factory.mktemp("onnx") / "onnx", progress=False)


BAD_INFO = {
    "corrupt": ('{"max_position_embeddings": 25', "not valid JSON"),
    "list": ("[1, 2, 3]", "a JSON list"),
    "string": ('"max_position_embeddings"', "a JSON str"),
    "context-string": ('{"max_position_embeddings": "256"}', "max_position_embeddings"),
}


@pytest.mark.parametrize("case", list(BAD_INFO))
def test_damaged_export_json_is_one_line(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], case: str) -> None:
    """`generate --backend onnx` and the runner name the damaged export.json (its manifest removed,
    as after a hand edit; with the manifest, verify refuses the edit first)."""
    folder = Path(shutil.copytree(exported, tmp_path / "in" / "onnx"))
    text, words = BAD_INFO[case]
    (folder / EXPORT_INFO).write_text(text)
    with pytest.raises(IntegrityError, match=r"export\.json"):
        OnnxDecoder(folder)  # the manifest still holds the old hash
    (folder / MANIFEST).unlink()
    with pytest.raises(IntegrityError, match=words):
        OnnxDecoder(folder)
    argv: list[str | Path] = ["generate", "--backend", "onnx", folder, "-p", "hello", "-n", "2"]
    run_refused(argv, tmp_path, monkeypatch, capsys, EXPORT_INFO, words, "export the model again")


def test_intact_export_json_still_runs(exported: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The same command on the undamaged folder prints text and reads the context from export.json."""
    assert OnnxDecoder(exported).context == json.loads((exported / EXPORT_INFO).read_text())[
        "max_position_embeddings"] == CFG.max_position_embeddings
    code, out, err = run_cli(["generate", "--backend", "onnx", exported, "-p", "hello", "-n", "2"], monkeypatch, capsys)
    assert code == 0 and out.strip(), err
