"""Evaluation datasets as one token stream: BOS followed by the tokens of the whole text, no EOS.

* ``wiki-test``: the committed ``calibration/corpora/wiki-test.txt`` (40 Wikipedia articles, about
  249k Mixtral tokens; see its PROVENANCE.md), the project's standard perplexity set;
* ``moby-dick``: the committed ``calibration/corpora/moby-dick.txt`` (Melville's novel, public domain,
  about 316k tokens, held out from the tiny model's training like wiki-test; "= Heading =" lines too);
* a path to a UTF-8 ``.txt`` file;
* ``wikitext2``: WikiText-2 (raw) test split through the ``datasets`` library, joined with
  "\\n\\n" as in the Hugging Face perplexity guide. Used only when ``datasets`` is installed and
  the split is cached (then read offline) or huggingface.co answers within a few seconds;
  otherwise a :class:`DatasetError` says how to get it, or to use ``wiki-test``.

The whole text is encoded in one sentencepiece call (no per-line or per-article splitting).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.recipe import CORPORA
from mixtral_quant.textfile import read_text
from mixtral_quant.tokenizer import Tokenizer

WIKI_TEST = CORPORA / "wiki-test.txt"
MOBY_DICK = CORPORA / "moby-dick.txt"
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny-mixtral" / "tokenizer.model"
WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
TOKENIZATION = "BOS + sentencepiece encoding of the whole text as one string; no EOS"


class DatasetError(MixtralQuantError):
    """A dataset cannot be found, read or fetched."""


class Builtin(str, Enum):
    WIKI_TEST = "wiki-test"
    MOBY_DICK = "moby-dick"
    WIKITEXT2 = "wikitext2"


# The shipped text datasets: the file read, and the source named in reports (the same in a checkout and
# an installed wheel, which holds these files under mixtral_quant/calibration/corpora/).
SHIPPED = {
    Builtin.WIKI_TEST.value: (WIKI_TEST, "calibration/corpora/wiki-test.txt"),
    Builtin.MOBY_DICK.value: (MOBY_DICK, "calibration/corpora/moby-dick.txt"),
}


@dataclass(frozen=True)
class EvalDataset:
    name: str  # "wiki-test", "moby-dick", "wikitext2" or the file name
    source: str  # the file read, or the Hugging Face dataset
    sha256: str  # of the text (UTF-8)
    tokens: torch.Tensor  # int64 [N], BOS first
    tokenizer: str  # path of the tokenizer.model used
    tokenization: str = TOKENIZATION
    tokens_in_text: int | None = None  # set when ``tokens`` is the head of a longer stream (--max-tokens)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "tokens": len(self.tokens),
            "tokenizer": self.tokenizer,
            "tokenization": self.tokenization,
        }
        if self.tokens_in_text is not None:
            d["tokens_in_text"] = self.tokens_in_text
        return d

    def head(self, max_tokens: int | None) -> EvalDataset:
        """The first ``max_tokens`` tokens (BOS included) of the stream; all of it for None or more."""
        if max_tokens is None or max_tokens >= len(self.tokens):
            return self
        if max_tokens < 2:
            raise DatasetError(f"--max-tokens {max_tokens}: scoring needs at least 2 tokens (BOS and one more)")
        return replace(self, tokens=self.tokens[:max_tokens], tokens_in_text=len(self.tokens))


def tokenizer_for(model_folder: Path | None) -> Path:
    """The model folder's tokenizer.model, else the Mixtral tokenizer shipped with the package."""
    if model_folder is not None and (model_folder / "tokenizer.model").is_file():
        return model_folder / "tokenizer.model"
    return DEFAULT_TOKENIZER


def encode(text: str, tokenizer: Path) -> torch.Tensor:
    """BOS + the tokens of ``text`` (int64 [N])."""
    return torch.tensor(Tokenizer(tokenizer).encode(text, bos=True, eos=False), dtype=torch.int64)


def load_dataset(spec: str | Path, tokenizer: Path = DEFAULT_TOKENIZER) -> EvalDataset:
    """The token stream of ``spec``: "wiki-test", "moby-dick", "wikitext2" or a .txt path."""
    name = str(spec)
    if name in SHIPPED:
        path, source = SHIPPED[name]
        text = _read_text(path)
    elif name == Builtin.WIKITEXT2.value:
        text, source = _wikitext2_text(), "hf:{} {} split={}".format(*WIKITEXT2)
    else:
        path = Path(spec)
        if path.suffix != ".txt":
            raise DatasetError(f"dataset {name!r} is not wiki-test, moby-dick, wikitext2 or a path to a .txt file")
        text, source, name = _read_text(path), str(path), path.name
    if not text.strip():
        raise DatasetError(f"dataset {name} is empty")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return EvalDataset(name, source, digest, encode(text, tokenizer), str(tokenizer))


def _read_text(path: Path) -> str:
    return read_text(path, "dataset file", DatasetError)


def _hf_cached() -> bool:
    """Whether the WikiText dataset is in the Hugging Face hub or datasets cache."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    ds = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    return (hub / "datasets--Salesforce--wikitext").is_dir() or any(
        (ds / d).is_dir() for d in ("Salesforce___wikitext", "wikitext")
    )


def _reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _offline() -> Iterator[None]:
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE for the call (read by ``datasets`` when first imported)."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(dict.fromkeys(saved, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wikitext2_text() -> str:
    hint = "or evaluate on the committed set with --dataset wiki-test"
    if importlib.util.find_spec("datasets") is None:
        raise DatasetError(f"wikitext2 needs the 'datasets' library: pip install datasets, {hint}")
    cached = _hf_cached()
    if not cached and not _reachable():
        raise DatasetError(
            "WikiText-2 is not in the Hugging Face cache and huggingface.co cannot be reached: run "
            f"`python -c \"import datasets; datasets.load_dataset{WIKITEXT2[:2]!r}\"` where the network is open "
            f"(then copy ~/.cache/huggingface), {hint}"
        )
    with _offline() if cached else nullcontext():
        import datasets

        try:
            split = datasets.load_dataset(WIKITEXT2[0], WIKITEXT2[1], split=WIKITEXT2[2])
        except Exception as e:  # datasets raises many types (connection, missing cache, ...)
            raise DatasetError(f"WikiText-2 could not be loaded ({type(e).__name__}: {e}), {hint}") from None
    return "\n\n".join(split["text"])
