"""Artifact folders: a manifest of sha256 hashes, verification, and complete-or-absent writes.

Every folder the tool writes is assembled under ``<out>.partial`` and renamed into place only when
complete, so a folder named like an artifact is always whole. Its ``manifest.json`` records the
sha256 of each file, the tool's version, the recipe, the source checkpoint's file hashes and the
calibration data's hash; ``verify`` checks it and names any file that changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __version__
from .errors import IntegrityError, MixtralQuantError

MANIFEST = "manifest.json"
STATE = "state.json"  # a run's commit point in its .partial folder; gone once the artifact is complete
# Files that describe one run (timings) rather than the artifact; not hashed.
RUN_FILES = frozenset({MANIFEST, "run_log.json"})


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in RUN_FILES)


def write_manifest(folder: Path, extra: dict[str, Any]) -> Path:
    """Hash every file of the folder into manifest.json (deterministic: no timestamps)."""
    manifest = {
        "format": "mixtral-quant-artifact",
        "version": 1,
        "tool_version": __version__,
        "files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in artifact_files(folder)},
        **extra,
    }
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IntegrityError(f"{path} is not valid JSON: the artifact is damaged") from None
    if not isinstance(d, dict) or not isinstance(d.get("files"), dict):
        raise IntegrityError(f"{path} has no 'files' table: the artifact is damaged")
    return d


def verify(folder: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; raise IntegrityError naming the first problem."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise IntegrityError(f"{folder} has no {MANIFEST}: it was not written by mixtral-quant, or is incomplete")
    root = folder.resolve()
    for rel, digest in sorted(manifest["files"].items()):
        path = (folder / rel).resolve()
        if root not in path.parents:
            raise IntegrityError(f"{MANIFEST} names a file outside the artifact: {rel!r}")
        if not path.is_file():
            raise IntegrityError(f"{rel} is listed in {MANIFEST} but missing from {folder}")
        if sha256_file(path) != digest:
            raise IntegrityError(f"{rel} in {folder} was modified after it was written (sha256 differs)")
    listed = set(manifest["files"])
    extra = [p.relative_to(folder).as_posix() for p in artifact_files(folder)]
    unknown = sorted(set(extra) - listed)
    if unknown:
        raise IntegrityError(f"{folder} holds files its manifest does not list: {', '.join(unknown[:3])}")
    return manifest


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_output(out: Path, overwrite: bool, resume: bool, source: Path | None = None) -> None:
    """Refuse, before any work, to clobber a finished artifact, an unfinished run or the source itself."""
    work = partial_dir(out)
    if source is not None:
        src = source.resolve()
        for target in (out.resolve(), work.resolve()):
            if target == src or target in src.parents:
                raise MixtralQuantError(f"--out {out} would replace the source model {source}: choose another folder")
    if out.exists() and not overwrite:
        raise MixtralQuantError(f"{out} already exists: choose another --out or pass --overwrite")
    if work.exists() and not resume and not overwrite:
        raise MixtralQuantError(
            f"{work} holds an unfinished run: continue it with --resume, or start over with --overwrite"
        )
    if resume and not work.exists():
        raise MixtralQuantError(f"nothing to resume: {work} does not exist")


def prepare_output(out: Path, overwrite: bool, resume: bool, source: Path | None = None) -> Path:
    """The work folder for ``out``; refuses to clobber a finished artifact, an unfinished run or the source."""
    check_output(out, overwrite, resume, source)
    work = partial_dir(out)
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    remove_scraps(work)
    return work


def remove_scraps(folder: Path) -> None:
    """Delete half-written files a killed run leaves: ours end in ``.tmp``; safetensors (0.8) writes
    through a ``.tmpXXXXXX`` file it renames when done."""
    for scrap in {*folder.glob("*.tmp"), *folder.glob(".tmp*")}:
        if scrap.is_file():
            scrap.unlink()


def publish(work: Path, out: Path) -> Path:
    """Move a complete work folder into place (replacing an old artifact only now)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old)
    else:
        os.replace(work, out)
    return out


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def run_errors(out: Path) -> Iterator[None]:
    """An OSError of a long run becomes one line that says what to do; finished work stays in
    ``<out>.partial`` for --resume."""
    try:
        yield
    except OSError as e:
        what = f"the disk is full ({e.strerror})" if e.errno in DISK_FULL else (
            f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e))
        work = partial_dir(out)
        if work.exists():
            raise MixtralQuantError(f"{what} while writing {work}: fix it, then continue with --resume") from None
        raise MixtralQuantError(what) from None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
