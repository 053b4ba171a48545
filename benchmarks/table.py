"""One benchmark table: rows with the figures of both sides, the ratio, and the repeats behind each median.

A row compares "ours" with a peer measured in the same run. ``ratio`` is ours / peer of the row's
``metric`` (its direction is in ``better``). A peer that cannot run here (not installed) is a
``skipped`` row carrying the install line; a row this run did not measure says ``not measured``
and why. No row ever fails the run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

Figure = float | int | str | None


class Status(str, Enum):
    OK = "ok"
    SKIPPED = "skipped"  # the peer is not available here; ``note`` has the install line
    NOT_MEASURED = "not measured"  # left out of this run (mode, time); ``note`` says why


@dataclass
class Row:
    section: str
    name: str  # what ours is
    peer: str  # what it is compared with
    metric: str  # the figure the ratio is taken of
    better: str  # "lower" or "higher"
    ours: dict[str, Figure] = field(default_factory=dict)
    theirs: dict[str, Figure] = field(default_factory=dict)
    repeats: int = 0  # measurements the medians are over (1: a single run)
    status: Status = Status.OK
    note: str = ""

    @property
    def ratio(self) -> float | None:
        a, b = self.ours.get(self.metric), self.theirs.get(self.metric)
        if isinstance(a, int | float) and isinstance(b, int | float) and b:
            return float(a) / float(b)
        return None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Row:
        keep = {k: v for k, v in d.items() if k != "ratio"}
        return Row(**{**keep, "status": Status(d["status"])})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["ratio"] = self.ratio
        return d


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _fmt(v: Figure) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _figures(d: dict[str, Figure]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in d.items()) or "-"


HEADER = ["section", "ours", "peer", "ratio (ours/peer)", "ours: figures", "peer: figures", "repeats", "status"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f} ({r.metric}, {r.better} is better)"
        status = r.status.value + (f": {r.note}" if r.note else "")
        out.append([r.section, r.name, r.peer, ratio, _figures(r.ours), _figures(r.theirs), str(r.repeats), status])
    return out


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        f"# mixtral-quant benchmarks ({meta['mode']} mode)",
        "",
        f"Run {meta['started']} - {meta['finished']} ({meta['seconds']:.0f} s) on {meta['machine']['cpu']}, "
        f"{meta['machine']['cores']} cores, {meta['machine']['memory_gib']} GiB, torch {meta['machine']['torch']}; "
        f"tiny model sha256 {meta.get('tiny_model_sha256')}.",
        "",
    ]
    lines += [f"- {n}" for n in meta.get("notes", [])]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for cells in table_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plain(rows: list[Row]) -> str:
    cells = [HEADER, *table_rows(rows)]
    widths = [min(60, max(len(c[i]) for c in cells)) for i in range(len(HEADER))]
    return "\n".join("  ".join(c[i][: widths[i]].ljust(widths[i]) for i in range(len(HEADER))) for c in cells)


def earlier_rows(folder: Path, sections: set[str]) -> tuple[list[Row], dict[str, Any] | None]:
    """Rows of ``sections`` from the last latest.json in ``folder`` (to keep them beside a partial rerun)."""
    path = folder / "latest.json"
    if not path.is_file():
        return [], None
    old = json.loads(path.read_text())
    return [Row.from_dict(r) for r in old["rows"] if r["section"] in sections], old


def write(rows: list[Row], meta: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "latest.json", folder / "latest.md"
    js.write_text(json.dumps({**meta, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    md.write_text(markdown(rows, meta))
    return [js, md]
