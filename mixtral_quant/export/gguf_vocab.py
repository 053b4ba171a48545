"""The tokenizer as llama.cpp's SentencePiece ("llama") vocabulary: pieces, scores and token types
read from tokenizer.model, the way convert_hf_to_gguf.py reads them, plus the chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.tokenizer import Tokenizer

TYPES = gguf.TokenType


@dataclass
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    chat_template: str | None


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """The vocabulary of ``folder``'s tokenizer.model, padded to the model's ``vocab_size``."""
    sp = Tokenizer(folder).sp
    if sp.vocab_size() > vocab_size:
        raise MixtralQuantError(f"{folder}'s tokenizer has {sp.vocab_size()} pieces but the model only "
                                f"{vocab_size} embeddings")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TYPES.UNUSED)] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = float(sp.get_score(i))
        kind = TYPES.NORMAL
        if sp.is_unknown(i):
            kind = TYPES.UNKNOWN
        elif sp.is_control(i):
            kind = TYPES.CONTROL
        elif sp.is_unused(i):
            kind = TYPES.UNUSED
        elif sp.is_byte(i):
            kind = TYPES.BYTE
        types[i] = int(kind)
    return Vocab(tokens, scores, types, int(sp.bos_id()), int(sp.eos_id()), int(sp.unk_id()),
                 _chat_template(folder))


def _chat_template(folder: Path) -> str | None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise MixtralQuantError(f"{path} is not a JSON object") from None
    return template if isinstance(template, str) else None


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos)
    writer.add_eos_token_id(vocab.eos)
    writer.add_unk_token_id(vocab.unk)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
