"""Interop proof: a GPTQ artifact written by our pipeline runs in GPTQModel with our weights and our logits.

    python scripts/gptqmodel_interop.py --model /tmp/snap200 --recipe gptq-w4g128 --recipe gptq-w4g128-noact

For each recipe: quantize MODEL (or take --artifact), load the artifact with GPTQModel on the CPU and with
``mixtral_quant.loading.load_model``, and run the same token ids (sentences of wiki-test.txt, our
tokenizer). Per GPTQModel kernel it prints:

- the quant-linear classes GPTQModel put on the experts and on attention (the experts really are quantized);
- a weight probe: each GPTQModel quant linear applied to the identity gives its dequantized weight,
  compared with ours rounded to the kernel's dtype (qweight packing, v1 qzeros, scales and g_idx at once);
- max / mean |logit difference| against our fp32 logits and top-1 agreement, beside the same numbers for
  our own loader run in the kernel's dtype;
- whether GPTQModel's tokenizer gives our token ids;
- (--transformers) what plain ``transformers.from_pretrained`` makes of the artifact as written.

Exit status 1 when a check fails. Requirements: ``pip install --no-deps -r scripts/gptqmodel-requirements.txt``.

Names. GPTQModel 7.7 on transformers 5 does not read Mixtral's Hub names: defuser rebuilds each MoE block as
``mlp.experts.E.{gate_proj,up_proj,down_proj}`` (``LinearMixtralSparseMoeBlock``) and the quantized loader
(``validate_checkpoint_qweights``, then accelerate's ``load_checkpoint_in_model``) looks tensors up by those
module names without renaming; defuser's mixtral ``checkpoint_mapping`` renames only the float
``w1/w2/w3.weight`` for transformers' loader. An artifact in Hub names (ours, and published GPTQ Mixtral
checkpoints) stops with "Missing required quantized weights ... mlp.experts.0.down_proj.qweight", so
:func:`write_gptqmodel_view` writes a copy in GPTQModel's names (same tensor bytes) with a tokenizer.json.

Tolerance. GPTQModel's CPU kernels compute in 16 bits only (gptq_torch and gptq_torch_aten: fp16 or bf16;
gptq_torch_cpu_avx512, which ``auto`` picks here: bf16) and our loader in fp32. The yardstick is our own
loader run in the kernel's dtype: GPTQModel may be at most TOLERANCE_FACTOR times as far from our fp32
logits as that run, plus ABS_FLOOR, in mean |diff| and in the max |diff| over 98 % of positions; top-1
agreement at least MIN_TOP1. The max over all positions is printed, not gated: in 16 bits a position may
flip a top-2 routing choice, which moves its logits by up to about 2 here, and whether one does is luck
(in one run ours in bf16 flipped none and GPTQModel one; in another both flipped the same position).
Measured on the 200-step tiny model (4 lines x 64 tokens, mean |logit| 4.6, max 11.6): fp16 kernels
0.008-0.010 max / 0.0013 mean, the same as ours in fp16 (gptq_torch in fp16 is bit-identical to our fp16
run); bf16 kernels 0.064-0.076 at 98 % of positions, 0.24-1.95 max, 0.011-0.013 mean, against ours in
bf16 0.065-0.069, 0.07-1.93, 0.011-0.012. Reading our v1 qzeros as true zeros (off by one code) gives
mean 2.3 and 12 % top-1, far outside; the weight probe (at most MAX_ULPS) catches such an error by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mixtral_quant.checkpoint import INDEX_FILE
from mixtral_quant.hf_tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, build_tokenizer, read_sentencepiece
from mixtral_quant.hf_tokenizer import tokenizer_config as hf_tokenizer_config
from mixtral_quant.loading import load_model
from mixtral_quant.model import MixtralForCausalLM
from mixtral_quant.pipeline import quantize_model
from mixtral_quant.quant.modules import DequantLinear
from mixtral_quant.recipe import CORPORA, load_recipe
from mixtral_quant.tokenizer import TOKENIZER_FILE, Tokenizer

RECIPES = ("gptq-w4g128", "gptq-w4g128-noact")
# (backend, dtype): the fp16 reference kernel (torch dequantize + matmul), then GPTQModel's own choice on
# this CPU (TorchCpuAvx512Linear, bf16; its C++ extension compiles once, about 5 minutes, into ~/.cache).
KERNELS = (("gptq_torch", "float16"), ("auto", "bfloat16"))
TOLERANCE_FACTOR = 2.0
ABS_FLOOR = {"max": 0.02, "mean": 0.002}  # logits: about twice the fp16 kernels' measured difference
# The max is gated over all but the worst 2 % of positions: a 16-bit run may flip a top-2 routing choice at a
# position (ours in bf16 does too), which moves that position's logits by up to about 2 here.
POSITION_QUANTILE = 0.98
MIN_TOP1 = 0.95  # top-1 agreement with our fp32 logits (or ours-in-the-dtype's less 0.02, if lower)
MAX_ULPS = 1.0  # weight probe: fp16 kernels are bit-exact; bf16 ones round the fp16 scale, then the product
CORPUS = CORPORA / "wiki-test.txt"
# Our (Hub) names -> GPTQModel 7.7 runtime names (defuser's LinearMixtralSparseMoeBlock), and back.
GPTQMODEL_NAMES = (
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),
    (re.compile(r"\.experts\.(\d+)\.w1\."), r".experts.\1.gate_proj."),
    (re.compile(r"\.experts\.(\d+)\.w3\."), r".experts.\1.up_proj."),
    (re.compile(r"\.experts\.(\d+)\.w2\."), r".experts.\1.down_proj."),
)
OUR_NAMES = (
    (re.compile(r"\.mlp\.(gate|experts)\b"), r".block_sparse_moe.\1"),
    (re.compile(r"\.experts\.(\d+)\.gate_proj\b"), r".experts.\1.w1"),
    (re.compile(r"\.experts\.(\d+)\.up_proj\b"), r".experts.\1.w3"),
    (re.compile(r"\.experts\.(\d+)\.down_proj\b"), r".experts.\1.w2"),
)
VIEW_FILES = ("config.json", "quantize_config.json", "generation_config.json", TOKENIZER_FILE)
TRANSFORMERS_LINE = "transformers.from_pretrained: "


def _rename(name: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str:
    for pattern, repl in rules:
        name = pattern.sub(repl, name)
    return name


def gptqmodel_name(name: str) -> str:
    """``layers.0.block_sparse_moe.experts.3.w1.qweight`` -> ``layers.0.mlp.experts.3.gate_proj.qweight``."""
    return _rename(name, GPTQMODEL_NAMES)


def gptqmodel_rule(key: str) -> str:
    """A ``dynamic`` rule naming one of our modules exactly (``+:^model\\.layers\\.0\\..*\\.w1$``, as quantize
    writes them) in GPTQModel's names; any other rule as it is."""
    m = re.fullmatch(r"(\+:|-:)?\^(.*)\$", key)
    if m is None or re.escape(name := m.group(2).replace("\\", "")) != m.group(2):
        return key
    return f"{m.group(1) or ''}^{re.escape(gptqmodel_name(name + '.')[:-1])}$"


def our_name(module_name: str) -> str:
    """Inverse of :func:`gptqmodel_name` for a module of GPTQModel's model."""
    return _rename(module_name, OUR_NAMES)


def write_gptqmodel_view(artifact: Path, out: Path) -> Path:
    """A copy of ``artifact`` in GPTQModel's tensor names, plus tokenizer.json and tokenizer_config.json built
    from tokenizer.model (without them transformers 5, and so GPTQModel, tokenizes differently from us)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    index = json.loads((artifact / INDEX_FILE).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(artifact / shard))
        save_file({gptqmodel_name(k): v for k, v in tensors.items()}, str(out / shard), metadata={"format": "pt"})
    index["weight_map"] = {gptqmodel_name(k): v for k, v in index["weight_map"].items()}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for name in VIEW_FILES:
        if (artifact / name).is_file():
            shutil.copyfile(artifact / name, out / name)
    for name in ("config.json", "quantize_config.json"):  # per-module widths: the rules name modules too
        path = out / name
        if path.is_file():
            d = json.loads(path.read_text())
            qc = d.get("quantization_config", d) if name == "config.json" else d
            if qc.get("dynamic"):
                qc["dynamic"] = {gptqmodel_rule(k): v for k, v in qc["dynamic"].items()}
                path.write_text(json.dumps(d, indent=2) + "\n")
    if (out / TOKENIZER_FILE).is_file():
        vocab = read_sentencepiece(out / TOKENIZER_FILE)
        context = json.loads((out / "config.json").read_text()).get("max_position_embeddings", 4096)
        build_tokenizer(vocab).save(str(out / TOKENIZER_JSON))
        (out / TOKENIZER_CONFIG).write_text(json.dumps(hf_tokenizer_config(vocab, context), indent=2) + "\n")
    return out


def sample_texts(tokenizer: Tokenizer, sentences: int, tokens: int, corpus: Path = CORPUS) -> list[str]:
    """The first ``sentences`` lines of the corpus that have at least ``tokens`` tokens."""
    picked: list[str] = []
    for line in corpus.read_text().splitlines():
        if len(picked) == sentences:
            break
        if len(line) >= tokens and len(tokenizer.encode(line.strip())) >= tokens:
            picked.append(line.strip())
    if len(picked) < sentences:
        raise SystemExit(f"{corpus} has only {len(picked)} lines of {tokens} tokens; ask for fewer")
    return picked


def token_ids(tokenizer: Tokenizer, texts: list[str], tokens: int) -> torch.Tensor:
    """int64 ``[len(texts), tokens]``: each text's ids (BOS first), cut to ``tokens``."""
    return torch.tensor([tokenizer.encode(t)[:tokens] for t in texts], dtype=torch.int64)


@dataclass(frozen=True)
class LogitDiff:
    max: float  # over every position and vocabulary entry
    max_bulk: float  # the POSITION_QUANTILE quantile over positions of each position's max |diff|
    mean: float
    top1: float  # fraction of positions whose argmax agrees

    @staticmethod
    def of(logits: torch.Tensor, reference: torch.Tensor) -> LogitDiff:
        d = (logits.float() - reference.float()).abs()  # [B, T, V]
        per_position = d.amax(-1).flatten()
        top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
        bulk = torch.quantile(per_position, POSITION_QUANTILE)
        return LogitDiff(float(d.max()), float(bulk), float(d.mean()), float(top1))

    def __str__(self) -> str:
        return (f"max |diff| {self.max:.4g} (at {POSITION_QUANTILE:.0%} of positions {self.max_bulk:.4g})  "
                f"mean |diff| {self.mean:.4g}  top-1 agreement {self.top1:.2%}")


def within_tolerance(got: LogitDiff, ours_same_dtype: LogitDiff) -> bool:
    """GPTQModel's distance to our fp32 logits against our own loader's in the same dtype (module docstring)."""
    return (
        got.max_bulk <= TOLERANCE_FACTOR * ours_same_dtype.max_bulk + ABS_FLOOR["max"]
        and got.mean <= TOLERANCE_FACTOR * ours_same_dtype.mean + ABS_FLOOR["mean"]
        and got.top1 >= min(MIN_TOP1, ours_same_dtype.top1 - 0.02)
    )


@dataclass(frozen=True)
class WeightProbe:
    modules: int
    exact: int  # quant linears whose probed weight equals ours rounded to the dtype, bit for bit
    max_ulps: float  # largest difference, in units of the dtype's spacing at that weight


def _quant_linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    for name, module in model.named_modules():
        if isinstance(module, BaseQuantLinear):
            yield name, module


@torch.no_grad()
def probe_weights(gq_model: torch.nn.Module, ours: MixtralForCausalLM, dtype: torch.dtype) -> WeightProbe:
    """Each GPTQModel quant linear applied to the identity is its dequantized weight (transposed, in
    ``dtype``); ours is exact in fp32 and rounded once to ``dtype``."""
    ours_modules = dict(ours.named_modules())
    n = exact = 0
    worst = 0.0
    for name, module in _quant_linears(gq_model):
        mine = ours_modules.get(our_name(name))
        if not isinstance(mine, DequantLinear):
            raise SystemExit(f"GPTQModel quantized {name}; our loader has no quantized {our_name(name)}")
        in_features = int(module.in_features)  # type: ignore[arg-type]
        got = module(torch.eye(in_features, dtype=dtype)).float()  # [in, out]
        want = mine.weight_float().t().to(dtype).float()
        spacing = torch.finfo(dtype).eps * want.abs().clamp(min=torch.finfo(dtype).tiny)
        n += 1
        exact += int(torch.equal(got, want))
        worst = max(worst, float(((got - want).abs() / spacing).max()))
    return WeightProbe(n, exact, worst)


def kernel_classes(gq_model: torch.nn.Module) -> dict[str, list[str]]:
    """Quant-linear class names on the experts and on attention of GPTQModel's model."""
    found: dict[str, set[str]] = {"experts": set(), "attention": set()}
    for name, module in _quant_linears(gq_model):
        part = "experts" if ".experts." in name else "attention" if ".self_attn." in name else "other"
        found.setdefault(part, set()).add(type(module).__name__)
    return {k: sorted(v) for k, v in found.items()}


def load_gptqmodel(view: Path, backend: str, dtype: torch.dtype) -> Any:
    """GPTQModel's model for a view folder, on the CPU.

    GPTQModel.load patches transformers' Mixtral MoE block class for the rest of the process (defuser):
    call it only in a process that needs no other transformers Mixtral afterwards.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(str(view), device="cpu", backend=BACKEND(backend), dtype=dtype)


@torch.no_grad()
def our_logits(artifact: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return load_model(artifact, dtype=dtype)(ids).logits.float()


@dataclass
class KernelResult:
    backend: str
    dtype: str
    classes: dict[str, list[str]]
    probe: WeightProbe
    logits: LogitDiff  # GPTQModel against our fp32 logits
    ours_same_dtype: LogitDiff  # our loader in the kernel's dtype against our fp32 logits: the yardstick
    vs_ours_same_dtype: LogitDiff  # GPTQModel against our loader in the same dtype (for information)
    tokenizer_ok: bool  # GPTQModel's tokenizer gives our ids for the sample texts
    seconds: float  # GPTQModel load + forward
    checks: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.checks = {
            "experts quantized": bool(self.classes.get("experts")),
            "weights": self.probe.modules > 0 and self.probe.max_ulps <= MAX_ULPS,
            "logits": within_tolerance(self.logits, self.ours_same_dtype),
            "tokenizer": self.tokenizer_ok,
        }

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


@torch.no_grad()
def check_kernel(artifact: Path, view: Path, texts: list[str], ids: torch.Tensor, reference: torch.Tensor,
                 backend: str, dtype_name: str) -> KernelResult:
    """Load the view with one GPTQModel kernel and compare it with our loader (``reference``: fp32 logits)."""
    dtype = getattr(torch, dtype_name)
    t0 = time.time()
    gq = load_gptqmodel(view, backend, dtype)
    logits = gq.model(ids).logits.float()
    seconds = time.time() - t0
    ours_same = our_logits(artifact, ids, dtype)
    probe = probe_weights(gq.model, load_model(artifact), dtype)
    tok = Tokenizer(artifact)
    tokenizer_ok = all(list(gq.tokenizer(t)["input_ids"]) == tok.encode(t) for t in texts)
    return KernelResult(backend, dtype_name, kernel_classes(gq.model), probe, LogitDiff.of(logits, reference),
                        LogitDiff.of(ours_same, reference), LogitDiff.of(logits, ours_same), tokenizer_ok, seconds)


@torch.no_grad()
def transformers_check(artifact: Path, ids: torch.Tensor) -> str:
    """What ``transformers.AutoModelForCausalLM.from_pretrained`` does with the artifact as written (needs
    optimum; run it where GPTQModel.load has not run, see :func:`load_gptqmodel`)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(artifact), device_map="cpu")
    experts = {type(m).__name__ for n, m in model.named_modules() if n.endswith(".mlp.experts")}
    attention = {type(m).__name__ for n, m in model.named_modules() if n.endswith(".self_attn.q_proj")}
    diff = LogitDiff.of(model(ids).logits.float(), our_logits(artifact, ids, torch.float32))
    return f"experts {sorted(experts)}, q_proj {sorted(attention)}; against our fp32 logits: {diff}"


def transformers_check_in_child(artifact: Path, sentences: int, tokens: int) -> str:
    """:func:`transformers_check` in a fresh interpreter; its one-line answer."""
    cmd = [sys.executable, __file__, "--transformers-only", "--artifact", str(artifact),
           "--sentences", str(sentences), "--tokens", str(tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(TRANSFORMERS_LINE)]
    if done.returncode or not lines:
        return f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    return lines[-1][len(TRANSFORMERS_LINE):]


def describe(artifact: Path) -> str:
    qc = json.loads((artifact / "quantize_config.json").read_text())
    return (f"bits {qc['bits']} group {qc['group_size']} desc_act {qc['desc_act']} "
            f"static_groups {qc.get('static_groups')} sym {qc['sym']}")


def report(r: KernelResult) -> None:
    print(f"-- GPTQModel backend {r.backend}, {r.dtype}: load + forward {r.seconds:.1f} s")
    print(f"   experts: {r.classes.get('experts')}  attention: {r.classes.get('attention')}")
    print(f"   weights: {r.probe.exact}/{r.probe.modules} quant linears equal ours in {r.dtype} bit for bit, "
          f"worst {r.probe.max_ulps:.2f} ulp (limit {MAX_ULPS:g})")
    print(f"   GPTQModel vs ours fp32:  {r.logits}")
    print(f"   ours {r.dtype} vs ours fp32: {r.ours_same_dtype}")
    print(f"   GPTQModel vs ours {r.dtype}: {r.vs_ours_same_dtype}")
    print(f"   GPTQModel's tokenizer gives our ids: {r.tokenizer_ok}")
    failed = [k for k, ok in r.checks.items() if not ok]
    print(f"   => {'PASS' if r.ok else 'FAIL: ' + ', '.join(failed)} (logit limits: {TOLERANCE_FACTOR:g} x ours in "
          f"{r.dtype} + {ABS_FLOOR['max']} for the max at {POSITION_QUANTILE:.0%} of positions, + "
          f"{ABS_FLOOR['mean']} for the mean; top-1 >= {MIN_TOP1:.0%})")


def run(args: argparse.Namespace) -> bool:
    torch.manual_seed(0)
    if args.transformers_only:
        artifact = Path(args.artifact)
        tok = Tokenizer(artifact)
        print(TRANSFORMERS_LINE + transformers_check(artifact, token_ids(tok, sample_texts(tok, args.sentences,
                                                                                          args.tokens), args.tokens)))
        return True
    torch._dynamo.config.disable = True  # gptq_torch would torch.compile its dequantize: 30 s, same maths
    work = Path(args.out or tempfile.mkdtemp(prefix="gptqmodel-interop-"))
    kernels = args.kernel or list(KERNELS)
    results: list[dict[str, Any]] = []
    for target in [args.artifact] if args.artifact else args.recipe or RECIPES:
        t0 = time.time()
        if args.artifact:
            artifact = Path(target)
        else:
            recipe = load_recipe(target, samples=args.samples, seq_len=args.seq_len, group_size=args.group_size)
            artifact = quantize_model(args.model, recipe, work / recipe.name, overwrite=True, progress=False)
        built = time.time() - t0
        view = write_gptqmodel_view(artifact, work / f"{artifact.name}-gptqmodel")
        tok = Tokenizer(artifact)
        texts = sample_texts(tok, args.sentences, args.tokens)
        ids = token_ids(tok, texts, args.tokens)
        print(f"\n== {artifact.name}: {describe(artifact)}  (built in {built:.0f} s); "
              f"token ids {tuple(ids.shape)} from {CORPUS.name}")
        reference = our_logits(artifact, ids, torch.float32)
        for backend, dtype_name in kernels:
            r = check_kernel(artifact, view, texts, ids, reference, backend, dtype_name)
            report(r)
            results.append({"artifact": str(artifact), "ok": r.ok, **asdict(r)})
        if args.transformers:
            print("-- transformers.from_pretrained on the artifact as written (own process): "
                  + transformers_check_in_child(artifact, args.sentences, args.tokens))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    all_ok = all(r["ok"] for r in results)
    print(f"\n{'PASS' if all_ok else 'FAIL'}: GPTQModel {'agrees' if all_ok else 'disagrees'} with our loader on "
          f"{len(results)} artifact x kernel runs")
    return all_ok


def kernel_arg(text: str) -> tuple[str, str]:
    """``BACKEND:DTYPE`` -> (backend, dtype name), e.g. ``gptq_torch:float16``."""
    backend, _, dtype = text.partition(":")
    if dtype not in ("float16", "bfloat16"):
        raise argparse.ArgumentTypeError(f"{text!r}: use BACKEND:float16 or BACKEND:bfloat16 (GPTQModel's CPU dtypes)")
    return backend, dtype


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", help="16-bit model folder to quantize (default: the embedded tiny Mixtral)")
    p.add_argument("--artifact", help="check this GPTQ artifact instead of building them from recipes")
    p.add_argument("--recipe", action="append", help=f"recipe name or TOML (repeatable; default {', '.join(RECIPES)})")
    p.add_argument("--samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    p.add_argument("--group-size", type=int, help="override the recipe's group size (small test models)")
    p.add_argument("--kernel", action="append", type=kernel_arg, metavar="BACKEND:DTYPE",
                   help="GPTQModel backend and dtype (repeatable; default gptq_torch:float16 and auto:bfloat16)")
    p.add_argument("--sentences", type=int, default=4, help="lines of wiki-test.txt to run")
    p.add_argument("--tokens", type=int, default=64, help="tokens per line")
    p.add_argument("--out", help="work folder for artifacts and GPTQModel views (default: a new temp folder)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="also load the artifact with transformers.from_pretrained (needs optimum)")
    p.add_argument("--transformers-only", action="store_true", help=argparse.SUPPRESS)
    return 0 if run(p.parse_args(argv)) else 1


if __name__ == "__main__":
    sys.exit(main())
