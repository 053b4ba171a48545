"""Bad input through the command line: every case ends with one line ``error: ...`` on stderr,
exit status 1 and no traceback; the input folder keeps its exact bytes and no artifact appears.

``main()`` (the console script's entry point) runs in-process with ``sys.argv`` set, so these
tests see exactly what a user sees without paying a Python start-up per case.
"""

from __future__ import annotations

import ast
import errno
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import SMALL_MIXTRAL, save_model
from safetensors.torch import load_file, save_file

import mixtral_quant
import mixtral_quant.pipeline
from mixtral_quant.artifact import MANIFEST, IntegrityError, sha256_file, verify
from mixtral_quant.checkpoint import DEFAULT_MODEL, INDEX_FILE, SINGLE_FILE, CheckpointReader, write_checkpoint
from mixtral_quant.cli import main
from mixtral_quant.errors import CheckpointError
from mixtral_quant.loading import new_model
from mixtral_quant.recipe import CORPORA

# The real tokenizer's ids reach 31999, so quantizable test models have Mixtral's vocabulary.
CFG = replace(SMALL_MIXTRAL, vocab_size=32000)


def tree_hash(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str | Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
            ) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``mixtral-quant ARGV``."""
    monkeypatch.setattr(sys, "argv", ["mixtral-quant", *map(str, argv)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _recipe(folder: Path, name: str, corpus: Path, **quant: object) -> Path:
    q = {"method": "gptq", "bits": 4, "group_size": 32, **quant}
    lines = [f'name = "{name}"', "[quant]"] + [f"{k} = {json.dumps(v)}" for k, v in q.items()]
    lines += ["[calibration]", f"corpus = {json.dumps(str(corpus))}", "samples = 4", "seq_len = 32"]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_model(new_model(CFG, seed=3), tmp_path_factory.mktemp("src") / "model")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", folder / "tokenizer.model")
    return folder


@dataclass
class Case:
    model: Path  # a copy of the source the case may damage before the run
    out: Path
    recipe: Path  # a tiny GPTQ recipe on a corpus long enough for it
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def quantize(self, *extra: str | Path, model: Path | None = None, recipe: Path | None = None) -> list[str | Path]:
        return ["quantize", model or self.model, "-r", recipe or self.recipe, "-o", self.out, "-q", *extra]

    def edit_tensors(self, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
        path = self.model / SINGLE_FILE
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})

    def corpus(self, text: str) -> Path:
        path = self.tmp / "corpus.txt"
        path.write_text(text)
        return path


def missing_dir(c: Case) -> tuple[list[str | Path], list[str]]:
    return c.quantize(model=c.tmp / "no-such-model"), ["no-such-model", "does not exist"]


def not_mixtral(c: Case) -> tuple[list[str | Path], list[str]]:
    cfg = json.loads((c.model / "config.json").read_text())
    (c.model / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    return c.quantize(), ["'llama'", "not a Mixtral or Mistral"]


def truncated(c: Case) -> tuple[list[str | Path], list[str]]:
    data = (c.model / SINGLE_FILE).read_bytes()
    (c.model / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    return c.quantize(), [SINGLE_FILE, "truncated"]


def corrupted_header(c: Case) -> tuple[list[str | Path], list[str]]:
    data = bytearray((c.model / SINGLE_FILE).read_bytes())
    data[8:24] = b"\x00garbage\xff{{{{{{{"
    (c.model / SINGLE_FILE).write_bytes(bytes(data))
    return c.quantize(), [SINGLE_FILE, "corrupted"]


def missing_shard(c: Case) -> tuple[list[str | Path], list[str]]:
    tensors = load_file(c.model / SINGLE_FILE)
    (c.model / SINGLE_FILE).unlink()
    shards = write_checkpoint(tensors.items(), c.model, max_shard_bytes=4_000_000)
    assert len(shards) > 2 and (c.model / INDEX_FILE).is_file()
    shards[1].unlink()
    return c.quantize(), [shards[1].name, "missing", INDEX_FILE]


def wrong_shape(c: Case) -> tuple[list[str | Path], list[str]]:
    c.edit_tensors(lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 32)))
    return c.quantize(), ["model.layers.0.self_attn.q_proj.weight", "(64, 32)", "(64, 64)"]


def wrong_dtype(c: Case) -> tuple[list[str | Path], list[str]]:
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    c.edit_tensors(lambda t: t.__setitem__(name, torch.ones(96, 64, dtype=torch.int32)))
    return c.quantize(), [name, "int32", "float"]


def nan_weight(c: Case) -> tuple[list[str | Path], list[str]]:
    name = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    c.edit_tensors(lambda t: t[name].__setitem__((3, 4), float("nan")))
    return c.quantize(), [name, "NaN"]


def inf_weight(c: Case) -> tuple[list[str | Path], list[str]]:
    c.edit_tensors(lambda t: t["lm_head.weight"].__setitem__((7, 1), float("-inf")))
    return c.quantize(), ["lm_head.weight", "Inf"]


def unknown_recipe_key(c: Case) -> tuple[list[str | Path], list[str]]:
    recipe = c.tmp / "typo.toml"
    recipe.write_text(c.recipe.read_text().replace("[quant]", "[quant]\ngroupsize = 32"))
    return c.quantize(recipe=recipe), ["unknown key", "groupsize", "[quant]"]


def other_methods_setting(c: Case) -> tuple[list[str | Path], list[str]]:
    """A setting of another method (NF4's block size in a GPTQ recipe) is refused, not ignored."""
    recipe = c.tmp / "mixed.toml"
    recipe.write_text(c.recipe.read_text().replace("[quant]", "[quant]\nnf4_blocksize = 64"))
    return c.quantize(recipe=recipe), ["unknown key", "nf4_blocksize", "[quant]", "damp_percent"]


def five_bits(c: Case) -> tuple[list[str | Path], list[str]]:
    return c.quantize(recipe=_recipe(c.tmp, "w5", c.recipe.parent / "corpus.txt", bits=5)), ["5-bit", "[2, 3, 4, 8]"]


def five_bits_flag(c: Case) -> tuple[list[str | Path], list[str]]:
    return c.quantize("--bits", "5"), ["5-bit"]


def group_not_dividing(c: Case) -> tuple[list[str | Path], list[str]]:
    recipe = _recipe(c.tmp, "g96", c.recipe.parent / "corpus.txt", group_size=96)
    return c.quantize(recipe=recipe), ["group_size 96", "does not divide", "64"]


def shipped_group_128(c: Case) -> tuple[list[str | Path], list[str]]:
    return c.quantize(recipe=Path("rtn-w4g128")), ["group_size 128", "does not divide"]


def short_corpus(c: Case) -> tuple[list[str | Path], list[str]]:
    recipe = _recipe(c.tmp, "short", c.corpus("Too short to calibrate on."))
    return c.quantize(recipe=recipe), ["corpus.txt", "too short", "4 sequences of 32"]


def zero_samples_flag(c: Case) -> tuple[list[str | Path], list[str]]:
    return c.quantize("--samples", "0"), ["samples"]


def vocab_mismatch(c: Case) -> tuple[list[str | Path], list[str]]:
    shutil.rmtree(c.model)
    save_model(new_model(replace(CFG, vocab_size=256), seed=3), c.model)
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", c.model / "tokenizer.model")
    return c.quantize(), ["vocab", "256"]


def out_is_source(c: Case) -> tuple[list[str | Path], list[str]]:
    return ["quantize", c.model, "-r", c.recipe, "-o", c.model, "-q", "--overwrite"], ["source"]


def out_holds_source(c: Case) -> tuple[list[str | Path], list[str]]:
    return ["quantize", c.model, "-r", c.recipe, "-o", c.model.parent, "-q", "--overwrite"], ["source"]


def disk_full(c: Case) -> tuple[list[str | Path], list[str]]:
    real = mixtral_quant.pipeline.save_file
    calls = []

    def save_file_until_full(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 3:  # the head shard and layer 0's shard fit; its activations do not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)  # type: ignore[arg-type]

    c.monkeypatch.setattr(mixtral_quant.pipeline, "save_file", save_file_until_full)
    return c.quantize(), ["disk is full", "--resume"]


def prompt_too_long(c: Case) -> tuple[list[str | Path], list[str]]:
    return ["generate", c.model, "-p", "word " * 300, "-n", "4", "--device", "cpu"], ["exceeds", "context of 256"]


def generate_damaged(c: Case) -> tuple[list[str | Path], list[str]]:
    c.edit_tensors(lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    return ["generate", c.model, "-p", "hello", "-n", "2", "--device", "cpu"], ["model.norm.weight", "NaN"]


def _blocker(c: Case) -> Path:
    """A plain file where an output folder's parent should be."""
    blocker = c.tmp / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker


def out_under_a_file(c: Case) -> tuple[list[str | Path], list[str]]:
    return ["quantize", c.model, "-r", c.recipe, "-o", _blocker(c) / "out", "-q"], ["Not a directory", "blocker"]


def export_out_under_a_file(c: Case) -> tuple[list[str | Path], list[str]]:
    return ["export", "onnx", c.model, "-o", _blocker(c) / "onnx", "-q"], ["Not a directory", "blocker"]


def report_under_a_file(c: Case) -> tuple[list[str | Path], list[str]]:
    variant = c.tmp / "variant"
    shutil.copytree(c.model, variant)
    corpus = c.tmp / "in" / "corpus.txt"
    return (["eval", variant, "--baseline", c.model, "-d", corpus, "--ctx", "64", "--device", "cpu",
             "--report", _blocker(c) / "report"], ["Not a directory", "blocker"])


CASES = [
    missing_dir, not_mixtral, truncated, corrupted_header, missing_shard, wrong_shape, wrong_dtype, nan_weight,
    inf_weight, unknown_recipe_key, other_methods_setting, five_bits, five_bits_flag, group_not_dividing,
    shipped_group_128, short_corpus,
    zero_samples_flag, vocab_mismatch, out_is_source, out_holds_source, disk_full, prompt_too_long, generate_damaged,
    out_under_a_file, export_out_under_a_file, report_under_a_file,
]


@pytest.mark.parametrize("make", CASES, ids=[f.__name__ for f in CASES])
def test_bad_input(make: Callable[[Case], tuple[list[str | Path], list[str]]], source: Path, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "in" / "model"
    shutil.copytree(source, model)
    corpus = tmp_path / "in" / "corpus.txt"
    corpus.write_text((CORPORA / "wiki-test.txt").read_text()[:20_000])
    case = Case(model, tmp_path / "out", _recipe(tmp_path / "in", "tiny", corpus), tmp_path, monkeypatch)
    argv, words = make(case)
    before = tree_hash(tmp_path / "in")
    code, _, err = run_cli(argv, monkeypatch, capsys)
    assert_one_line_error(code, err, *words)
    assert tree_hash(tmp_path / "in") == before, "the input folder changed"
    assert not case.out.exists(), "an artifact folder appeared at --out"
    if make is not disk_full:  # a full disk keeps the finished layers for --resume
        assert not (tmp_path / "out.partial").exists(), "a bad input left a work folder behind"


def test_existing_output_is_refused(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier artifact")
    before, src_before = tree_hash(out), tree_hash(source)
    recipe = _recipe(tmp_path, "tiny", tmp_path / "no-corpus-needed-to-refuse.txt")
    code, _, err = run_cli(["quantize", source, "-r", recipe, "-o", out, "-q"], monkeypatch, capsys)
    assert_one_line_error(code, err, str(out), "already exists", "--overwrite")
    assert tree_hash(out) == before and tree_hash(source) == src_before
    assert not (tmp_path / "out.partial").exists()


# -- security -------------------------------------------------------------------------------------
@pytest.mark.parametrize("escape", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_cannot_name_files_outside(escape: str, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    tensors = {"a": torch.ones(4), "b": torch.zeros(2)}
    write_checkpoint(tensors.items(), folder, max_shard_bytes=16)
    save_file({"a": torch.full((4,), 7.0)}, str(tmp_path / "outside.safetensors"))  # would load if reached
    name = str(tmp_path / "outside.safetensors") if escape == "ABSOLUTE" else escape
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["a"] = name
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside its folder"):
        CheckpointReader(folder)


@pytest.mark.parametrize("escape", ["../secret.txt", "ABSOLUTE", "link/secret.txt"])
def test_manifest_cannot_name_files_outside(escape: str, tmp_path: Path) -> None:
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "config.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the artifact")
    if escape == "link/secret.txt":
        (art / "link").symlink_to(tmp_path, target_is_directory=True)
    rel = str(secret) if escape == "ABSOLUTE" else escape
    files = {"config.json": sha256_file(art / "config.json"), rel: sha256_file(secret)}
    (art / MANIFEST).write_text(json.dumps({"format": "mixtral-quant-artifact", "files": files}))
    with pytest.raises(IntegrityError, match="outside the artifact"):
        verify(art)


UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Code that can unpickle: torch.load without weights_only=True, pickle-family modules, allow_pickle."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in UNPICKLERS]
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in names:
                found.append("from torch import load")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if func.endswith("torch.load"):
            flag = kwargs.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{func} without weights_only=True (line {node.lineno})")
        if func.endswith("read_pickle") or func.endswith("torch.serialization.load"):
            found.append(f"{func} (line {node.lineno})")
        flag = kwargs.get("allow_pickle")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
            found.append(f"{func} with allow_pickle (line {node.lineno})")
    return found


def test_nothing_is_unpickled() -> None:
    package = Path(mixtral_quant.__file__).parent
    files = sorted(package.rglob("*.py")) + sorted((package.parent / "scripts").glob("*.py"))
    problems = {str(p): found for p in files if (found := _unsafe_loads(ast.parse(p.read_text())))}
    assert not problems
    # The checker itself finds what it looks for.
    assert _unsafe_loads(ast.parse("import pickle\ntorch.load(f)\nnp.load(f, allow_pickle=True)")) == [
        "import pickle", "torch.load without weights_only=True (line 2)", "np.load with allow_pickle (line 3)"]
    assert not _unsafe_loads(ast.parse("torch.load(f, weights_only=True)"))
