"""Packaging: the README's test command is what CI runs, and an installed wheel carries its run-time data.

The wheel test builds the wheel from a copy of the project's files (``pip wheel --no-deps``), checks what
``mixtral_quant/calibration/`` holds (recipes, bounds, the run-time corpora; not the training-only ones), and
imports the unpacked wheel from another folder, with nothing of the checkout on its path, to find the recipes
and datasets there.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CAL = "mixtral_quant/calibration/"
RUNTIME_CORPORA = ("wiki-train.txt", "wiki-test.txt", "moby-dick.txt", "PROVENANCE.md")
TRAINING_CORPORA = ("sotu.txt", "python-docs.txt", "django-docs.txt")


def _bash_commands(text: str) -> list[str]:
    """The lines of the README's ```bash blocks."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def readme_test_command() -> str:
    runs = [c for c in _bash_commands(README.read_text()) if c.endswith("python -m pytest")]
    assert len(runs) == 1, f"README.md must hold one test command ending in `python -m pytest`, found {runs}"
    return runs[0]


def test_ci_runs_the_readme_test_command_verbatim_in_a_fresh_virtualenv() -> None:
    command = readme_test_command()
    lines = [line.strip() for line in CI.read_text().splitlines()]
    assert command in lines, f".ci/run does not run the README's test command as written:\n{command}"
    before = lines[: lines.index(command)]
    assert any(line.startswith("python3 -m venv ") for line in before), "no fresh virtualenv before the tests"
    assert any(line.startswith(". ") and line.endswith("/bin/activate\"") for line in before), "venv not activated"


def test_readme_test_command_installs_what_the_tests_need() -> None:
    command = readme_test_command()
    steps = [s.strip() for s in command.split("&&")]
    assert steps[0] == "pip install torch==2.13.0"  # the CPU build first
    assert 'pip install -e ".[dev]"' in steps
    # tests/test_gptqmodel_interop.py needs GPTQModel, which must come without its dependencies.
    assert "pip install --no-deps -r scripts/gptqmodel-requirements.txt" in steps
    assert steps.index("pip install --no-deps -r scripts/gptqmodel-requirements.txt") > steps.index(
        'pip install -e ".[dev]"'
    )
    assert (ROOT / "scripts" / "gptqmodel-requirements.txt").is_file()


def test_every_package_is_listed() -> None:
    """pyproject lists its packages (one is mapped from calibration/): a new subpackage must be added there."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mixtral_quant").rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"mixtral_quant.calibration": "calibration"}
    assert listed - found == {"mixtral_quant.calibration"}
    assert (ROOT / "calibration" / "__init__.py").is_file()


def _setuptools_at_least(major: int) -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= major
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the project (so that no build/ folder of the checkout gets in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("mixtral_quant", "calibration"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    # Without build isolation when this environment has the setuptools pyproject asks for (no index needed).
    isolation = ["--no-build-isolation"] if _setuptools_at_least(68) else []
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "--wheel-dir", str(tmp / "dist"),
         str(src)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("mixtral_quant-*.whl")
    return whl


def test_wheel_carries_run_time_data_only(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {p.name for p in (ROOT / "calibration" / "recipes").glob("*.toml")}
    bounds = {p.name for p in (ROOT / "calibration" / "bounds").glob("*.toml")}
    assert recipes and bounds
    shipped = {n.removeprefix(CAL) for n in names if n.startswith(CAL)}
    assert shipped == {
        "__init__.py",
        *(f"recipes/{r}" for r in recipes),
        *(f"bounds/{b}" for b in bounds),
        *(f"corpora/{c}" for c in RUNTIME_CORPORA),
    }
    assert not any(c in n for n in names for c in TRAINING_CORPORA)
    assert "mixtral_quant/assets/tiny-mixtral/model.safetensors" in names
    assert "mixtral_quant/assets/tiny-mixtral/tokenizer.model" in names
    # The shipped files are the checkout's, byte for byte.
    with zipfile.ZipFile(wheel) as z:
        for name in ("corpora/wiki-test.txt", "recipes/gptq-w4g128.toml", "bounds/tiny.toml"):
            assert z.read(CAL + name) == (ROOT / "calibration" / name).read_bytes()


def test_unpacked_wheel_finds_its_recipes_and_datasets(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = """
import json, mixtral_quant
from mixtral_quant.recipe import BOUNDS, RECIPES, load_recipe, shipped_recipes
from mixtral_quant.eval.data import load_dataset
r = load_recipe("gptq-w4g128")
data = {n: load_dataset(n) for n in ("wiki-test", "moby-dick")}
print(json.dumps({
    "package": mixtral_quant.__file__, "recipes": str(RECIPES), "bounds": (BOUNDS / "tiny.toml").is_file(),
    "shipped": shipped_recipes(), "corpus": str(r.calibration.path()), "corpus_file": r.calibration.path().is_file(),
    "datasets": {n: [d.source, d.tokens.numel()] for n, d in data.items()},
}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    installed = site / "mixtral_quant"
    assert got["package"] == str(installed / "__init__.py")
    assert got["recipes"] == str(installed / "calibration" / "recipes")
    assert got["bounds"] and got["corpus_file"]
    assert got["corpus"] == str(installed / "calibration" / "corpora" / "wiki-train.txt")
    assert got["shipped"] == sorted(p.stem for p in (ROOT / "calibration" / "recipes").glob("*.toml"))
    assert got["datasets"]["wiki-test"][0] == "calibration/corpora/wiki-test.txt"
    assert got["datasets"]["moby-dick"][0] == "calibration/corpora/moby-dick.txt"
    assert got["datasets"]["wiki-test"][1] > 200_000 and got["datasets"]["moby-dick"][1] > 300_000


def test_moby_dick_is_a_named_dataset_like_wiki_test() -> None:
    """"moby-dick" reads calibration/corpora/moby-dick.txt as wiki-test reads its file: BOS + the whole text."""
    from mixtral_quant.eval.data import MOBY_DICK, load_dataset

    named, as_file = load_dataset("moby-dick"), load_dataset(MOBY_DICK)
    assert (named.name, named.source) == ("moby-dick", "calibration/corpora/moby-dick.txt")
    assert named.sha256 == as_file.sha256 == "a0360ad225f10b773b176e2cbd29e2181564cd89826e5a6ce89dd3fd16f9df48"
    assert named.tokens.tolist() == as_file.tokens.tolist() and named.tokens[0] == 1
    assert len(named.tokens) == 315_752 + 1  # PROVENANCE.md's token count, plus BOS


def test_ci_gate_bounds_every_shipped_recipe() -> None:
    """The CI gate (calibration/bounds/tiny.toml) names each shipped recipe: a variant without bounds
    would be evaluated by the demo but never gated."""
    from mixtral_quant.eval.report import load_bounds
    from mixtral_quant.recipe import BOUNDS, shipped_recipes

    assert sorted(load_bounds(BOUNDS / "tiny.toml")) == sorted(shipped_recipes())


def test_quantize_does_not_import_the_exporters() -> None:
    """``mixtral-quant quantize`` loads the pipeline only: no ONNX, onnxruntime or GGUF code."""
    code = ("import sys, mixtral_quant.pipeline, mixtral_quant.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('mixtral_quant.export', 'onnx', 'gguf'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
