"""Artifact folders: a manifest of sha256 hashes, verification, and complete-or-absent writes.

Every folder the tool writes is assembled under ``<out>.partial`` and renamed into place only when
complete, so a folder named like an artifact is always whole. Its ``manifest.json`` records the
sha256 of each file, the tool's version, the recipe, the source checkpoint's file hashes and the
calibration data's hash; ``verify`` checks it and names any file that changed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from . import __version__
from .errors import IntegrityError, MixtralQuantError

MANIFEST = "manifest.json"
STATE = "state.json"  # a run's commit point in its .partial folder; gone once the artifact is complete
# Files at the top of an artifact that describe one run (timings) rather than the artifact; not hashed.
# The same names in a subfolder are ordinary files and hashed like any other.
RUN_FILES = frozenset({MANIFEST, "run_log.json"})
# Written first into every work folder: marks a .partial folder as this tool's, so --overwrite and
# --resume never delete or reuse a folder someone else made. Removed before publishing.
RUN_MARK = ".mixtral-quant-run"
FORMATS = ("mixtral-quant-artifact",)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_files(folder: Path) -> list[Path]:
    """Every file of the folder tree but the top-level run files (and the work-folder mark)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in RUN_FILES | {RUN_MARK})


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
    if d.get("format") not in FORMATS:
        raise IntegrityError(f"{path} is not a mixtral-quant manifest (format {d.get('format')!r})")
    return d


def check_source(folder: Path, quantized: bool, no_verify: bool = False) -> None:
    """Verify a folder about to be read: an artifact's files against its manifest. A quantized folder
    without a manifest (not written by this tool, or damaged) is refused unless ``no_verify``."""
    if no_verify:
        return
    if (folder / MANIFEST).exists():
        verify(folder)
    elif quantized:
        raise IntegrityError(
            f"{folder} is quantized but has no {MANIFEST}, so its files cannot be checked: "
            "pass --no-verify to read it unchecked"
        )


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


def is_ours(folder: Path) -> bool:
    """A folder this tool wrote: an artifact or export with our manifest."""
    try:
        return folder.is_dir() and not folder.is_symlink() and read_manifest(folder) is not None
    except IntegrityError:
        return False


def _is_our_work(work: Path) -> bool:
    return work.is_dir() and not work.is_symlink() and ((work / RUN_MARK).is_file() or not any(work.iterdir()))


def check_out_path(out: Path) -> None:
    """An output path must name a folder of its own: not empty, '.', '..' or the root."""
    if not str(out) or out.name in ("", ".", "..") or out.resolve() == Path(out.resolve().anchor):
        raise MixtralQuantError(f"--out {str(out)!r} does not name a new folder: give one such as exports/gptq")


def check_output(out: Path, overwrite: bool, resume: bool, source: Path | None = None) -> None:
    """Refuse, before any work, to clobber a finished artifact, an unfinished run, the source itself,
    or anything this tool did not write."""
    check_out_path(out)
    work = partial_dir(out)
    if source is not None:
        src = source.resolve()
        for target in (out.resolve(), work.resolve()):
            if target == src or target in src.parents:
                raise MixtralQuantError(f"--out {out} would replace the source model {source}: choose another folder")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MixtralQuantError(f"{out} already exists: choose another --out or pass --overwrite")
    if (out.exists() or out.is_symlink()) and not is_ours(out):
        raise MixtralQuantError(f"{out} is not an artifact written by mixtral-quant (no valid {MANIFEST}): "
                                "--overwrite replaces only those; choose another --out")
    if (work.exists() or work.is_symlink()) and not _is_our_work(work):
        raise MixtralQuantError(f"{work} was not made by a mixtral-quant run: move it away or choose another --out")
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
    (work / RUN_MARK).touch()
    remove_scraps(work)
    return work


def read_state(work: Path, identity: dict[str, Any], fields: dict[str, type], started_with: str) -> dict[str, Any]:
    """The commit point (``state.json``) of an interrupted run in ``work``: parsed, each of ``fields``
    present with its type, and started from the same ``identity`` (what changes the output's bytes:
    source files, settings, tool version); IntegrityError when damaged, MixtralQuantError when it
    belongs to ``started_with`` (another source or settings)."""
    damaged = f"{work / STATE} is damaged"
    try:
        state = json.loads((work / STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IntegrityError(f"{damaged} (not JSON): start over with --overwrite") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in fields.items()):
        raise IntegrityError(f"{damaged} (fields missing): start over with --overwrite")
    if state.get("identity") != identity:
        raise MixtralQuantError(f"{work} was started with {started_with}: start over with --overwrite")
    return state


def remove_scraps(folder: Path) -> None:
    """Delete half-written files a killed run leaves: ours end in ``.tmp``; safetensors (0.8) writes
    through a ``.tmpXXXXXX`` file it renames when done."""
    for scrap in {*folder.glob("*.tmp"), *folder.glob(".tmp*")}:
        if scrap.is_file():
            scrap.unlink()


def publish(work: Path, out: Path) -> Path:
    """Move a complete work folder into place (replacing an old artifact only now)."""
    (work / RUN_MARK).unlink(missing_ok=True)
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


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUT (and so on OUT.partial) for one run: a second run that writes
    the same folder at the same time gets a clear error instead of mixing its files in.

    The lock is ``flock`` on ``.OUT.lock`` beside OUT, removed when the run ends; a lock file that was
    removed between our open and our flock is retried, so two runs never both believe they hold it."""
    check_out_path(out)
    path = out.with_name(f".{out.name}.lock")
    if not path.parent.exists():  # the folder that will hold OUT (a file there fails as Not a directory)
        path.parent.mkdir(parents=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MixtralQuantError(
                f"another mixtral-quant run is writing {out} (it holds {path}): wait for it to end, "
                "or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
TOO_LARGE = (errno.EFBIG,)


@contextmanager
def run_errors(out: Path) -> Iterator[None]:
    """An OSError of a long run becomes one line that says what to do; finished work stays in
    ``<out>.partial`` for --resume."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        what = _os_error_text(e)
        work = partial_dir(out)
        if work.exists():
            raise MixtralQuantError(f"{what} while writing {work}: fix it, then continue with --resume") from None
        raise MixtralQuantError(what) from None


def _os_error_text(e: Exception) -> str:
    """One line for an OSError, or a safetensors error that wraps one ('... os error 28')."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code in DISK_FULL:
        return f"the disk is full ({os.strerror(code)})"
    if code in TOO_LARGE:
        return f"a file grew past the size limit ({os.strerror(code)}, see ulimit -f)"
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
