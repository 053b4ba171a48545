"""Where the bytes go: stored weights by component, bits per parameter, and peak memory.

* On disk: the bytes of every tensor in the checkpoint, grouped by ``model.component_of`` of its
  name (experts, attention, router, embeddings, norms). Packed codes, scales, zeros, g_idx and
  bitsandbytes quantization state all count as stored weights.
* In memory: the parameters and buffers of the loaded model, plus the tensors bitsandbytes keeps
  outside them (a ``Params4bit``'s quant_state: absmax, quant map, nested statistics; an
  ``Int8Params``' SCB), each storage counted once (tied weights are not counted twice).
* Bits per parameter: 8 x stored bytes / parameter count of the floating-point model of the same
  config, per component and in total (NF4 with double quantization is about 4.13).
* Peak memory of a phase (:class:`PeakMemory`), reported as a delta over what was in use when the
  phase began: on CUDA ``torch.cuda.max_memory_allocated`` (tensors of the caching allocator, not
  the CUDA context); on CPU the process's resident set size high-water mark (Linux VmHWM, reset
  through /proc/self/clear_refs at the start of the phase), or where that is not available a
  psutil sampler (every 5 ms: a lower bound). ``kind`` says which one was measured.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import torch
from torch import nn

from mixtral_quant.config import MixtralConfig
from mixtral_quant.model import COMPONENTS, by_component
from mixtral_quant.sizes import parameter_counts


def memory_bytes(model: nn.Module, prefix: str = "") -> dict[str, int]:
    """Bytes a loaded model (or a part of it whose Hub name is ``prefix``) holds per component.

    Parameters, buffers and bitsandbytes state are counted.
    """
    seen: set[tuple[str, int]] = set()  # (device, address): tied or shared tensors count once
    named: list[tuple[str, int]] = []

    def add(name: str, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        key = (str(t.device), t.data_ptr())
        if key not in seen:
            seen.add(key)
            named.append((name, t.numel() * t.element_size()))

    for name, p in model.named_parameters(prefix, remove_duplicate=False):
        add(name, p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for key, value in state.as_dict(packed=False).items():
                if isinstance(value, torch.Tensor):
                    add(f"{name}.{key}", value)
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            add(f"{name}.SCB", scb)
    for name, b in model.named_buffers(prefix, remove_duplicate=False):
        add(name, b)
    return by_component(named)


def bits_per_parameter(stored: dict[str, int], params: dict[str, int]) -> dict[str, float | None]:
    """8 x bytes / parameters per component and as ``total`` (None for a component with no parameters)."""
    out: dict[str, float | None] = {c: (8 * stored[c] / params[c] if params[c] else None) for c in COMPONENTS}
    out["total"] = 8 * sum(stored.values()) / sum(params.values())
    return out


class PeakKind(str, Enum):
    CUDA_MAX_ALLOCATED = "cuda_max_memory_allocated"
    CPU_RSS_HIGH_WATER = "cpu_rss_high_water_mark"
    CPU_RSS_SAMPLED = "cpu_rss_sampled_5ms"


@dataclass(frozen=True)
class PeakMeasure:
    delta_bytes: int  # peak during the phase minus use at its start
    peak_bytes: int
    start_bytes: int
    kind: PeakKind

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_high_water() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0); False if not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return "VmHWM" in _STATUS.read_text()
    except OSError:
        return False


def _high_water() -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("VmHWM missing from /proc/self/status")


class PeakMemory:
    """Context manager measuring the peak memory of a phase on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.result: PeakMeasure | None = None
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._sampled = 0
        self._thread: threading.Thread | None = None
        self.kind = PeakKind.CPU_RSS_SAMPLED

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, self._process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = PeakKind.CUDA_MAX_ALLOCATED
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._process.memory_info().rss
        if _reset_high_water():
            self.kind = PeakKind.CPU_RSS_HIGH_WATER
        else:
            self._sampled = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.kind is PeakKind.CUDA_MAX_ALLOCATED:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind is PeakKind.CPU_RSS_HIGH_WATER:
            peak = _high_water()
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._sampled, self._process.memory_info().rss)
        self.result = PeakMeasure(max(peak - self._start, 0), peak, self._start, self.kind)


@dataclass
class MemoryReport:
    disk_bytes: dict[str, int] | None  # per component; None for a model not read from disk
    memory_bytes: dict[str, int]  # per component, as loaded
    fp_parameters: dict[str, int]  # per component, of the floating-point model
    bits_per_parameter: dict[str, float | None]  # of the stored weights (disk, else memory) + "total"
    peak: PeakMeasure | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        """Total stored weight bytes: on disk when known, else in memory."""
        return sum((self.disk_bytes or self.memory_bytes).values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak"] = self.peak.to_dict() if self.peak else None
        d["weight_bytes"] = self.weight_bytes
        return d


def memory_report(
    cfg: MixtralConfig,
    in_memory: dict[str, int],
    disk_tensors: Iterable[tuple[str, int]] | None = None,
    peak: PeakMeasure | None = None,
    notes: list[str] | None = None,
) -> MemoryReport:
    """Memory by component of a model (``in_memory`` from :func:`memory_bytes`) and, when given as
    (name, nbytes) pairs, of its checkpoint; bits per parameter use the checkpoint when given."""
    disk = by_component(disk_tensors) if disk_tensors is not None else None
    params = parameter_counts(cfg)
    return MemoryReport(disk, in_memory, params, bits_per_parameter(disk or in_memory, params), peak, notes or [])
