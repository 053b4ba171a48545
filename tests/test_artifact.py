"""Nothing lost: an interrupted quantize run (stopped, killed, or out of disk) resumes into the same
bytes as an uninterrupted one, and a modified artifact is refused by `verify` and by load_model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SMALL_MIXTRAL, save_model

import mixtral_quant.artifact
import mixtral_quant.pipeline
from mixtral_quant.artifact import MANIFEST, IntegrityError, partial_dir, sha256_file
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.cli import main
from mixtral_quant.config import MoEArgs
from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.loading import load_model, new_model
from mixtral_quant.pipeline import quantize_model, shard_name
from mixtral_quant.recipe import CORPORA, Recipe, load_recipe

# Mixtral's vocabulary (the real tokenizer), four layers so a killed run has layers left to do.
CFG = replace(SMALL_MIXTRAL, vocab_size=32000, num_hidden_layers=4, moe=MoEArgs(num_local_experts=4))
RUN_FILES = {"run_log.json"}  # timings: the one file allowed to differ between runs


def tree_hash(folder: Path, skip: set[str] = frozenset()) -> dict[str, str]:  # type: ignore[assignment]
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifact")


@pytest.fixture(scope="module")
def source(root: Path) -> Path:
    folder = save_model(new_model(CFG, seed=7), root / "model")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def recipe_file(root: Path) -> Path:
    corpus = root / "corpus.txt"
    corpus.write_text((CORPORA / "wiki-test.txt").read_text()[:20_000])
    path = root / "tiny-gptq.toml"
    path.write_text(f'name = "tiny-gptq"\n[quant]\nmethod = "gptq"\nbits = 4\ngroup_size = 32\nact_order = true\n'
                    f'[calibration]\ncorpus = {json.dumps(str(corpus))}\nsamples = 4\nseq_len = 32\n')
    return path


@pytest.fixture(scope="module")
def recipe(recipe_file: Path) -> Recipe:
    return load_recipe(recipe_file)


@pytest.fixture(scope="module")
def reference(root: Path, source: Path, recipe: Recipe) -> Path:
    """An uninterrupted run."""
    return quantize_model(source, recipe, root / "reference", progress=False)


@pytest.fixture(scope="module")
def source_hashes(source: Path) -> dict[str, str]:
    return tree_hash(source)


def assert_same_artifact(out: Path, reference: Path, source: Path, source_hashes: dict[str, str]) -> None:
    assert not partial_dir(out).exists()
    ours, theirs = tree_hash(out, RUN_FILES), tree_hash(reference, RUN_FILES)
    differ = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
    assert not differ, f"files that differ from the uninterrupted run: {differ}"
    assert (out / "run_log.json").is_file()
    assert tree_hash(source) == source_hashes, "the source changed"


def test_stop_then_resume_gives_the_same_bytes(tmp_path: Path, source: Path, recipe: Recipe, reference: Path,
                                               source_hashes: dict[str, str]) -> None:
    out, work = tmp_path / "out", partial_dir(tmp_path / "out")
    with pytest.raises(MixtralQuantError, match="stopped after layer 1"):
        quantize_model(source, recipe, out, progress=False, stop_after=1)
    assert not out.exists() and (work / shard_name(2, 5)).is_file()
    with pytest.raises(MixtralQuantError, match="unfinished run"):
        quantize_model(source, recipe, out, progress=False)
    activations = (work / "activations-1.safetensors").read_bytes()
    with pytest.raises(MixtralQuantError, match="stopped after layer 2"):
        quantize_model(source, recipe, out, progress=False, resume=True, stop_after=2)
    # What a kill between two steps leaves: the previous layer's activations, a half-written shard.
    (work / "activations-1.safetensors").write_bytes(activations)
    (work / (shard_name(4, 5) + ".tmp")).write_bytes(activations[:100])
    (work / ".tmpX1b2C3").write_bytes(activations[:100])  # safetensors' own temporary file, killed mid-write
    quantize_model(source, recipe, out, progress=False, resume=True)
    assert_same_artifact(out, reference, source, source_hashes)


# `mixtral-quant` as its console script runs it, except that layers after the first start 2 s late:
# on a busy machine the test still finds the run alive after layer 0's shard appears.
KILLABLE = """
import sys, time
import mixtral_quant.pipeline as pipeline
from mixtral_quant.cli import main
load_layer = pipeline.load_layer


def late_load_layer(reader, cfg, i, *args, **kwargs):
    if i > 0:
        time.sleep(2)
    return load_layer(reader, cfg, i, *args, **kwargs)


pipeline.load_layer = late_load_layer
sys.argv[0] = "mixtral-quant"
main()
"""


def test_sigkill_then_resume_gives_the_same_bytes(tmp_path: Path, source: Path, recipe_file: Path,
                                                  reference: Path, source_hashes: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    first_layer = partial_dir(out) / shard_name(2, 5)
    cmd = [sys.executable, "-c", KILLABLE, "quantize", str(source), "-r", str(recipe_file), "-o", str(out), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the reference run's thread count
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not first_layer.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"  # type: ignore[union-attr]
        assert first_layer.exists(), "layer 0's shard never appeared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL, "the run was not killed"
    assert not out.exists()
    monkeypatch.setattr(sys, "argv", ["mixtral-quant", "quantize", str(source), "-r", str(recipe_file), "-o",
                                      str(out), "-q", "--resume"])
    main()
    assert_same_artifact(out, reference, source, source_hashes)


def _fail_once(real: Callable[..., Any], when: Callable[..., bool]) -> Callable[..., Any]:
    """``real``, except that the first call ``when`` picks raises 'No space left on device'."""
    failed: list[bool] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not failed and when(*args, **kwargs):
            failed.append(True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return call


@pytest.mark.parametrize("where", ["layer 2 shard", "calibration.json"])
def test_disk_full_then_resume_gives_the_same_bytes(where: str, tmp_path: Path, source: Path, recipe: Recipe,
                                                    reference: Path, source_hashes: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    if where == "layer 2 shard":
        fake = _fail_once(mixtral_quant.pipeline.save_file, lambda _t, path, **_: shard_name(4, 5) in path)
        monkeypatch.setattr(mixtral_quant.pipeline, "save_file", fake)
    else:  # in the closing step, after the last layer's activations are gone
        fake = _fail_once(mixtral_quant.pipeline.write_json, lambda path, _d: path.name == "calibration.json")
        monkeypatch.setattr(mixtral_quant.pipeline, "write_json", fake)
    with pytest.raises(MixtralQuantError, match=r"disk is full.*--resume"):
        quantize_model(source, recipe, out, progress=False)
    assert not out.exists() and partial_dir(out).is_dir()
    quantize_model(source, recipe, out, progress=False, resume=True)
    assert_same_artifact(out, reference, source, source_hashes)


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_cli(tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    art = shutil.copytree(reference, tmp_path / "art")
    monkeypatch.setattr(sys, "argv", ["mixtral-quant", "verify", str(art)])
    main()
    assert capsys.readouterr().out.startswith("ok: ")
    shard = art / shard_name(3, 5)
    _flip_byte(shard, shard.stat().st_size - 100)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and shard.name in err and "modified" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["flip a weight byte", "edit config.json", "add a file", "remove a file"])
def test_load_model_refuses_a_modified_artifact(damage: str, tmp_path: Path, reference: Path) -> None:
    art = shutil.copytree(reference, tmp_path / "art")
    load_model(art)  # whole: loads
    name = {"flip a weight byte": shard_name(2, 5), "edit config.json": "config.json",
            "add a file": "extra.safetensors", "remove a file": "calibration.json"}[damage]
    if damage == "flip a weight byte":
        _flip_byte(art / name, (art / name).stat().st_size - 1)
    elif damage == "edit config.json":
        (art / name).write_text((art / name).read_text().replace('"rms_norm_eps"', ' "rms_norm_eps"'))
    elif damage == "add a file":
        shutil.copyfile(art / shard_name(2, 5), art / name)
    else:
        (art / name).unlink()
    with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
        load_model(art)


def test_load_model_hashes_each_file_once(reference: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[Path] = []
    real = mixtral_quant.artifact.sha256_file

    def counting(path: Path, *args: Any) -> str:
        hashed.append(path)
        return real(path, *args)

    monkeypatch.setattr(mixtral_quant.artifact, "sha256_file", counting)
    load_model(reference)
    listed = json.loads((reference / MANIFEST).read_text())["files"]
    assert sorted(p.relative_to(reference.resolve()).as_posix() for p in hashed) == sorted(listed)
