"""Where the tool's shipped data lives: recipes, bounds and corpora. Light to import (no torch, no
bitsandbytes), so the command line can list the recipes in its help before anything heavy loads."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _calibration_dir() -> Path:
    """The folder of recipes/, bounds/ and corpora/.

    The repository keeps calibration/ at its top level; pyproject's package-dir installs it as the package
    ``mixtral_quant.calibration`` with what the tool reads at run time (recipes, bounds, wiki-train,
    wiki-test, moby-dick, PROVENANCE.md; not the training-only corpora), which a wheel and an editable
    install both import. Without it (an editable install made before that mapping, or a checkout on
    PYTHONPATH): the checkout's calibration/.
    """
    try:
        return Path(str(resources.files("mixtral_quant.calibration")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "calibration"


CALIBRATION = _calibration_dir()
RECIPES = CALIBRATION / "recipes"
CORPORA = CALIBRATION / "corpora"
BOUNDS = CALIBRATION / "bounds"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.toml"))
