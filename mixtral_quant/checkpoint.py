"""Hugging Face safetensors checkpoints: reads one tensor (or one layer) at a time, sharded atomic
writes, and strict loading into the reference model.

Reading never loads a whole file: each ``get`` reads one tensor's bytes at its offset straight into
a new tensor, so a 93 GB Mixtral-8x7B is read layer by layer and a process holds only the tensors
it keeps (the file's pages stay in the page cache, never in the resident set as a mapping's would).
Loading is strict (nanoGPT's ``from_pretrained``): a missing, unexpected or mis-shaped tensor is
an error that names it, never a random weight. Every read refuses a float tensor holding NaN or Inf
(:func:`check_finite`) and float formats below 16 bits (F8_E4M3, F8_E5M2, F8_E8M0, ...): an 8-bit
float weight is only meaningful with scales this tool does not read, so it is named, not widened.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MixtralConfig, read_config_json
from .errors import CheckpointError, ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "tiny-mixtral"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024


def resolve_model(model: str | Path | None) -> Path:
    """The model folder a command works on: the embedded tiny model when none is given."""
    path = DEFAULT_MODEL if model is None else Path(model)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a Hugging Face model folder (config.json + *.safetensors)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: give the model folder, not a file inside it")
    return path


def _safe_child(folder: Path, name: str) -> Path:
    """A file named by an index must stay inside its folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise CheckpointError(f"{folder / INDEX_FILE} names a file outside its folder: {name!r}")
    return folder / name


def _check_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The data offset and header of a safetensors file; a truncated or corrupted one is an error naming it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated (shorter than a safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path} is corrupted or truncated (header of {n} bytes in a {size}-byte file)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path} is corrupted (its safetensors header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupted (its safetensors header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path} is corrupted (tensor {name!r} has no valid data_offsets)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return 8 + n, header


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}  # fmt: skip


class CheckpointReader:
    """Tensors of a checkpoint folder by name, read one at a time; use as a context manager or call close()."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = resolve_model(folder)
        self.where: dict[str, Path] = {}
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                raise CheckpointError(f"{index} is not a valid index (needs a 'weight_map' object)") from None
            for name, file in weight_map.items():
                self.where[name] = _safe_child(self.folder, file)
        elif single.is_file():
            self.where = {}
        else:
            raise CheckpointError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.files = sorted(set(self.where.values())) if self.where else [single]
        for f in self.files:
            if not f.is_file():
                raise CheckpointError(f"shard {f.name!r} named in {INDEX_FILE} is missing from {self.folder}")
        self._layout = {f: _check_header(f) for f in self.files}
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._open()
        if not self.where:
            self.where = {n: single for n in self._handles[single].keys()}  # noqa: SIM118
        else:
            for name, f in self.where.items():
                if name not in self._handles[f].keys():  # noqa: SIM118
                    raise CheckpointError(f"{INDEX_FILE} places {name!r} in {f.name!r}, which does not hold it")

    def _open(self) -> None:
        for f in self.files:
            try:
                self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for bad files
                raise CheckpointError(f"{f} cannot be read as safetensors: {e}") from None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    @property
    def names(self) -> list[str]:
        return sorted(self.where)

    def _slice(self, name: str) -> Any:
        if name not in self.where:
            raise CheckpointError(f"tensor {name} is missing from {self.folder}")
        return self._handles[self.where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._slice(name).get_dtype())

    def nbytes(self, name: str) -> int:
        t = self._slice(name)
        n = 1
        for s in t.get_shape():
            n *= s
        return n * _DTYPE_BYTES.get(str(t.get_dtype()), 1)

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"tensor {name} is missing from {self.folder}")
        t = self._read(name)
        check_finite(name, t, self.where[name])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def _read(self, name: str) -> torch.Tensor:
        """The tensor's bytes, read at its offset into a new tensor (no mapping stays behind)."""
        path = self.where[name]
        start, header = self._layout[path]
        info = header.get(name)
        stored = str(info.get("dtype")) if isinstance(info, dict) else None
        if stored is not None and stored not in _TORCH_DTYPES and stored.startswith("F"):
            raise CheckpointError(
                f"tensor {name} in {path} is stored as {stored}, a float format below 16 bits that this tool does "
                "not read (its scales, if any, live elsewhere): convert the checkpoint to BF16, F16 or F32 first"
            )
        dtype = _TORCH_DTYPES.get(stored) if stored is not None else None
        if dtype is None or not isinstance(info, dict):  # no plain byte layout here: safetensors decodes it
            try:
                return self._handles[path].get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"tensor {name} in {path.name} cannot be read: {e}") from None
        lo, hi = info["data_offsets"]
        shape = [int(d) for d in info.get("shape", [])]
        buf = bytearray(hi - lo)
        with path.open("rb") as f:
            f.seek(start + lo)
            got = f.readinto(buf)
        if got != hi - lo or hi - lo != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"tensor {name} in {path.name} cannot be read: {hi - lo} bytes for shape {shape}")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def layer_state(self, i: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors of decoder layer i, named relative to ``model.layers.{i}.``."""
        prefix = f"model.layers.{i}."
        return {n[len(prefix) :]: self.get(n, dtype) for n in self.names if n.startswith(prefix)}


_DTYPE_BYTES = {name: dtype.itemsize for name, dtype in _TORCH_DTYPES.items()}


def load_config(folder: str | Path) -> MixtralConfig:
    return MixtralConfig.load(resolve_model(folder))


def quantization_config(folder: str | Path) -> dict[str, Any] | None:
    """The 'quantization_config' section of a folder's config.json, if any."""
    qc = read_config_json(resolve_model(folder)).get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ConfigError(f"quantization_config in {folder}/config.json is not an object")
    return qc


def check_finite(name: str, t: torch.Tensor, where: Path) -> None:
    """CheckpointError naming the tensor when a float tensor holds NaN or Inf.

    Every tensor :meth:`CheckpointReader.get` returns has passed it, so the torch loader, the
    quantizer, the evaluator and the ONNX exporter refuse the same files with the same message.
    """
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"tensor {name} in {where} holds NaN or Inf values: the checkpoint is damaged")


def check_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], folder: Path) -> None:
    """CheckpointError when a tensor read by :meth:`CheckpointReader.get` (finite already) is mis-shaped."""
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name} in {folder} has shape {tuple(t.shape)}, the config needs {shape}")


def write_float_folder(out: Path, tensors: dict[str, torch.Tensor], template: Path, copied: Iterable[str],
                       drop: Iterable[str] = ("quantization_config",)) -> Path:
    """A float32 model folder ``out``: ``tensors`` as model.safetensors, ``template``'s config.json without
    the keys ``drop`` and with ``torch_dtype`` float32, and the ``copied`` files ``template`` has."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((template / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in copied:
        if (template / name).is_file():
            shutil.copyfile(template / name, out / name)
    return out


def write_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    folder: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors (consumed one at a time) as model.safetensors or numbered shards with an index.

    Each shard is written under a temporary name and renamed when complete; the index is written
    last. Tensors are held only until their shard is full.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush(k: int) -> None:
        tmp = folder / f".shard-{k:05d}.tmp"
        save_file(shards[k], str(tmp), metadata=meta)
        written.append(tmp)
        shards[k] = {}

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush(len(shards) - 1)
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.detach().contiguous().cpu()
        sizes[-1] += nbytes
        total += nbytes
        weight_map[name] = len(shards) - 1
    flush(len(shards) - 1)
    n = len(written)
    if n == 1:
        final = [folder / SINGLE_FILE]
    else:
        final = [folder / f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for tmp, dst in zip(written, final, strict=True):
        os.replace(tmp, dst)
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: final[k].name for name, k in sorted(weight_map.items())},
        }
        tmp_index = folder / (INDEX_FILE + ".tmp")
        tmp_index.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp_index, folder / INDEX_FILE)
    return final


def iter_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in model.state_dict().items():
        yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
