"""Inputs found wrong by trying the tool as a new user would: each is refused with one ``error:`` line,
exit status 1, the inputs and earlier outputs byte for byte as they were, and no artifact at --out.

Each case here passed silently, destroyed data or ended in a traceback before it was fixed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SMALL_MIXTRAL, save_model
from test_bad_input import CFG, _recipe, assert_one_line_error, run_cli, tree_hash

import mixtral_quant.pipeline
from mixtral_quant.artifact import MANIFEST, output_lock, verify, write_manifest
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.errors import IntegrityError
from mixtral_quant.loading import new_model
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import CORPORA, load_recipe


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_model(new_model(CFG, seed=3), tmp_path_factory.mktemp("src") / "model")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text((CORPORA / "wiki-test.txt").read_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def artifact(model: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RTN artifact of the small model (written once; tests copy it before changing anything)."""
    recipe = load_recipe(_recipe(tmp_path_factory.mktemp("r"), "rtn", corpus, method="rtn"))
    return quantize_model(model, recipe, tmp_path_factory.mktemp("art") / "rtn", progress=False)


def refused(argv: list[str | Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *words: str, keep: tuple[Path, ...] = ()) -> None:
    """``mixtral-quant ARGV`` ends in one error line holding WORDS and leaves every folder in KEEP as it was."""
    before = {p: tree_hash(p) if p.is_dir() else p.read_bytes() for p in keep}
    code, _, err = run_cli(argv, monkeypatch, capsys)
    assert_one_line_error(code, err, *words)
    for p, h in before.items():
        assert (tree_hash(p) if p.is_dir() else p.read_bytes()) == h, f"{p} changed"


# -- eval: a baseline of another model ------------------------------------------------------------
@pytest.mark.parametrize("change", [
    {"hidden_size": 32}, {"num_hidden_layers": 1}, {"rope_theta": 1e6}, {"sliding_window": None},
    {"num_key_value_heads": 4}, {"moe": None},
], ids=["hidden_size", "num_hidden_layers", "rope_theta", "sliding_window", "num_key_value_heads", "dense"])
def test_eval_refuses_a_baseline_of_another_shape(change: dict[str, object], artifact: Path, tmp_path: Path,
                                                  corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    other = replace(CFG, **change)  # type: ignore[arg-type]
    base = save_model(new_model(other, seed=1), tmp_path / "base")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", base / "tokenizer.model")
    field = "model_type" if "moe" in change else next(iter(change))
    refused(["eval", artifact, "--baseline", base, "-d", corpus, "--ctx", "32", "--device", "cpu",
             "--report", tmp_path / "report"], monkeypatch, capsys, "not a variant of the baseline", field,
            keep=(artifact, base))
    assert not (tmp_path / "report").exists()


def test_eval_ctx_beyond_the_model_and_a_dataset_that_never_ends(
        artifact: Path, model: Path, tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    refused(["eval", artifact, "-b", model, "-d", corpus, "--ctx", "100000", "--device", "cpu"], monkeypatch, capsys,
            "--ctx 100000", "max_position_embeddings 256")
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")
    refused(["eval", artifact, "-b", model, "-d", zero, "--ctx", "32", "--device", "cpu"], monkeypatch, capsys,
            "zero.txt", "not a regular file")


def test_eval_report_never_replaces_a_model_folders_files(artifact: Path, model: Path, tmp_path: Path, corpus: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    base = shutil.copytree(model, tmp_path / "model")
    (base / "report.json").write_text('{"mine": true}\n')  # the model folder's own report
    refused(["eval", artifact, "-b", base, "-d", corpus, "--ctx", "32", "--device", "cpu", "--report", base],
            monkeypatch, capsys, "holds a model or artifact", keep=(base,))
    for folder in (artifact, tmp_path / "model"):
        refused(["eval", artifact, "-b", base, "-d", corpus, "--ctx", "32", "--device", "cpu", "--report", folder],
                monkeypatch, capsys, "holds a model or artifact", keep=(folder,))
    art = artifact
    other = tmp_path / "notes"
    other.mkdir()
    (other / "report.md").write_text("my notes\n")
    refused(["eval", art, "-b", model, "-d", corpus, "--ctx", "32", "--device", "cpu", "--report", other],
            monkeypatch, capsys, "report.md", "did not write", keep=(other,))


def test_a_quantized_folder_without_manifest_needs_no_verify(artifact: Path, model: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    art = shutil.copytree(artifact, tmp_path / "rtn")
    (art / MANIFEST).unlink()
    argv: list[str | Path] = ["generate", art, "-p", "The history of", "-n", "2", "--device", "cpu"]
    refused(argv, monkeypatch, capsys, "no manifest.json", "--no-verify", keep=(art,))
    code, out, err = run_cli([*argv, "--no-verify"], monkeypatch, capsys)
    assert code == 0 and out.startswith("The history of"), err


def test_manifest_covers_run_files_in_subfolders(tmp_path: Path) -> None:
    art = tmp_path / "art"
    (art / "sub").mkdir(parents=True)
    for rel in ("config.json", "run_log.json", "sub/run_log.json", "sub/manifest.json"):
        (art / rel).write_text("{}\n")
    files = json.loads(write_manifest(art, {}).read_text())["files"]
    assert sorted(files) == ["config.json", "sub/manifest.json", "sub/run_log.json"]
    verify(art)
    (art / "sub" / "run_log.json").write_text('{"changed": 1}\n')
    with pytest.raises(IntegrityError, match=r"sub/run_log\.json"):
        verify(art)


# -- quantize: outputs that are not ours, concurrent runs, resume ------------------------------------
def test_overwrite_replaces_only_what_the_tool_wrote(model: Path, corpus: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, "rtn", corpus, method="rtn")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    refused(["quantize", model, "-r", recipe, "-o", mine, "-q", "--overwrite"], monkeypatch, capsys,
            "not an artifact written by mixtral-quant", keep=(mine, model))
    afile = tmp_path / "afile"
    afile.write_text("a file\n")
    refused(["quantize", model, "-r", recipe, "-o", afile, "-q", "--overwrite"], monkeypatch, capsys,
            "not an artifact", keep=(afile,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine", "rtn.toml"]


@pytest.mark.parametrize("out", [".", "/", ""])
def test_out_must_name_a_folder(out: str, model: Path, corpus: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, "rtn", corpus, method="rtn")
    refused(["quantize", model, "-r", recipe, "-o", out, "-q", "--overwrite"], monkeypatch, capsys,
            "does not name a new folder", keep=(tmp_path,))


def test_a_second_run_on_the_same_output_is_refused(model: Path, corpus: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, "rtn", corpus, method="rtn")
    with output_lock(out):  # the first run holds its lock; a second one starts beside it
        refused(["quantize", model, "-r", recipe, "-o", out, "-q", "--overwrite"], monkeypatch, capsys,
                "another mixtral-quant run is writing", str(out))
        # the lock is an flock: a process that only opens the file cannot take it either
        fd = os.open(out.with_name(".out.lock"), os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert not out.exists() and not out.with_name("out.partial").exists()
    assert not out.with_name(".out.lock").exists()
    code, _, err = run_cli(["quantize", model, "-r", recipe, "-o", out, "-q"], monkeypatch, capsys)
    assert code == 0, err


def _stopped_run(model: Path, corpus: Path, tmp_path: Path) -> tuple[Path, Path]:
    recipe = _recipe(tmp_path, "rtn", corpus, method="rtn")
    out = tmp_path / "out"
    with pytest.raises(mixtral_quant.errors.MixtralQuantError, match="stopped after layer 1"):
        quantize_model(model, load_recipe(recipe), out, progress=False, stop_after=1)
    return recipe, out


@pytest.mark.parametrize("change", ["config", "copied-file"])
def test_resume_refuses_another_source(change: str, model: Path, corpus: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    src = shutil.copytree(model, tmp_path / "model")
    recipe, out = _stopped_run(src, corpus, tmp_path)
    if change == "config":  # same tensors, another function: rope_theta and top-1 routing
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1e6, "num_experts_per_tok": 1}))
    else:  # a file the artifact copies (tokenizer files, generation_config.json) changes its bytes too
        (src / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "do_sample": true}\n')
    refused(["quantize", src, "-r", recipe, "-o", out, "-q", "--resume"], monkeypatch, capsys,
            "another source model", "--overwrite", keep=(src, out.with_name("out.partial")))
    assert not out.exists()


@pytest.mark.parametrize("damage", ["state-not-json", "state-fields", "activations", "shard-missing"])
def test_resume_refuses_a_damaged_work_folder(damage: str, model: Path, corpus: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    recipe, out = _stopped_run(model, corpus, tmp_path)
    work = out.with_name("out.partial")
    if damage == "state-not-json":
        (work / "state.json").write_text("{ not json")
    elif damage == "state-fields":
        (work / "state.json").write_text('["a list"]')
    elif damage == "activations":
        data = bytearray((work / "activations-1.safetensors").read_bytes())
        data[-4:] = b"\xff\xff\xff\xff"
        (work / "activations-1.safetensors").write_bytes(bytes(data))
    else:
        (work / "model-00002-of-00003.safetensors").unlink()
    refused(["quantize", model, "-r", recipe, "-o", out, "-q", "--resume"], monkeypatch, capsys,
            "--overwrite", keep=(work,))
    assert not out.exists()
    # and starting over works
    code, _, err = run_cli(["quantize", model, "-r", recipe, "-o", out, "-q", "--overwrite"], monkeypatch, capsys)
    assert code == 0 and verify(out), err


@pytest.mark.parametrize("code", [28, 27])  # ENOSPC, EFBIG (ulimit -f): the message safetensors 0.8 gives
def test_safetensors_write_errors_are_one_line(code: int, model: Path, corpus: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import SafetensorError

    def failing(*args: object, **kwargs: object) -> None:
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(mixtral_quant.pipeline, "save_file", failing)
    recipe = _recipe(tmp_path, "rtn", corpus, method="rtn")
    refused(["quantize", model, "-r", recipe, "-o", tmp_path / "out", "-q"], monkeypatch, capsys,
            "disk is full" if code == 28 else "size limit", keep=(model,))


# -- bad values ------------------------------------------------------------------------------------
def test_generate_refuses_nan_temperature_and_invalid_text(model: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    base: list[str | Path] = ["generate", model, "-n", "2", "--device", "cpu"]
    refused([*base, "-p", "hi", "--temperature", "nan"], monkeypatch, capsys, "temperature", "nan")
    refused([*base, "-p", "bad \udcff byte"], monkeypatch, capsys, "not valid Unicode")


def test_malformed_quantization_config(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    art = shutil.copytree(artifact, tmp_path / "rtn")
    cfg = json.loads((art / "config.json").read_text())
    cfg["quantization_config"]["bits"] = "four"
    (art / "config.json").write_text(json.dumps(cfg))
    argv: list[str | Path] = ["generate", art, "-p", "hi", "-n", "2", "--device", "cpu"]
    refused(argv, monkeypatch, capsys, "config.json", "modified", keep=(art,))  # the manifest sees it first
    refused([*argv, "--no-verify"], monkeypatch, capsys, "quantization_config", "bits", "'four'", keep=(art,))


def test_binary_inputs_are_refused_alike(model: Path, artifact: Path, tmp_path: Path, corpus: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    refused(["quantize", model, "-r", _recipe(tmp_path, "rtn", binary, method="rtn"), "-o", tmp_path / "out", "-q"],
            monkeypatch, capsys, "calibration corpus", "not UTF-8", keep=(model,))
    refused(["eval", artifact, "-b", model, "-d", corpus, "--ctx", "32", "--device", "cpu", "--check", binary],
            monkeypatch, capsys, "bounds file", "not UTF-8")
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_a_model_without_its_tokenizer(model: Path, corpus: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = shutil.copytree(model, tmp_path / "model")
    (src / "tokenizer.model").unlink()
    refused(["quantize", src, "-r", _recipe(tmp_path, "rtn", corpus, method="rtn"), "-o", tmp_path / "out", "-q"],
            monkeypatch, capsys, "no tokenizer.model", keep=(src,))


# -- configs that describe no real model -----------------------------------------------------------
def _config(tmp_path: Path, **fields: object) -> Path:
    folder = save_model(new_model(SMALL_MIXTRAL, seed=0), tmp_path / "model")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **fields}))
    return folder


def test_config_with_only_model_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_model(new_model(SMALL_MIXTRAL, seed=0), tmp_path / "model")
    (folder / "config.json").write_text('{"model_type": "mixtral"}')
    refused(["inspect", folder], monkeypatch, capsys, "lacks", "hidden_size", "num_hidden_layers")


def test_giant_configs_are_refused_before_allocating(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = _config(tmp_path, num_local_experts=10**9)
    refused(["inspect", folder], monkeypatch, capsys, "parameters", "1000000000 experts")
    folder = _config(tmp_path / "layers", num_hidden_layers=10**5)
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", folder / "tokenizer.model")
    code, out, err = run_cli(["inspect", folder], monkeypatch, capsys)  # counted, not built
    assert code == 0, err
    per_layer = 2 * 64 + 64 * 64 * 2 + 2 * 64 * 32 + 8 * 64 + 8 * 3 * 64 * 96
    total = 10**5 * per_layer + 2 * 256 * 64 + 64
    assert f"{total / 1e9:.2f}B" in out, out
    refused(["quantize", folder, "-r", _recipe(tmp_path, "rtn", corpus, method="rtn"), "-o", tmp_path / "out", "-q"],
            monkeypatch, capsys, "model.layers.99999", "more than the checkpoint holds", keep=(folder,))
    refused(["generate", folder, "-p", "hi", "-n", "1", "--device", "cpu"], monkeypatch, capsys,
            "more than the checkpoint holds")


def test_demo_refuses_fewer_eval_tokens_than_a_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    refused(["demo", "--out", tmp_path / "demo", "--eval-tokens", "0"], monkeypatch, capsys, "--eval-tokens 0")
    assert not (tmp_path / "demo").exists()


def test_surrogates_reach_the_cli_as_python_sees_invalid_utf8() -> None:
    # Python decodes invalid UTF-8 in argv with surrogateescape: byte 0xff becomes '\udcff'.
    assert os.fsdecode(b"bad \xff byte") == "bad \udcff byte" and sys.getfilesystemencoding() == "utf-8"
