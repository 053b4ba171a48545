"""Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) built from a sentencepiece
tokenizer.model: what onnxruntime-genai and GPTQModel load beside a model.

og.Tokenizer (onnxruntime-genai 0.18) needs both tokenizer.json and tokenizer_config.json (either alone
fails to load). It encodes with onnxruntime-extensions' own BPE over tokenizer.json, not with the
tokenizers library; its C API cuts the text at the first NUL character. Decoding matches sentencepiece
from BOS on (generated sequences start there), but keeps the leading space of a sequence without BOS.

transformers cannot convert Mixtral's sentencepiece model (it returned a 3-token vocabulary), so
tokenizer.json is built here from tokenizer.model in the Llama layout: a normalizer that prepends "▁"
and turns spaces into "▁", BPE with byte fallback, merges ranked by the score of the merged piece
(sentencepiece merges by that score; ranking by piece id would merge the whitespace pieces "▁▁",
"▁▁▁▁", ... of score -1e9 first), and a pre-tokenizer that only onnxruntime-extensions notices
(:func:`build_tokenizer`). The ids equal sentencepiece's, except that "<s>", "</s>" and "<unk>" written
in the text become their special ids (as in Hugging Face's own Mixtral tokenizer.json), where
sentencepiece spells them out character by character.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.tokenizer import TOKENIZER_FILE

if TYPE_CHECKING:
    from tokenizers import Tokenizer as FastTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPACE = "▁"  # U+2581, sentencepiece's visible space
WORDS = " *[^ ]+| +"  # pre-tokenizer: a run of spaces and the word after it (or trailing spaces)
BPE_MODEL_TYPE = 2  # TrainerSpec.ModelType.BPE


class PieceType(IntEnum):
    """sentencepiece's ModelProto.SentencePiece.Type."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


SUPPORTED_TYPES = (PieceType.NORMAL, PieceType.UNKNOWN, PieceType.CONTROL, PieceType.BYTE)


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    type: PieceType

    @property
    def special(self) -> bool:
        return self.type in (PieceType.CONTROL, PieceType.UNKNOWN)


@dataclass(frozen=True)
class SentencePieceVocab:
    """The parts of a sentencepiece model that tokenizer.json needs; piece i has id i."""

    pieces: tuple[Piece, ...]
    unk: str
    bos: str
    eos: str


def read_sentencepiece(path: Path) -> SentencePieceVocab:
    """The vocabulary of a sentencepiece model, checked to be the Llama/Mistral kind this builder reproduces."""
    proto = sp_pb.ModelProto()  # type: ignore[attr-defined]  # generated protobuf class, no stubs
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise MixtralQuantError(f"{path} is not a sentencepiece model ({e})") from None
    t, n = proto.trainer_spec, proto.normalizer_spec
    types = {p.type for p in proto.pieces}
    expected = {
        "model_type BPE": t.model_type == BPE_MODEL_TYPE,
        "byte_fallback": t.byte_fallback,
        "identity normalizer": n.name == "identity" and not n.precompiled_charsmap,
        "add_dummy_prefix": n.add_dummy_prefix,
        "remove_extra_whitespaces off": not n.remove_extra_whitespaces,
        "whitespace as prefix": not t.treat_whitespace_as_suffix,
        "only normal, control, unknown and byte pieces": types <= {int(k) for k in SUPPORTED_TYPES},
        f"no {SPACE!r} inside a piece after another character": not any(
            SPACE in p.piece.lstrip(SPACE) for p in proto.pieces
        ),
    }
    missing = [k for k, ok in expected.items() if not ok]
    if missing:
        raise MixtralQuantError(
            f"{path} is not a Llama/Mistral-style sentencepiece model ({', '.join(missing)} expected): "
            "its tokenizer.json cannot be built here; copy the model's own tokenizer.json beside it"
        )
    pieces = tuple(Piece(p.piece, float(p.score), PieceType(p.type)) for p in proto.pieces)
    return SentencePieceVocab(pieces, str(t.unk_piece), str(t.bos_piece), str(t.eos_piece))


def bpe_merges(vocab: SentencePieceVocab) -> list[tuple[str, str]]:
    """Every (left, right) pair of pieces whose concatenation is a piece, ranked as sentencepiece merges:
    by the merged piece's score, highest first (ties: lower id first)."""
    normal = {p.text: i for i, p in enumerate(vocab.pieces) if p.type is PieceType.NORMAL}
    ranked = []
    for i, p in enumerate(vocab.pieces):
        if p.type is not PieceType.NORMAL:
            continue
        for cut in range(1, len(p.text)):
            left, right = p.text[:cut], p.text[cut:]
            if left in normal and right in normal:
                ranked.append((-p.score, i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(vocab: SentencePieceVocab) -> FastTokenizer:
    """A tokenizers.Tokenizer that encodes and decodes as the sentencepiece model does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ids = {p.text: i for i, p in enumerate(vocab.pieces)}
    bpe = models.BPE(vocab=ids, merges=bpe_merges(vocab), unk_token=vocab.unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    # The tokenizers library sees "▁" here, not spaces: one piece, a no-op. onnxruntime-extensions applies it
    # to the raw text instead of its default Llama regex, which splits "'m", "'t", "'s"... off a word
    # ("Mu'min" -> "'", "m", "in"); splitting before spaces is exact as no piece has "▁" inside a word.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORDS), behavior="isolated")
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(p.text, special=True, normalized=False) for p in vocab.pieces if p.special])
    bos = vocab.bos
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ids[bos])]
    )
    return tok


def tokenizer_config(vocab: SentencePieceVocab, context_length: int) -> dict[str, Any]:
    """tokenizer_config.json, read by onnxruntime-extensions and transformers.

    The class is PreTrainedTokenizerFast, which takes tokenizer.json as written. transformers 5 builds a
    LlamaTokenizer(Fast) from the vocabulary and merges alone, with its own Metaspace pre-tokenizer, and
    that one adds no "▁" to a text that starts with a space (" x" -> "▁x", where sentencepiece gives "▁▁x").
    """
    added = {
        str(i): {
            "content": p.text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, p in enumerate(vocab.pieces)
        if p.special
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": vocab.bos,
        "eos_token": vocab.eos,
        "unk_token": vocab.unk,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "spaces_between_special_tokens": False,
    }


def write_tokenizer_files(out_dir: Path, context_length: int) -> list[Path]:
    """tokenizer.json and tokenizer_config.json built from the folder's tokenizer.model, where missing."""
    written: list[Path] = []
    sp_file = out_dir / TOKENIZER_FILE
    wanted = [name for name in (TOKENIZER_JSON, TOKENIZER_CONFIG) if not (out_dir / name).is_file()]
    if not sp_file.is_file() or not wanted:
        return written
    vocab = read_sentencepiece(sp_file)
    if TOKENIZER_CONFIG in wanted:
        config = tokenizer_config(vocab, context_length)
        (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        written.append(out_dir / TOKENIZER_CONFIG)
    if TOKENIZER_JSON in wanted:
        if importlib.util.find_spec("tokenizers") is None:
            warnings.warn(
                f"{TOKENIZER_JSON} not written: the tokenizers package is missing "
                "(pip install 'mixtral-quant[genai]'); onnxruntime-genai's tokenizer needs it",
                stacklevel=2,
            )
            return written
        build_tokenizer(vocab).save(str(out_dir / TOKENIZER_JSON))
        written.append(out_dir / TOKENIZER_JSON)
    return written
