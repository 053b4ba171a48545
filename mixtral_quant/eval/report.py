"""The evaluation report (JSON, Markdown, HTML) and the regression gate.

JSON schema, ``schema_version`` 1 (a field is added: same version; renamed or changed: version + 1)::

    schema_version  1
    created         ISO-8601 UTC time; tool_version: mixtral_quant.__version__
    dataset         {name, source, sha256 (of the text), tokens, tokenizer, tokenization}
    settings        {ctx, stride, device, dtype, layer_sequential, torch}
    baseline, variants[]   one model each:
      name, path, role ("baseline" | "variant"), model_type ("mixtral" | "mistral"),
      quantization  config.json's quantization_config, or null for a floating-point model
      perplexity    {ppl, nll_sum (nats), tokens_scored, windows, ctx, stride, bos, layer_sequential}
      ppl_ratio     ppl / baseline ppl (1.0 for the baseline)
      memory        {disk_bytes, memory_bytes, fp_parameters: per component (experts, attention,
                     router, embeddings, norms); bits_per_parameter: per component + total (stored
                     bits / parameters of the fp model); weight_bytes: total stored bytes (disk if
                     known); peak: {delta_bytes, peak_bytes, start_bytes, kind} or null; notes}
      speed         {prefill_tokens_per_s, decode_tokens_per_s, prefill_tokens,
                     decode_prompt_tokens, decode_steps, repeats, device} or null (not measured)
      comparison    variants only, else null: {kl_mean (nats, KL(baseline || variant)),
                     top1_changed (share), router_agreement (share per MoE layer, null without
                     MoE), tokens, windows}
    gate            null without a bounds file, else one entry per bound:
                    {variant, bound, limit, measured (null if not measurable), passed}

Written atomically (temp file + rename): ``report.json``, ``report.md``, ``report.html`` (inline SVG plots).

Bounds file (TOML), one table per variant name (the variant folder's name)::

    [variants.tiny-nf4]
    max_ppl_ratio = 1.10          # variant ppl / baseline ppl
    max_weight_bytes = 9_000_000  # total stored weight bytes (weight_bytes)
    min_router_agreement = 0.85   # optional; the lowest MoE layer's agreement

Unknown top-level keys, variant names or bound keys are errors.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mixtral_quant.errors import MixtralQuantError
from mixtral_quant.eval.compare import Comparison
from mixtral_quant.eval.memory import COMPONENTS, MemoryReport
from mixtral_quant.eval.perplexity import PerplexityResult
from mixtral_quant.eval.speed import SpeedResult
from mixtral_quant.textfile import read_text

SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "report.md", "report.html")


@dataclass
class ModelResult:
    name: str
    path: str
    role: str  # "baseline" or "variant"
    model_type: str
    quantization: dict[str, Any] | None
    perplexity: PerplexityResult
    ppl_ratio: float
    memory: MemoryReport
    speed: SpeedResult | None
    comparison: Comparison | None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("perplexity", "memory", "speed", "comparison"):
            d[key] = d[key].to_dict() if d[key] is not None else None
        return d


@dataclass
class EvalReport:
    created: str
    tool_version: str
    dataset: dict[str, Any]
    settings: dict[str, Any]
    baseline: ModelResult
    variants: list[ModelResult]
    gate: list[BoundResult] | None = None  # None: no bounds file given
    schema_version: int = SCHEMA_VERSION

    @property
    def models(self) -> list[ModelResult]:
        return [self.baseline, *self.variants]

    def variant(self, name: str) -> ModelResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise MixtralQuantError(f"no variant named {name!r} in the report (variants: {self.variant_names()})")

    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "created": self.created,
            "tool_version": self.tool_version,
            "dataset": self.dataset,
            "settings": self.settings,
            "baseline": self.baseline.to_dict(),
            "variants": [v.to_dict() for v in self.variants],
            "gate": [r.to_dict() for r in self.gate] if self.gate is not None else None,
        }


# Writing --------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MODEL_MARKERS = ("config.json", "manifest.json", "model.safetensors", "model.safetensors.index.json", "model.onnx")


def _is_our_report(path: Path) -> bool:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and {"created", "tool_version", "baseline", "variants"} <= set(d)


def check_report_folder(folder: Path) -> None:
    """A report folder is made now (so a path that cannot be a folder fails before the work) and must hold
    no model or artifact, and no report file this tool did not write: reports never replace others' files."""
    for marker in MODEL_MARKERS:
        if (folder / marker).exists():
            raise MixtralQuantError(f"--report {folder} holds a model or artifact ({marker}): "
                                    "write reports to a folder of their own")
    existing = [n for n in REPORT_FILES if (folder / n).exists()]
    if existing and not _is_our_report(folder / "report.json"):
        raise MixtralQuantError(f"--report {folder} holds {existing[0]}, which mixtral-quant did not write: "
                                "choose another folder")
    folder.mkdir(parents=True, exist_ok=True)


def write_reports(report: EvalReport, folder: Path) -> list[Path]:
    """report.json, report.md and report.html in ``folder`` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = (json.dumps(report.to_dict(), indent=2) + "\n", markdown(report), html_page(report))
    paths = [folder / name for name in REPORT_FILES]
    for path, text in zip(paths, texts, strict=True):
        write_atomic(path, text)
    return paths


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _mib(n: int | None) -> str:
    return _num(None if n is None else n / 2**20, ".2f")


def summary_rows(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    """The main table (header, rows), shared by Markdown and HTML."""
    header = [
        "model", "ppl", "ppl ratio", "KL (nats)", "top-1 changed", "router agreement (min)",
        "weights MiB", "bits/param", "peak Δ MiB", "prefill tok/s", "decode tok/s",
    ]  # fmt: skip
    rows = []
    for m in report.models:
        c, s = m.comparison, m.speed
        peak = m.memory.peak.delta_bytes if m.memory.peak else None
        rows.append([
            m.name + (" (baseline)" if m.role == "baseline" else ""),
            f"{m.perplexity.ppl:.4f}",
            f"{m.ppl_ratio:.4f}",
            _num(c.kl_mean if c else None, ".5f"),
            _num(c.top1_changed if c else None, ".4f"),
            _num(c.min_router_agreement if c else None, ".4f"),
            _mib(m.memory.weight_bytes),
            _num(m.memory.bits_per_parameter["total"], ".3f"),
            _mib(peak),
            _num(s.prefill_tokens_per_s if s else None, ".1f"),
            _num(s.decode_tokens_per_s if s else None, ".1f"),
        ])  # fmt: skip
    return header, rows


def component_rows(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    """Stored weight MiB and bits per parameter by component."""
    header = ["model", *(f"{c} MiB (bits/param)" for c in COMPONENTS)]
    rows = []
    for m in report.models:
        stored = m.memory.disk_bytes or m.memory.memory_bytes
        bpp = m.memory.bits_per_parameter
        rows.append([m.name, *(f"{_mib(stored[c])} ({_num(bpp[c], '.2f')})" for c in COMPONENTS)])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: EvalReport) -> str:
    d, s = report.dataset, report.settings
    p = report.baseline.perplexity
    parts = [
        "# Evaluation report",
        f"Dataset **{d['name']}** ({d['tokens']} tokens; {d['tokenization']}), sha256 `{d['sha256'][:16]}…`. "
        f"Context {s['ctx']}, stride {s['stride']}, {p.windows} windows, {p.tokens_scored} tokens scored; "
        f"{p.bos}. Device {s['device']}, {s['dtype']}{', layer-sequential' if s['layer_sequential'] else ''}.",
        markdown_table(*summary_rows(report)),
        "## Stored weights by component",
        markdown_table(*component_rows(report)),
        f"Peak memory: {report.baseline.memory.peak.kind.value if report.baseline.memory.peak else 'not measured'}, "
        "the increase over the memory in use when the model's load began, through its load and one "
        "full-length window's forward; layer-sequential: that of the one pass over all models. "
        "Every model's forward ran once per window, in one lockstep pass. Speeds: medians over rounds that "
        "time every model once in turn.",
        f"Schema version {report.schema_version}, mixtral-quant {report.tool_version}, {report.created}.",
    ]
    if report.gate is not None:
        parts[-1:-1] = ["## Regression gate", "```\n" + gate_table(report.gate) + "\n```"]
    return "\n\n".join(parts) + "\n"


# HTML with inline SVG plots --------------------------------------------------------------------

_COLORS = dict(zip(COMPONENTS, ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f"), strict=True))
_W, _H, _PAD = 560, 300, 60


def _svg(body: list[str], height: int = _H) -> str:
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" font-family="sans-serif">'
    return head + "".join(body) + "</svg>"


def _text(x: float, y: float, s: str, anchor: str = "start") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{html.escape(s)}</text>'


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none with fewer or equal bits has a lower perplexity
    (nor equal perplexity with fewer bits); in order of bits."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def is_mixed(m: ModelResult) -> bool:
    """Whether the model's linears have several widths (GPTQModel's ``dynamic`` rules)."""
    return bool(m.quantization and m.quantization.get("dynamic"))


def ppl_vs_bits_svg(report: EvalReport) -> str:
    """Perplexity against bits per expert parameter (per parameter of all weights for a model without
    experts), one labelled point per model, mixed-width ones in their own colour, and the Pareto front:
    the models no other beats on both."""
    experts = all(m.memory.bits_per_parameter.get("experts") for m in report.models)
    key = "experts" if experts else "total"
    pts = [(m.memory.bits_per_parameter[key] or 0.0, m.perplexity.ppl, m.name, is_mixed(m)) for m in report.models]
    x0, x1 = 0.0, max(p[0] for p in pts) * 1.1 or 1.0
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0, y1 = y0 - 0.1 * (y1 - y0 or y0), y1 + 0.1 * (y1 - y0 or y0)
    digits = max(0, 2 - math.floor(math.log10(y1 - y0)))  # ticks a quarter of the range apart stay distinct

    def xy(x: float, y: float) -> tuple[float, float]:
        return _PAD + (x - x0) / (x1 - x0) * (_W - 2 * _PAD), _H - _PAD - (y - y0) / (y1 - y0) * (_H - 2 * _PAD)

    body = [
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="black"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="black"/>',
        _text(_W / 2, _H - 20, f"bits per {'expert parameter' if experts else 'parameter'} (stored weights)",
              "middle"),
        _text(10, _PAD - 15, "perplexity"),
        _text(_W - _PAD, _PAD - 15, "blue: one width, red: mixed widths, dashed: Pareto front", "end"),
    ]
    for i in range(5):
        xv, yv = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        body.append(_text(xy(xv, y0)[0], _H - _PAD + 15, f"{xv:.1f}", "middle"))
        body.append(_text(_PAD - 5, xy(x0, yv)[1], f"{yv:.{digits}f}", "end"))
    front = pareto_front([(x, y) for x, y, _, _ in pts])
    line = " ".join("{:.1f},{:.1f}".format(*xy(pts[i][0], pts[i][1])) for i in front)
    body.append(f'<polyline class="pareto" points="{line}" fill="none" stroke="#888" stroke-dasharray="4 3"/>')
    for x, y, name, mixed in pts:
        px, py = xy(x, y)
        colour = "#e15759" if mixed else "#4e79a7"
        body += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="{colour}"/>', _text(px + 6, py - 6, name)]
    return _svg(body)


def memory_bars_svg(report: EvalReport) -> str:
    """Stacked horizontal bars of stored weight bytes by component, one bar per model."""
    models = report.models
    stored = [m.memory.disk_bytes or m.memory.memory_bytes for m in models]
    top = max(sum(s.values()) for s in stored) or 1
    height = _PAD + 26 * len(models) + 40
    left, width = 140, _W - 140 - 80  # room for the names on the left and the totals on the right
    body = []
    for i, (m, s) in enumerate(zip(models, stored, strict=True)):
        y, x = 20 + 26 * i, float(left)
        body.append(_text(left - 6, y + 14, m.name, "end"))
        for c in COMPONENTS:
            w = s[c] / top * width
            body.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="18" fill="{_COLORS[c]}"><title>'
                        f"{html.escape(m.name)} {c}: {_mib(s[c])} MiB</title></rect>")  # fmt: skip
            x += w
        body.append(_text(x + 4, y + 14, f"{_mib(sum(s.values()))} MiB"))
    for j, c in enumerate(COMPONENTS):
        lx = 20 + j * 100
        body.append(f'<rect x="{lx}" y="{height - 28}" width="10" height="10" fill="{_COLORS[c]}"/>')
        body.append(_text(lx + 14, height - 19, c))
    return _svg(body, height)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def html_page(report: EvalReport) -> str:
    """A self-contained page: the Markdown report's facts, tables and two inline SVG plots."""
    d = report.dataset
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mixtral-quant evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}svg{{font-size:11px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>
<h1>Evaluation report</h1>
<p>Dataset {html.escape(d["name"])}: {d["tokens"]} tokens ({html.escape(d["tokenization"])}).
Settings: {html.escape(json.dumps(report.settings))}.</p>
{_html_table(*summary_rows(report))}
<h2>Perplexity against bits per parameter: the Pareto front</h2>{ppl_vs_bits_svg(report)}
<h2>Stored weights by component</h2>{memory_bars_svg(report)}
{_html_table(*component_rows(report))}
{"" if report.gate is None else "<h2>Regression gate</h2><pre>" + html.escape(gate_table(report.gate)) + "</pre>"}
<p>Schema version {report.schema_version}, mixtral-quant {html.escape(report.tool_version)}, {report.created}.</p>
</body></html>
"""


# Regression gate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantBounds:
    max_ppl_ratio: float | None = None
    max_weight_bytes: int | None = None
    min_router_agreement: float | None = None


BOUND_KEYS = tuple(f.name for f in fields(VariantBounds))


@dataclass(frozen=True)
class BoundResult:
    variant: str
    bound: str  # a key of VariantBounds
    limit: float
    measured: float | None  # None: not measurable (a router bound on a model without MoE)
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Violation = BoundResult  # a BoundResult that did not pass


def load_bounds(path: Path) -> dict[str, VariantBounds]:
    """Bounds per variant name from a TOML file (see the module docstring)."""
    try:
        data = tomllib.loads(read_text(path, "bounds file"))
    except tomllib.TOMLDecodeError as e:
        raise MixtralQuantError(f"bounds file {path} is not valid TOML: {e}") from None
    extra = sorted(set(data) - {"variants"})
    if extra or not isinstance(data.get("variants"), dict):
        raise MixtralQuantError(f"bounds file {path} must hold only [variants.NAME] tables (found {extra or data})")
    out = {}
    for name, table in data["variants"].items():
        unknown = sorted(set(table) - set(BOUND_KEYS)) if isinstance(table, dict) else ["(not a table)"]
        if unknown:
            raise MixtralQuantError(f"bounds for {name!r} in {path} have unknown keys {unknown}: use {BOUND_KEYS}")
        for key, value in table.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise MixtralQuantError(f"bound {name}.{key} in {path} must be a number, got {value!r}")
        out[name] = VariantBounds(**table)
    return out


def check_names(bounds: dict[str, VariantBounds], variants: list[str]) -> None:
    """MixtralQuantError when the bounds name a variant that is not evaluated."""
    unknown = sorted(set(bounds) - set(variants))
    if unknown:
        raise MixtralQuantError(f"bounds name unknown variants {unknown}: the variants evaluated are {variants}")


def _measured(m: ModelResult, bound: str) -> float | None:
    if bound == "max_ppl_ratio":
        return m.ppl_ratio
    if bound == "max_weight_bytes":
        return float(m.memory.weight_bytes)
    return m.comparison.min_router_agreement if m.comparison else None


def bound_results(report: EvalReport, bounds: dict[str, VariantBounds]) -> list[BoundResult]:
    """Every bound with its measured value; a router bound on a model without MoE fails."""
    check_names(bounds, report.variant_names())
    out = []
    for name, vb in bounds.items():
        m = report.variant(name)
        for key in BOUND_KEYS:
            limit = getattr(vb, key)
            if limit is None:
                continue
            value = _measured(m, key)
            ok = value is not None and (value >= limit if key.startswith("min_") else value <= limit)
            out.append(BoundResult(name, key, float(limit), value, ok))
    return out


def check(report: EvalReport, bounds: dict[str, VariantBounds]) -> list[Violation]:
    """The bounds the report's variants miss (empty: the gate passes)."""
    return [r for r in bound_results(report, bounds) if not r.passed]


def gate_table(results: list[BoundResult]) -> str:
    """Bounds, measured values and pass / FAIL as a plain-text table."""
    rows = [["variant", "bound", "limit", "measured", "result"]]
    for r in results:
        shown = "n/a (no MoE)" if r.measured is None else f"{r.measured:.6g}"
        rows.append([r.variant, r.bound, f"{r.limit:.6g}", shown, "pass" if r.passed else "FAIL"])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
