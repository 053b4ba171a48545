"""The ONNX export folder as an artifact: a manifest that verifies; an interrupted export (killed,
stopped, or failing) resumes into the same bytes as an uninterrupted one, and a partial export that
does not match the run is refused; a folder whose model.onnx points outside itself, or past the end
of its data, is refused before onnxruntime reads a byte."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from conftest import SMALL_MIXTRAL, save_model

import mixtral_quant.export.mixtral as exporter
from mixtral_quant.artifact import STATE, partial_dir, sha256_file, verify
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.config import MoEArgs
from mixtral_quant.errors import IntegrityError, MixtralQuantError
from mixtral_quant.export import ExportDtype, export_onnx
from mixtral_quant.export.common import DATA_FILE, MODEL_FILE
from mixtral_quant.export.ort_runner import OnnxDecoder
from mixtral_quant.loading import new_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import load_recipe

CFG = replace(SMALL_MIXTRAL, vocab_size=32000, num_hidden_layers=4, moe=MoEArgs(num_local_experts=4))


def tree_hash(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer RTN 4-bit artifact: its experts become QMoE and its attention MatMulNBits."""
    root = tmp_path_factory.mktemp("export-resume")
    source = save_model(new_model(CFG, seed=3), root / "model")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", source / "tokenizer.model")
    recipe_path = root / "rtn.toml"
    recipe_path.write_text('name = "rtn"\n[quant]\nmethod = "rtn"\nbits = 4\ngroup_size = 32\n'
                           '[calibration]\nsamples = 2\nseq_len = 32\n')
    return quantize_model(source, load_recipe(recipe_path), root / "rtn", progress=False)


@pytest.fixture(scope="module")
def reference(variant: Path) -> Path:
    return export_onnx(variant, variant.parent / "onnx-reference", progress=False)


def assert_same_export(out: Path, reference: Path) -> None:
    assert not partial_dir(out).exists()
    ours, theirs = tree_hash(out), tree_hash(reference)
    differ = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
    assert not differ, f"files that differ from the uninterrupted export: {differ}"
    verify(out)


def stop_at_commit(monkeypatch: pytest.MonkeyPatch, layers_done: int) -> None:
    """The run raises (as a Ctrl-C would) right after layer ``layers_done - 1``'s commit point."""
    real = exporter.write_json

    def write_json(path: Path, data: Any) -> None:
        real(path, data)
        if path.name == STATE and data["layers_done"] == layers_done:
            raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "write_json", write_json)


def test_export_writes_a_verifiable_manifest(reference: Path, variant: Path) -> None:
    manifest = verify(reference)
    assert manifest["export"]["target"] == "ort" and manifest["source_model"] == variant.name
    assert manifest["source_files"] == json.loads((variant / "manifest.json").read_text())["files"]
    assert not (reference / STATE).exists()


def test_stopped_export_resumes_into_the_same_bytes(tmp_path: Path, variant: Path, reference: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "onnx"
    with monkeypatch.context() as m:
        stop_at_commit(m, 2)
        with pytest.raises(KeyboardInterrupt):
            export_onnx(variant, out, progress=False)
    work = partial_dir(out)
    state = json.loads((work / STATE).read_text())
    assert not out.exists() and state["layers_done"] == 2
    with pytest.raises(MixtralQuantError, match=r"unfinished run.*--resume"):
        export_onnx(variant, out, progress=False)
    with pytest.raises(MixtralQuantError, match="other options"):
        export_onnx(variant, out, dtype=ExportDtype.FP16, progress=False, resume=True)
    with (work / DATA_FILE).open("ab") as f:  # what a kill in the middle of layer 2 leaves behind
        f.write(os.urandom(5000))
    export_onnx(variant, out, progress=False, resume=True)
    assert_same_export(out, reference)


def test_resume_refuses_a_damaged_partial_export(tmp_path: Path, variant: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "onnx"
    with monkeypatch.context() as m:
        stop_at_commit(m, 3)
        with pytest.raises(KeyboardInterrupt):
            export_onnx(variant, out, progress=False)
    data = partial_dir(out) / DATA_FILE
    committed = json.loads((partial_dir(out) / STATE).read_text())["data_bytes"]
    raw = bytearray(data.read_bytes())
    raw[committed // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="differs from this export"):
        export_onnx(variant, out, progress=False, resume=True)
    data.write_bytes(bytes(raw[: committed // 2]))
    with pytest.raises(IntegrityError, match="shorter than its run state"):
        export_onnx(variant, out, progress=False, resume=True)
    state = partial_dir(out) / STATE
    for damaged in ("{", '{"data_bytes": "12"}'):  # cut short, a field of the wrong type
        state.write_text(damaged)
        with pytest.raises(IntegrityError, match=r"state\.json is damaged"):
            export_onnx(variant, out, progress=False, resume=True)
    export_onnx(variant, out, progress=False, overwrite=True)  # starting over is always possible
    assert not partial_dir(out).exists()


# `mixtral-quant export onnx` as its console script runs it, except that once layer 0 is committed
# every write into the data file takes 20 ms: the kill lands in the middle of a later layer.
KILLABLE = """
import sys, time
from mixtral_quant.export.graph import ExternalData
from mixtral_quant.cli import main
write = ExternalData.write


def slow_write(self, data):
    if self.offset > 0 and self.path.with_name("state.json").exists():
        time.sleep(0.02)
    write(self, data)


ExternalData.write = slow_write
sys.argv[0] = "mixtral-quant"
main()
"""


def test_sigkill_during_export_then_resume_gives_the_same_bytes(tmp_path: Path, variant: Path, reference: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mixtral_quant.cli import main

    out = tmp_path / "onnx"
    state = partial_dir(out) / STATE
    cmd = [sys.executable, "-c", KILLABLE, "export", "onnx", str(variant), "-o", str(out), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)
        assert proc.poll() is None, f"the export ended before it could be killed: {proc.stderr.read()!r}"  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    committed = json.loads(state.read_text())["data_bytes"]
    assert (partial_dir(out) / DATA_FILE).stat().st_size > committed, "the kill did not land inside a layer"
    monkeypatch.setattr(sys, "argv", ["mixtral-quant", "export", "onnx", str(variant), "-o", str(out), "-q",
                                      "--resume"])
    main()
    assert_same_export(out, reference)


def _redirect_first_external(folder: Path, location: str | None = None, length: int | None = None) -> None:
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location" and location is not None:
            entry.value = location
        if entry.key == "length" and length is not None:
            entry.value = str(length)
    (folder / MODEL_FILE).write_bytes(model.SerializeToString())


@pytest.mark.parametrize(("location", "length", "message"), [
    ("../secret.bin", None, "points outside its folder"),
    ("/etc/hostname", None, "points outside its folder"),
    ("sub/../../secret.bin", None, "points outside its folder"),
    ("missing.data", None, "which is missing"),
    (None, 1 << 40, "which has"),
])
def test_runner_refuses_external_data_it_should_not_read(tmp_path: Path, reference: Path, location: str | None,
                                                         length: int | None, message: str) -> None:
    (tmp_path / "secret.bin").write_bytes(os.urandom(1 << 22))
    folder = shutil.copytree(reference, tmp_path / "onnx")
    (folder / "manifest.json").unlink()  # a folder from elsewhere: no manifest to catch the edit
    OnnxDecoder(folder)  # loads as exported
    _redirect_first_external(folder, location, length)
    with pytest.raises(IntegrityError, match=message):
        OnnxDecoder(folder)


def test_runner_checks_the_manifest(tmp_path: Path, reference: Path) -> None:
    folder = shutil.copytree(reference, tmp_path / "onnx")
    with (folder / DATA_FILE).open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError, match=DATA_FILE):
        OnnxDecoder(folder)
