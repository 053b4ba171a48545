"""Reading the text files a user points at (datasets, calibration corpora, recipes, bounds) by one rule:
a regular file, at most ``MAX_TEXT_BYTES``, strict UTF-8; anything else is one line from the project's
error type, before any large allocation (a link to /dev/zero is refused, not read until memory runs out).
"""

from __future__ import annotations

import stat
from pathlib import Path

from .errors import MixtralQuantError

MAX_TEXT_BYTES = 256 * 2**20  # WikiText-103's training split is 540 MB; evaluation and calibration text is far less


def read_text(path: Path, what: str, error: type[MixtralQuantError] = MixtralQuantError,
              limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path`` (``what`` names it in messages: "dataset file", "calibration corpus")."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file")
    if info.st_size > limit:
        raise error(f"{what} {path} is {info.st_size / 2**20:.0f} MiB, more than the {limit // 2**20} MiB limit")
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror})") from None
    if len(data) > limit:
        raise error(f"{what} {path} is more than the {limit // 2**20} MiB limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None
