"""The real Mixtral tokenizer (sentencepiece) and Mistral's Instruct chat format.

Chat turns are laid out as Mistral documents them, each segment tokenised on its own without
BOS/EOS: ``<s>[INST] user [/INST] answer</s>[INST] next [/INST]``.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import MixtralQuantError

TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise MixtralQuantError(
                f"no {TOKENIZER_FILE} at {p.parent}: copy the model's sentencepiece tokenizer there"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(p))
        except (RuntimeError, OSError) as e:
            raise MixtralQuantError(f"{p} is not a sentencepiece model ({e})") from None
        self.path = p

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from invalid UTF-8 on the command line
            raise MixtralQuantError(f"the text is not valid Unicode (position {e.start}): pass UTF-8 text") from None
        ids: list[int] = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return str(self.sp.decode(ids))

    def chat(self, turns: list[tuple[str, str | None]]) -> list[int]:
        """Token ids of (user, answer) turns; the last answer is None for the turn to complete."""
        ids = [self.bos_id]
        for i, (user, answer) in enumerate(turns):
            ids += self.encode(f"[INST] {user} [/INST]", bos=False)
            if answer is not None:
                ids += [*self.encode(answer, bos=False), self.eos_id]
            elif i != len(turns) - 1:
                raise MixtralQuantError("only the last chat turn may be without an answer")
        return ids
