"""Section gguf: our GPTQ-calibrated GGUFs against llama.cpp's own quantizer, run by llama.cpp.

Ours: the embedded model quantized with the shipped ``gptq-w4g32`` recipe (GPTQ on Q4_0's grid), written
by ``export gguf --type q4_0`` with its defaults (token_embd Q4_0, output Q6_K, as llama-quantize lays
out a Q4_0 file), and with ``gptq-q4_k`` (GPTQ on Q4_K's grid) written by ``--type q4_k`` (token_embd
Q4_K, output Q6_K). Peers: ``llama-quantize`` Q4_0 and Q4_K_M of the same model (an F32 GGUF of ours,
checked against transformers-equivalent logits in tests/test_export_gguf.py), each with an importance
matrix that ``llama-imatrix`` computed on the same calibration text (wiki-train, as many 512-token
chunks as our GPTQ's calibration sequences), and Q4_0 without one. Each file is scored twice on the
same two texts (the head of wiki-test, and the tail of the held-out novel moby-dick.txt): by
``llama-perplexity`` (windows of 512, which scores the second half of each window, with llama.cpp's
own 8-bit activations) and by our eval on its weights read back with gguf-py (perplexity of all
tokens, KL to the 16-bit model). The llama.cpp tools come from the source in llama-cpp-python's sdist
(scripts/build_llama_cpp.sh); without them the rows say how to build them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.table import Row, Status
from mixtral_quant.checkpoint import DEFAULT_MODEL
from mixtral_quant.demo import head_of
from mixtral_quant.eval.runner import evaluate
from mixtral_quant.export.gguf import GGUFOptions, GGUFType, export_gguf
from mixtral_quant.export.gguf_read import gguf_to_folder
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.recipe import CORPORA, load_recipe
from mixtral_quant.tokenizer import Tokenizer

SECTION = "gguf"
ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
BUILD = "scripts/build_llama_cpp.sh (or set LLAMA_CPP_BIN to a folder holding " + ", ".join(TOOLS) + ")"
OURS = {  # label -> (recipe, GGUF type)
    "gptq-w4g32 -> Q4_0 (ours)": ("gptq-w4g32", GGUFType.Q4_0),
    "gptq-q4_k -> Q4_K (ours)": ("gptq-q4_k", GGUFType.Q4_K),
}
CTX = 512
# llama.cpp's generic CPU kernels, weights as the file stores them: without it the repacked AMX path of this
# llama.cpp crashes (SIGSEGV) on CPUs with AMX (measured: llama-perplexity exit 139 on a Q4_0 file of the
# tiny model; 290.999 with the flag), and the figures would depend on the machine's repacking.
PLAIN_KERNELS = "--no-repack"
PEERS = {  # label -> (llama-quantize type, with the importance matrix)
    "llama-quantize Q4_0 + imatrix": ("Q4_0", True),
    "llama-quantize Q4_K_M + imatrix": ("Q4_K_M", True),
    "llama-quantize Q4_0 (no imatrix)": ("Q4_0", False),
}


def find_tools() -> dict[str, Path] | None:
    """The llama.cpp tools: in $LLAMA_CPP_BIN, exports/llama.cpp/build/bin, or on PATH."""
    places = [os.environ.get("LLAMA_CPP_BIN"), str(ROOT / "exports" / "llama.cpp" / "build" / "bin")]
    found = {}
    for tool in TOOLS:
        path = next((Path(p) / tool for p in places if p and (Path(p) / tool).is_file()), None)
        path = path or (Path(w) if (w := shutil.which(tool)) else None)
        if path is None:
            return None
        found[tool] = path
    return found


def _run(argv: list[Any]) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{Path(str(argv[0])).name} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return done.stdout + done.stderr


def llama_ppl(tools: dict[str, Path], model: Path, text: Path) -> float:
    out = _run([tools["llama-perplexity"], "-m", model, "-f", text, "-c", CTX, "-b", CTX, "-t", "2", PLAIN_KERNELS])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"llama-perplexity printed no final estimate for {model.name}")
    return float(m.group(1))


def tail_of(text_file: Path, tokenizer: Tokenizer, tokens: int, out: Path) -> Path:
    """The last ``tokens`` tokens of a text file (cut at a line start), written to ``out``."""
    lines, n = [], 0
    for line in reversed(text_file.read_text().splitlines(keepends=True)):
        lines.append(line)
        n += len(tokenizer.encode(line, bos=False))
        if n >= tokens:
            break
    out.write_text("".join(reversed(lines)))
    return out


def run(work: Path, quick: bool, say: Any) -> list[Row]:
    tools = find_tools()
    if tools is None:
        return [Row(SECTION, ours, peer, "ppl", "lower", status=Status.SKIPPED,
                    note=f"llama.cpp tools not found: build them with {BUILD}") for ours in OURS for peer in PEERS]
    samples = 16 if quick else 128  # the recipe's own default in full mode
    eval_tokens = 8192 if quick else 32768
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = Tokenizer(DEFAULT_MODEL)
    texts = {"wiki-test": head_of(CORPORA / "wiki-test.txt", tok, eval_tokens, work / "wiki-test-head.txt"),
             "moby-dick": tail_of(CORPORA / "moby-dick.txt", tok, eval_tokens, work / "moby-dick-tail.txt")}
    files = {}
    for label, (recipe, qtype) in OURS.items():
        say(f"gguf: quantize {recipe} (samples={samples}) and export {qtype.name} ({time.time() - t0:.0f}s)")
        art = quantize_model(DEFAULT_MODEL, load_recipe(recipe, samples=samples), work / recipe, overwrite=True,
                             progress=False)
        files[label] = export_gguf(art, work / f"{recipe}-{qtype.value}.gguf", GGUFOptions(qtype), overwrite=True,
                                   progress=False).path
    f32 = export_gguf(DEFAULT_MODEL, work / "f32.gguf", GGUFOptions(GGUFType.F32), overwrite=True,
                      progress=False).path
    say(f"gguf: llama-imatrix on {samples} chunks of wiki-train ({time.time() - t0:.0f}s)")
    imatrix = work / "imatrix.gguf"
    _run([tools["llama-imatrix"], "-m", f32, "-f", CORPORA / "wiki-train.txt", "-o", imatrix, "-c", CTX,
          "--chunks", samples, "-t", "2", PLAIN_KERNELS])
    for label, (ftype, use_imatrix) in PEERS.items():
        out = work / f"{ftype}{'-imatrix' if use_imatrix else ''}.gguf"
        _run([tools["llama-quantize"], *(["--imatrix", imatrix] if use_imatrix else []), f32, out, ftype, "2"])
        files[label] = out
    say(f"gguf: llama-perplexity ({time.time() - t0:.0f}s)")
    figures: dict[str, dict[str, Any]] = {k: {"bytes": p.stat().st_size} for k, p in files.items()}
    for key, path in files.items():
        for name, text in texts.items():
            figures[key][f"llama ppl {name}"] = llama_ppl(tools, path, text)
    base = {name: llama_ppl(tools, f32, text) for name, text in texts.items()}
    say(f"gguf: our eval of the files' weights ({time.time() - t0:.0f}s)")
    folders = {key: gguf_to_folder(path, DEFAULT_MODEL, work / "weights" / re.sub(r"\W+", "-", key))
               for key, path in files.items()}
    for name, text in texts.items():
        report = evaluate(list(folders.values()), DEFAULT_MODEL, str(text), CTX, None, "cpu", None, progress=False)
        for key, folder in folders.items():
            v = report.variant(folder.name)
            figures[key][f"ppl {name}"] = v.perplexity.ppl
            figures[key][f"KL {name}"] = v.comparison.kl_mean if v.comparison else None
        base[f"ours {name}"] = report.baseline.perplexity.ppl
    say(f"gguf: done ({time.time() - t0:.0f}s)")
    where = (f"{eval_tokens} tokens each of the head of wiki-test and the tail of moby-dick (held out), ctx {CTX}; "
             f"calibration: {samples} x {CTX} tokens of wiki-train for both; F32 llama ppl "
             f"{base['wiki-test']:.4g} / {base['moby-dick']:.4g}, our fp32 ppl {base['ours wiki-test']:.4g} / "
             f"{base['ours moby-dick']:.4g}")
    rows = []
    for ours in OURS:
        for label in PEERS:
            for metric in ("llama ppl wiki-test", "llama ppl moby-dick", "ppl wiki-test", "ppl moby-dick",
                           "KL wiki-test", "KL moby-dick", "bytes"):
                rows.append(Row(SECTION, f"{ours}, {metric}", label, metric, "lower",
                                figures[ours], figures[label], 1, Status.OK, where))
    return rows
